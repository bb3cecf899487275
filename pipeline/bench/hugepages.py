"""Huge pages for a stage's heap (pipeline/allocator.py `HUGE_PAGES`), measured: the bench's first stage
stepping in fresh processes with and without them, alone on one core and beside the bench's second stage on
the other.

    python -m pipeline.bench.hugepages [--rounds 6] [--steps 24]

Each round starts, for each setting in turn (the order alternating from round to round), a process with
the stage actors' environment (`WORKER_ENV`, with or without `HUGE_PAGES`) that steps the headline's first
stage (B = 16, one torch thread) on core 0 alone, then one beside a second process stepping the second
stage on core 1 without pause. Reported per round: the median step after 4 warm-up steps and the page
faults per step; then the medians over the rounds and the ratio of the two settings. A fresh process per
measurement, because the environment is read by glibc at a process's start.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from pipeline.allocator import HUGE_PAGES, WORKER_ENV

WARMUP = 4
SETTINGS = {"4 KiB pages": {k: v for k, v in WORKER_ENV.items() if k not in HUGE_PAGES}, "huge pages": WORKER_ENV}


def _step(core: int, first: int, last: int, steps: int) -> None:
    """In this process, on `core`: step the bench's layers [first, last) `steps` times (forever with 0) and
    print the median step (ms) and the minor page faults per step after the warm-up, as JSON."""
    os.sched_setaffinity(0, {core})  # before torch starts a thread: they all stay there
    import resource

    import torch

    from pipeline.allocator import keep_freed_memory
    from pipeline.bench.measure import stage_input
    from pipeline.bench.suite import QUICK, learner_spec
    from workers.learner import LearnerStack

    torch.set_num_threads(1)
    keep_freed_memory()  # as the stages run
    spec = learner_spec(QUICK)
    stack = LearnerStack.layer_local(spec, first, last)
    x = stage_input(spec, first, QUICK.clips, QUICK.clip_len)
    times, k = [], 0
    while not steps or k < steps:
        if k == WARMUP:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        stack.step(x)
        times.append(time.perf_counter() - t)
        k += 1
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    print(json.dumps({"ms": statistics.median(times[WARMUP:]) * 1e3, "faults": faults / (steps - WARMUP)}))


def _start(setting: str, core: int, rng: tuple[int, int], steps: int) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in WORKER_ENV} | SETTINGS[setting]
    return subprocess.Popen([sys.executable, "-m", "pipeline.bench.hugepages", "--step", str(core), str(rng[0]),
                             str(rng[1]), str(steps)], env=env, stdout=subprocess.PIPE, text=True)


def _result(p: subprocess.Popen[str]) -> dict[str, float]:
    out, _ = p.communicate()
    if p.returncode:
        raise RuntimeError(f"a measuring process failed (exit {p.returncode})")
    return json.loads(out)


def run(rounds: int, steps: int) -> list[dict[str, Any]]:
    from pipeline.bench.suite import QUICK, split

    first, second = split(len(QUICK.layers.split(",")), QUICK.headline_stages)[:2]
    cores = sorted(os.sched_getaffinity(0))
    rows = []
    for k in range(rounds):
        row: dict[str, Any] = {}
        for setting in list(SETTINGS)[:: -1 if k % 2 else 1]:
            alone = _result(_start(setting, cores[0], first, steps))
            row[setting] = {"alone_ms": alone["ms"], "faults": alone["faults"]}
            if len(cores) > 1:
                beside = _start(setting, cores[1], second, 0)
                try:
                    row[setting]["beside_ms"] = _result(_start(setting, cores[0], first, steps))["ms"]
                finally:
                    beside.kill()
                    beside.wait()
        rows.append(row)
        print(f"round {k + 1}/{rounds}: " + ", ".join(f"{s} {r['alone_ms']:.1f} ms" for s, r in row.items()),
              file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    small, huge = SETTINGS
    lines = [(f"| round | alone, {small} (ms) | alone, {huge} (ms) | beside the second stage, {small} (ms) | "
              f"beside, {huge} (ms) | page faults per step, {small} / {huge} |"), "|---|---|---|---|---|---|"]

    def ms(r: dict[str, float], key: str) -> str:
        return f"{r[key]:.1f}" if key in r else "-"

    for k, r in enumerate(rows, 1):
        lines.append(f"| {k} | {ms(r[small], 'alone_ms')} | {ms(r[huge], 'alone_ms')} | {ms(r[small], 'beside_ms')} | "
                     f"{ms(r[huge], 'beside_ms')} | {r[small]['faults']:.0f} / {r[huge]['faults']:.0f} |")
    summary = []
    for key, where in (("alone_ms", "alone"), ("beside_ms", "beside the second stage")):
        if all(key in r[s] for r in rows for s in SETTINGS):
            a, b = (statistics.median(r[s][key] for r in rows) for s in (small, huge))
            summary.append(f"{where}: {a:.1f} ms with {small}, {b:.1f} with {huge}, {b / a:.3f}x")
    return "\n".join(lines) + "\n\nMedians: " + "; ".join(summary) + "."


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="rounds, each setting once per round (default 6)")
    ap.add_argument("--steps", type=int, default=24, help=f"steps per measurement, {WARMUP} of them warm-up (default 24)")
    ap.add_argument("--step", nargs=4, type=int, help=argparse.SUPPRESS)  # a measuring process: core first last steps
    args = ap.parse_args(argv)
    if args.step:
        _step(*args.step)
        return
    if args.rounds < 1 or args.steps <= WARMUP:
        ap.error(f"--rounds must be >= 1 and --steps > {WARMUP}")
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read().strip()
    except OSError:
        thp = "not offered by this kernel"
    print(f"The bench's first stage (B = 16, 1 torch thread); transparent huge pages: {thp}; "
          f"{len(os.sched_getaffinity(0))} cores; {args.rounds} rounds of {args.steps} steps\n")
    print(table(run(args.rounds, args.steps)))


if __name__ == "__main__":
    main()
