"""The conv weight's memory layout, measured: a stage's step with the default (N, C, H, W) layout against
channels-last (N, H, W, C), side by side in one process.

    python -m pipeline.bench.layout [--rounds 3] [--steps 20]

The bench's network (`lamina bench`), for each range of layers a stage of the S = 1, 2 and 4 splits
holds, at B = 4 and 16 clips, with one torch thread (a stage actor's budget) and with every core (the
sequential loop's): a step (forward, local loss, backward, Adam step, emit) of a stack built once per
layout and round, the layouts interleaved within every round. Reported: the median step over the rounds'
medians (warm-up steps left out) and channels-last's time as a fraction of the default's. Also the
largest difference between the two layouts' outputs after the first step: the same computation, rounded
differently at most.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence

import torch

from pipeline.allocator import keep_freed_memory
from pipeline.bench.measure import stage_input
from pipeline.bench.suite import QUICK, BenchConfig, learner_spec, split
from workers.learner import LearnerSpec, LearnerStack

LAYOUTS = {"default": torch.contiguous_format, "channels-last": torch.channels_last}


def _stack(spec: LearnerSpec, rng: tuple[int, int], layout: torch.memory_format) -> LearnerStack:
    stack = LearnerStack.layer_local(spec, *rng)
    for learner in stack.learners:
        learner.blocks.to(memory_format=layout)  # type: ignore[call-overload]  # only 4-d weights take it
    return stack


def run(cfg: BenchConfig, rounds: int, steps: int, warmup: int = 4) -> list[dict]:
    keep_freed_memory()  # as the stages run (pipeline/allocator.py)
    spec = learner_spec(cfg)
    n = len(cfg.layers.split(","))
    ranges = sorted({r for s in cfg.stages for r in split(n, s)})
    rows = []
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        for clips in (4, 16):
            for rng in ranges:
                times: dict[str, list[float]] = {name: [] for name in LAYOUTS}
                outs = {}
                for _ in range(rounds):
                    for name, layout in LAYOUTS.items():
                        stack = _stack(spec, rng, layout)
                        x = stage_input(spec, rng[0], clips, cfg.clip_len)
                        ts = []
                        for i in range(warmup + steps):
                            t = time.perf_counter()
                            y, _ = stack.step(x)
                            ts.append(time.perf_counter() - t)
                            if i == 0:
                                outs[name] = y
                        times[name].append(statistics.median(ts[warmup:]))
                med = {name: statistics.median(v) for name, v in times.items()}
                rows.append({"threads": threads, "clips": clips, "range": rng, "ms": {k: v * 1e3 for k, v in med.items()},
                             "ratio": med["channels-last"] / med["default"],
                             "max_diff": float((outs["channels-last"] - outs["default"]).abs().max())})
                print(_row(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _row(r: dict) -> str:
    first, last = r["range"]
    return (f"| {first + 1}-{last} | {r['clips']} | {r['threads']} | {r['ms']['default']:.1f} | "
            f"{r['ms']['channels-last']:.1f} | {r['ratio']:.2f} | {r['max_diff']:.1e} |")


def table(rows: list[dict]) -> str:
    head = ("| layers | B | torch threads | default layout (ms per step) | channels-last (ms per step) | "
            "channels-last / default | largest output difference after one step |\n|---|---|---|---|---|---|---|")
    return "\n".join([head, *(_row(r) for r in rows)])


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each layout once per round (default 3)")
    ap.add_argument("--steps", type=int, default=20, help="measured steps per stack (default 20)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        ap.error("--rounds and --steps must be >= 1")
    cfg = QUICK
    print(f"{cfg.layers}, frames {cfg.size}x{cfg.size}, T = {cfg.clip_len}; torch {torch.__version__}, "
          f"{os.cpu_count()} cores; medians of {args.rounds} rounds of {args.steps} steps\n")
    print(table(run(cfg, args.rounds, args.steps)))


if __name__ == "__main__":
    main()
