"""The bench's questions on one CUDA device, in under 5 minutes: `python -m pipeline.bench.gpu_check`.

    1. per-stage step time on the GPU (the default network, split into S = 1, 2, 4 stages), CUDA-synchronised;
    2. per-hop transfer of an activation of each stage boundary's size:
         d2d        torch cuda tensor .clone() on the device (what a same-GPU hand-over could cost)
         d2h2d      the engine's transport as it is: .cpu().numpy() in the producer, torch.from_numpy().cuda()
                    in the consumer (two PCIe copies; Ray's object store adds one host copy, measured in
                    `lamina bench`)
         ray-numpy  the same through two Ray actors on the GPU (numpy by object ref): producer's .cpu().numpy()
                    to the consumer holding a cuda tensor, median over rounds
    3. efficiency of S stages sharing the one GPU: the Ray engine with --gpus-per-stage 1/S (fractional
       GPUs: all S actors on the one device, separate CUDA contexts; its own schedule and placement)
       against 1 / max(stage step in isolation), as in pipeline/bench/suite.py [Note: efficiency], for
       each --transport (object-store, compiled-graph, shm) and, at S = 2, --balance auto.
       The compiled-graph and shm transports carry the stages' host (numpy) outputs through shared memory
       here (shm: device -> the slot in host memory -> device; a compiled graph's NCCL channels need a
       device per stage), so this measures their control path on a GPU machine, not device-to-device transfer.
    4. where the machine has 2 or more GPUs, S = 2 stages on a GPU each with --transport object-store (device
       -> host -> object store -> host -> device) and shm (device -> host -> shared memory -> host -> device)
       against the two that stay on the devices: --transport direct (Ray Direct Transport over NCCL) and
       compiled-graph (the graph's accelerator channels, NCCL; [Note: compiled graph on GPUs]). NCCL refuses
       two ranks on one device, so neither is in 3;
    5. replicas, where the machine has 2 or more GPUs: the whole network as one stage of R = 1 and R = the
       GPU count replicas, one GPU each (NCCL all-gather and all-reduce between them; NCCL refuses two ranks
       on one device, so a one-GPU machine skips this and says so).

Exits 2 with a message when no CUDA device is visible. Prints one table; `--json PATH` also writes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch

LAYERS = "conv:32,conv:64,conv:128,mlp:256"


def _sync_time(fn: Any, warmup: int, steps: int) -> float:
    """Median seconds of fn() with a CUDA sync on both sides of each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def stage_times(spec: Any, clips: int, clip_len: int, ranges: list[tuple[int, int]], warmup: int, steps: int,
                ) -> dict[tuple[int, int], float]:
    from workers.layers import normalise, output_shapes
    from workers.learner import LearnerStack

    shapes = [spec.in_shape, *output_shapes(spec.blocks, spec.in_shape)]
    out = {}
    for first, last in ranges:
        stage = LearnerStack.layer_local(spec, first, last, "cuda")
        x = normalise(torch.randn(clips * clip_len, *shapes[first], device="cuda")).view(clips, clip_len,
                                                                                          *shapes[first])
        out[(first, last)] = _sync_time(lambda s=stage, x=x: s.step(x), warmup, steps)
    return out


