"""Where a replicated stage's time goes: `python -m pipeline.bench.replicas`.

One stage holding the whole network steps micro-batches in plain processes (no Ray, no transport), one torch
thread each, median over steps after warm-up:

    alone       one process, the whole micro-batch: R = 1
    halves      R processes at once, each its share of the clips, no group: the compute R replicas do
    replicas    R processes in a replica group (workers/replicas.py): the compute plus the gathers and the
                gradient all-reduce, and each one's time inside those collectives (waiting for the others
                included: a collective returns when the slowest replica has joined it)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

LAYERS = "conv:32,conv:64,conv:128,mlp:256"  # lamina bench's network


def _spec(clips: int) -> Any:
    from pipeline.config import TrainConfig

    cfg = TrainConfig(layers=LAYERS, clips=clips, size=32)
    return cfg.learner_spec((1, cfg.size, cfg.size))


def _worker(rank: int, size: int, grouped: bool, address: str, clips: int, steps: int, out: Any) -> None:
    from pipeline.stage import Stage
    from workers import replicas

    torch.set_num_threads(1)
    inside: dict[str, float] = defaultdict(float)
    call = replicas.ReplicaGroup._call

    def timed(self: Any, collective: Any, *args: Any, **kwargs: Any) -> None:
        t = time.perf_counter()
        call(self, collective, *args, **kwargs)
        inside[collective.__name__] += time.perf_counter() - t

    replicas.ReplicaGroup._call = timed  # type: ignore[method-assign]
    stage = Stage(_spec(clips), 0, len(LAYERS.split(",")))
    if grouped:
        stage.set_group(replicas.ReplicaGroup.join(address, rank, size, torch.device("cpu")))
    x = replicas.share(np.random.default_rng(0).standard_normal((clips, 8, 1, 32, 32)).astype(np.float32), rank, size)
    times = []
    for m in range(steps + 2):
        if m == 2:
            inside.clear()
        t = time.perf_counter()
        stage.step(m, x)
        times.append(time.perf_counter() - t)
    out.put((rank, statistics.median(times[2:]), {k: v / steps for k, v in inside.items()}))
    replicas.leave()


def measure(size: int, grouped: bool, clips: int, steps: int) -> list[tuple[int, float, dict[str, float]]]:
    """Each process's (rank, median step seconds, seconds per step inside each collective)."""
    from workers.replicas import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    address = f"127.0.0.1:{free_port('127.0.0.1')}"
    procs = [ctx.Process(target=_worker, args=(r, size, grouped, address, clips, steps, out)) for r in range(size)]
    for p in procs:
        p.start()
    got = sorted(out.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return got


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.replicas", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=2, help="R")
    parser.add_argument("--clips", type=int, default=16, help="B: clips per micro-batch (x 8 frames at 32x32)")
    parser.add_argument("--steps", type=int, default=8, help="measured steps (after 2 of warm-up)")
    args = parser.parse_args(argv)
    r = args.replicas
    alone = measure(1, False, args.clips, args.steps)[0][1]
    halves = measure(r, False, args.clips, args.steps)
    grouped = measure(r, True, args.clips, args.steps)
    ms = 1000.0
    print(f"{LAYERS}, B = {args.clips} x 8 frames, 1 thread per process, R = {r}, medians of {args.steps} steps\n")
    print("| | step ms (per process) | inside gathers ms | inside all-reduces ms | vs alone |")
    print("|---|---|---|---|---|")
    print(f"| alone, the whole micro-batch | {alone * ms:.1f} | | | 1.00x |")
    slowest = max(t for _, t, _ in halves)
    print(f"| {r} processes, a share each, no group | {' / '.join(f'{t * ms:.1f}' for _, t, _ in halves)} | | | "
          f"{alone / slowest:.2f}x |")
    slowest = max(t for _, t, _ in grouped)

    def each(values: list[float]) -> str:
        return " / ".join(f"{v * ms:.1f}" for v in values)

    print(f"| {r} replicas | {each([t for _, t, _ in grouped])} | {each([c.get('all_gather', 0) for *_, c in grouped])} | "
          f"{each([c.get('all_reduce', 0) for *_, c in grouped])} | {alone / slowest:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
