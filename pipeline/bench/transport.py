"""Measurements behind the Ray engine's design: what one stage-to-stage hop costs, and what pipelining buys.

    python -m pipeline.bench.transport hops          per-hop cost of activation transports vs memcpy
    python -m pipeline.bench.transport throughput    S pipeline stages vs the sequential loop (default S = 2)

`lamina bench` (pipeline/bench/suite.py) runs `hop_costs` next to its throughput and memory measurements.

Hop: the time from a producer actor handing over an activation (just before it returns / puts it) to a
consumer actor holding a usable array (first line of its method), both read from time.time() on one
machine, median over rounds after warm-up. Transports:

  numpy-ref     numpy array, the producer's output reference passed to the consumer's call (the engine's
                choice: one copy into the object store, zero-copy read on the other side)
  torch-ref     the same with a torch tensor: pickled by value, so copied in and copied out again
  queue         numpy array put by value on a ray.util.queue.Queue (itself an actor: the item is
                deserialised and re-serialised inside it) and taken by the consumer
  memcpy        numpy copy of the same bytes in one process: the floor any transport is measured against
  memcpy-new    the same copy into a newly allocated array: with the page faults of first-touched memory
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

logger = logging.getLogger(__name__)

KB, MB = 1024, 1024 * 1024
SIZES = (64 * KB, 1 * MB, 16 * MB, 64 * MB)
TRANSPORTS = ("numpy-ref", "torch-ref", "queue")


class _Producer:
    """Holds one payload per size; hands it over as numpy or torch, or puts it on a queue."""

    def __init__(self) -> None:
        self.payloads: dict[int, np.ndarray] = {}

    def _payload(self, nbytes: int) -> np.ndarray:
        if nbytes not in self.payloads:
            self.payloads[nbytes] = np.random.default_rng(0).random(nbytes // 4, dtype=np.float32)
        return self.payloads[nbytes]

    def emit(self, nbytes: int, as_torch: bool) -> tuple[Any, float]:
        x = self._payload(nbytes)
        out = torch.from_numpy(x) if as_torch else x
        return out, time.time()  # serialisation happens after this: it is part of the hop

    def put(self, queue: Any, nbytes: int) -> None:
        x = self._payload(nbytes)
        queue.put((x, time.time()))


class _Consumer:
    def take(self, x: Any) -> float:
        now = time.time()
        assert x.shape[0] > 0
        return now

    def take_from(self, queue: Any) -> tuple[float, float]:
        x, sent = queue.get()
        now = time.time()
        assert x.shape[0] > 0
        return sent, now


@dataclass(frozen=True)
class HopRow:
    nbytes: int
    ms: dict[str, float]  # transport -> median hop in milliseconds; "memcpy" included


def hop_costs(sizes: Sequence[int] = SIZES, rounds: int = 20, warmup: int = 3,
              transports: Sequence[str] = TRANSPORTS) -> list[HopRow]:
    """Median per-hop cost of each transport for each payload size (needs a connected Ray)."""
    unknown = set(transports) - set(TRANSPORTS)
    if unknown:
        raise ValueError(f"unknown transports {sorted(unknown)}; known: {list(TRANSPORTS)}")
    from ray.util.queue import Queue

    # Handles typed Any: Ray's stubs do not follow methods through ray.remote(cls).
    producer: Any = ray.remote(num_cpus=0)(_Producer).remote()
    consumer: Any = ray.remote(num_cpus=0)(_Consumer).remote()
    queue = Queue(maxsize=1)
    rows = []
    for nbytes in sizes:
        ms: dict[str, float] = {}
        for transport in transports:
            hops = []
            for r in range(warmup + rounds):
                if transport == "queue":
                    got = consumer.take_from.remote(queue)  # waiting on the queue before the put
                    ray.get(producer.put.remote(queue, nbytes))
                    sent, received = ray.get(got)
                else:
                    x, sent_ref = producer.emit.options(num_returns=2).remote(nbytes, transport == "torch-ref")
                    received = ray.get(consumer.take.remote(x))
                    sent = ray.get(sent_ref)
                if r >= warmup:
                    hops.append(received - sent)
            ms[transport] = 1000 * statistics.median(hops)
        ms["memcpy"] = 1000 * _memcpy(nbytes, rounds)
        ms["memcpy-new"] = 1000 * _memcpy(nbytes, rounds, fresh=True)
        rows.append(HopRow(nbytes, ms))
        logger.info("%s: %s", _size(nbytes), ms)
    for actor in (producer, consumer):
        ray.kill(actor)
    queue.shutdown()
    return rows


def _memcpy(nbytes: int, rounds: int, fresh: bool = False) -> float:
    """Median seconds to copy nbytes into a warm buffer, or (fresh) into a newly allocated one: large
    allocations are new pages from the kernel, so that copy also pays the page faults a write into memory
    not touched before does."""
    src = np.random.default_rng(0).random(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(rounds + 3):
        t = time.perf_counter()
        if fresh:
            dst = src.copy()
        else:
            np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    return statistics.median(times[3:])


def hop_table(rows: Sequence[HopRow]) -> str:
    names = [n for n in (*TRANSPORTS, "memcpy", "memcpy-new") if n in rows[0].ms]
    lines = ["| payload | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in rows:
        lines.append(f"| {_size(row.nbytes)} | " + " | ".join(_ms(row.ms[n]) for n in names) + " |")
    return "\n".join(lines)


def _size(nbytes: int) -> str:
    return f"{nbytes // MB} MB" if nbytes >= MB else f"{nbytes // KB} KB"


def _ms(ms: float) -> str:
    return f"{ms:.3f} ms" if ms < 0.1 else f"{ms:.2f} ms" if ms < 10 else f"{ms:.1f} ms"


# -- pipelining: S = 2 stages against the sequential loop -------------------------------------------------


@dataclass(frozen=True)
class ThroughputRow:
    engine: str  # what ran
    threads: str  # torch threads per process
    rates: tuple[float, ...]  # micro-batches per second of each repeat, steady state (no start-up)

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


class _SequentialLoop:
    """The sequential loop inside an actor, so that it runs with the stages' priority (Ray starts workers
    at niceness 15) and CPU reservation: a fair comparison even when something else loads the machine."""

    def rate(self, cfg: Any, spec: Any, sampler: Any, threads: int, warmup: int) -> float:
        from pipeline.engines import run_in_process

        torch.set_num_threads(threads)
        return _timed(run_in_process, cfg, spec, sampler, warmup)


def _timed(engine: Any, cfg: Any, spec: Any, sampler: Any, warmup: int) -> float:
    """Run an engine; micro-batches/s between the ends of micro-batch `warmup` and of the last one."""
    ends: dict[int, float] = {}
    engine(cfg, spec, sampler, lambda m, rows: ends.__setitem__(m, time.perf_counter()))
    last = max(ends)
    return (last - warmup) / (ends[last] - ends[warmup])


def throughput_comparison(data: str = "synthetic", layers: str = "conv:16,conv:64", layers_per_stage: int = 1,
                          steps: int = 120, warmup: int = 10, repeats: int = 3, clips: int = 16,
                          clip_len: int = 8, size: int = 32) -> list[ThroughputRow]:
    """Steady-state micro-batches/s of the sequential loop (1 and 2 threads, each in a Ray actor holding
    that many CPUs) and of the Ray pipeline (1-CPU, 1-thread stages): same network, data and micro-batches.

    The three run one after the other, `repeats` times over, interleaved, so that a drift in the machine's
    speed (a shared host) reaches all of them; the table reports medians. Start-up (Ray, actors) is
    excluded: each rate is taken between the ends of micro-batches `warmup` and `steps - 1`.
    """
    from pipeline.config import TrainConfig
    from pipeline.data import ClipSampler, load_videos
    from pipeline.ray_engine import connect, run_ray
    from workers.learner import stage_ranges

    if steps <= warmup + 1:
        raise ValueError(f"steps must exceed warmup + 1 (got steps={steps}, warmup={warmup})")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1 (got {repeats})")
    cfg = TrainConfig(data=data, layers=layers, steps=steps, clips=clips, clip_len=clip_len, size=size,
                      engine="ray", layers_per_stage=layers_per_stage, cpus_per_stage=1.0)
    videos = load_videos(cfg.data, cfg.size, "train")
    sampler = ClipSampler(videos, cfg.clips, cfg.clip_len, cfg.seed)
    spec = cfg.learner_spec(videos.frame_shape)
    n_stages = len(stage_ranges(cfg.n_layers, layers_per_stage))
    connect(cfg, max(2, n_stages))

    seq = dataclasses.replace(cfg, engine="sequential")
    rates: dict[tuple[str, str], list[float]] = {}
    for _ in range(repeats):
        for threads in (1, 2):
            loop: Any = ray.remote(num_cpus=threads)(_SequentialLoop).remote()
            rate = ray.get(loop.rate.remote(seq, spec, sampler, threads, warmup))
            rates.setdefault(("sequential loop", str(threads)), []).append(rate)
            ray.kill(loop)
        rates.setdefault((f"ray pipeline, {n_stages} stages", "1 per stage"), []).append(
            _timed(run_ray, cfg, spec, sampler, warmup))
    return [ThroughputRow(engine, threads, tuple(r)) for (engine, threads), r in rates.items()]


def throughput_table(rows: Sequence[ThroughputRow]) -> str:
    base = rows[0].median
    lines = ["| engine | torch threads | micro-batches/s, median (runs) | vs sequential, 1 thread |",
             "|---|---|---|---|"]
    lines += [f"| {r.engine} | {r.threads} | {r.median:.2f} ({', '.join(f'{x:.1f}' for x in r.rates)}) | "
              f"{r.median / base:.2f}x |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.transport", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="hops", choices=("hops", "throughput"))
    parser.add_argument("--sizes-kb", default="64,1024,16384", help="hops: payload sizes in KB")
    parser.add_argument("--rounds", type=int, default=20, help="hops: measured rounds per size and transport")
    parser.add_argument("--data", default="synthetic", help="throughput: data spec")
    parser.add_argument("--layers", default="conv:16,conv:64", help="throughput: network")
    parser.add_argument("--layers-per-stage", type=int, default=1, help="throughput: layers per stage")
    parser.add_argument("--steps", type=int, default=120, help="throughput: micro-batches per engine and run")
    parser.add_argument("--repeats", type=int, default=3, help="throughput: interleaved runs of each engine")
    parser.add_argument("--worker-niceness", type=int, default=None,
                        help="niceness of Ray's workers (Ray's default: 15); 0 keeps other, niced jobs on a "
                             "shared machine from taking the measured processes' CPU")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    system = {} if args.worker_niceness is None else {"worker_niceness": args.worker_niceness}
    # Logical CPUs: enough for one 1-CPU bundle per stage of a small network, whatever the core count.
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, _system_config=system)
    if args.what == "hops":
        sizes = [int(s) * KB for s in args.sizes_kb.split(",")]
        print(hop_table(hop_costs(sizes, args.rounds)))
    else:
        print(throughput_table(throughput_comparison(args.data, args.layers, args.layers_per_stage, args.steps,
                                                     repeats=args.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