def transfer_times(nbytes: int, rounds: int) -> dict[str, float]:
    x = torch.randn(nbytes // 4, device="cuda")
    d2d = _sync_time(lambda: x.clone(), 3, rounds)
    d2h2d = _sync_time(lambda: torch.from_numpy(x.cpu().numpy()).cuda(), 3, rounds)
    return {"d2d": d2d, "d2h2d": d2h2d}


class _Producer:
    def __init__(self, nbytes: int) -> None:
        self.x = torch.randn(nbytes // 4, device="cuda")

    def emit(self) -> tuple[np.ndarray, float]:
        torch.cuda.synchronize()
        t = time.time()
        return self.x.cpu().numpy(), t


class _Consumer:
    def take(self, x: np.ndarray) -> float:
        y = torch.from_numpy(x).cuda()
        torch.cuda.synchronize()
        assert y.numel() > 0
        return time.time()


def ray_hop(nbytes: int, rounds: int) -> float:
    import ray

    producer: Any = ray.remote(num_gpus=0.5, num_cpus=0)(_Producer).remote(nbytes)
    consumer: Any = ray.remote(num_gpus=0.5, num_cpus=0)(_Consumer).remote()
    hops = []
    for r in range(rounds + 3):
        x, sent = producer.emit.options(num_returns=2).remote()
        received = ray.get(consumer.take.remote(x))
        if r >= 3:
            hops.append(received - ray.get(sent))
    ray.kill(producer)
    ray.kill(consumer)
    return statistics.median(hops)


def pipeline_rate(stages: int, clips: int, steps: int, warmup: int, transport: str = "object-store",
                  balance: str = "even", replicas: int = 1, own_gpus: bool = False) -> float:
    """Steady-state micro-batches/s of the Ray engine with S stages sharing the GPU (--gpus-per-stage 1/S),
    or with R replicas of one GPU each: the engine's own placement, actors and schedule, nothing
    re-implemented."""
    from pipeline.config import TrainConfig
    from pipeline.engines.ray_engine import run_ray
    from pipeline.sources import ClipSampler, load_videos

    n = len(LAYERS.split(","))
    cfg = TrainConfig(layers=LAYERS, clips=clips, steps=warmup + steps + 1, layers_per_stage=n // stages,
                      gpus_per_stage=1 / stages if replicas == 1 and not own_gpus else 1.0, checkpoint_every=0,
                      transport=transport, balance=balance, replicas=str(replicas))
    videos = load_videos(cfg.data, cfg.size, "train")
    sampler = ClipSampler(videos, cfg.clips, cfg.clip_len, cfg.seed)
    ends: dict[int, float] = {}
    run_ray(cfg, cfg.learner_spec(videos.frame_shape), sampler, lambda m, reports: ends.__setitem__(
        m, time.perf_counter()))
    last = max(ends)
    return (last - warmup) / (ends[last] - ends[warmup])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=64, help="B: clips per micro-batch (x 8 frames)")
    parser.add_argument("--steps", type=int, default=40, help="steady-state micro-batches per measurement")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False); "
              "run this on a GPU machine", file=sys.stderr)
        return 2

    import ray

    from pipeline.config import TrainConfig
    from workers.layers import output_shapes

    t0 = time.perf_counter()
    torch.backends.cudnn.benchmark = False  # the stage actors run with the default: measure what they run
    n = len(LAYERS.split(","))
    cfg = TrainConfig(layers=LAYERS, clips=args.clips)
    spec = cfg.learner_spec((1, cfg.size, cfg.size))
    lines = [(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, B = {args.clips} x "
             f"{cfg.clip_len} frames, {LAYERS}"), ""]

    splits = {s: [(k, k + n // s) for k in range(0, n, n // s)] for s in (1, 2, 4)}
    ranges = sorted({r for rs in splits.values() for r in rs})
    t_iso = stage_times(spec, args.clips, cfg.clip_len, ranges, 5, args.steps)
    lines += ["| layers | step ms (GPU, alone) |", "|---|---|"]
    lines += [f"| {a}-{b - 1} | {t * 1e3:.2f} |" for (a, b), t in t_iso.items()]
    from pipeline.engines.balance import measure_layers  # --balance auto's view: the CUDA allocator's bytes

    held = measure_layers(spec, args.clips, cfg.clip_len, steps=2)
    lines += ["", "| layer | state MB (params, grads, Adam) | working MB (one step, allocator peak) |", "|---|---|---|"]
    lines += [f"| {k} | {c.state_bytes / 1e6:.1f} | {c.work_bytes / 1e6:.1f} |" for k, c in enumerate(held)]

    shapes = output_shapes(spec.blocks, spec.in_shape)
    sizes = sorted({args.clips * cfg.clip_len * int(np.prod(s)) * 4 for s in shapes[:-1]} | {64 << 20})
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    lines += ["", "| activation | d2d clone ms | d2h2d ms (.cpu().numpy(), .cuda()) | Ray numpy hop ms |",
              "|---|---|---|---|"]
    hops: dict[int, dict[str, float]] = {}
    for nbytes in sizes:
        hops[nbytes] = {**transfer_times(nbytes, 20), "ray-numpy": ray_hop(nbytes, 10)}
        h = hops[nbytes]
        lines.append(f"| {nbytes / 2**20:.2f} MB | {h['d2d'] * 1e3:.3f} | {h['d2h2d'] * 1e3:.3f} | "
                     f"{h['ray-numpy'] * 1e3:.2f} |")

    lines += ["", "| S (sharing the GPU) | --transport | --balance | mb/s | 1 / max t_iso (even) | efficiency |",
              "|---|---|---|---|---|---|"]
    rates: dict[str, float] = {}
    for s, rs in splits.items():
        ideal = 1 / max(t_iso[r] for r in rs)
        for transport in ("object-store", "compiled-graph", "shm"):
            for balance in ("even", "auto") if s == 2 else ("even",):
                key = f"S={s} {transport} {balance}"
                rates[key] = pipeline_rate(s, args.clips, args.steps, 5, transport, balance)
                lines.append(f"| {s} | {transport} | {balance} | {rates[key]:.2f} | {ideal:.2f} | "
                             f"{rates[key] / ideal:.2f} |")
    gpus = torch.cuda.device_count()
    if gpus >= 2:
        lines += ["", "| S = 2, a GPU each: --transport | mb/s |", "|---|---|"]
        for transport in ("object-store", "direct", "compiled-graph", "shm"):
            rates[f"S=2 own GPUs {transport}"] = pipeline_rate(2, args.clips, args.steps, 5, transport, own_gpus=True)
            lines.append(f"| {transport} | {rates[f'S=2 own GPUs {transport}']:.2f} |")
        lines += ["", "| replicas (1 stage, a GPU each) | mb/s | vs R = 1, per replica |", "|---|---|---|"]
        for r in (1, gpus):
            rates[f"R={r}"] = pipeline_rate(1, args.clips, args.steps, 5, replicas=r)
            lines.append(f"| {r} | {rates[f'R={r}']:.2f} | {rates[f'R={r}'] / (r * rates['R=1']):.2f} |")
    else:
        lines.append("\ndirect transport, compiled graph over NCCL and replicas: skipped (one GPU: NCCL needs a device "
                     "per rank)")
    lines.append(f"\ntook {time.perf_counter() - t0:.0f} s")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"t_iso_s": {f"{a}-{b - 1}": t for (a, b), t in t_iso.items()},
                       "hops_s": hops, "rates": rates, "config": dataclasses.asdict(cfg)}, f, indent=1)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
