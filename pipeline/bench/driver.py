"""The driver at scale: its CPU per micro-batch, per transport, and where it becomes the bottleneck.

    python -m pipeline.bench.driver [--stages 2,4,8] [--steps 150] [--transports object-store,shm,...]

Every micro-batch costs the driver work per stage: the object-store transport submits one actor call and
takes one report per stage (two RPCs' worth of Python and core-worker work); Direct Transport makes two
calls per stage (the step, and `take_report` behind it) and takes the report, and Ray's driver also orders
each tensor's send and receive between the two stages; the
compiled-graph transport writes one message into the graph and reads one result per stage from shared
memory; the shm transport writes one message into stage 0's channel and reads one result per stage from a
FIFO. The stages do almost nothing (a 4-unit MLP per layer on 4x4 frames).

[Note: a paced driver]
A driver that waits for a result may spend CPU waiting: a compiled graph's reads spin (Ray's channel read
yields and retries until the result is there), so an unpaced driver's CPU is its wall time, not its work.
So each S is run twice: unpaced (the wall time per micro-batch the stages allow), then paced: the driver
sleeps, after each micro-batch's reports, three times that wall time, long enough for every micro-batch
in flight to get through, so that it finds every result already there and never waits. Its CPU time
(time.process_time of the driver process, steady state) per micro-batch is then what it costs to drive S
stages, and "awake" (its wall time less the sleeps) shows that it did not wait. A line through S gives the
fixed part `a` and the part per stage `b`; the driver keeps up while rate x (a + b S) < 1 core, so the rate
at which it becomes the bottleneck is 1 / (a + b S), printed for 8, 64 and 256 stages.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

PACE = 3  # the paced driver's sleep per micro-batch, in unpaced wall times per micro-batch
TRANSPORTS = ("object-store", "shm", "direct", "compiled-graph")


def driver_cost(stages: int, transport: str, steps: int, warmup: int, data: str, pace_s: float = 0.0,
                ) -> dict[str, float]:
    """Driver CPU seconds, wall seconds and wall seconds awake (the wall less its sleeps) per micro-batch for
    `stages` trivial stages, the driver sleeping `pace_s` after each micro-batch ([Note: a paced driver])."""
    from pipeline.config import TrainConfig
    from pipeline.engines.placement import StageActors
    from pipeline.engines.ray_engine import RayPipeline
    from pipeline.sources import open_source

    layers = ",".join(["mlp:4"] * stages)
    cfg = TrainConfig(data=data, layers=layers, size=4, clips=2, clip_len=2, steps=warmup + steps + 1,
                      head=None, cpus_per_stage=0.01, transport=transport, checkpoint_every=0)
    source = open_source(cfg.data, cfg.size, cfg.clips, cfg.clip_len, 0)
    spec = cfg.learner_spec(source.frame_shape)
    marks: dict[int, tuple[float, float]] = {}

    def on_step(m: int, reports: list[Any]) -> None:
        if m in (warmup, warmup + steps):
            marks[m] = (time.process_time(), time.perf_counter())
        if pace_s:
            time.sleep(pace_s)

    with StageActors(cfg, spec) as actors:
        RayPipeline(actors).train(source, 0, cfg.steps, on_step)
    (c0, w0), (c1, w1) = marks[warmup], marks[warmup + steps]
    return {"cpu_per_mb_s": (c1 - c0) / steps, "wall_per_mb_s": (w1 - w0) / steps,
            "awake_per_mb_s": (w1 - w0) / steps - pace_s}


def paced(stages: int, transport: str, steps: int, warmup: int, data: str) -> dict[str, float]:
    """`stages` trivial stages run unpaced, then paced ([Note: a paced driver]): the unpaced wall time per
    micro-batch, and the paced driver's CPU and time awake per micro-batch."""
    free = driver_cost(stages, transport, steps, warmup, data)
    slow = driver_cost(stages, transport, steps, warmup, data, pace_s=PACE * free["wall_per_mb_s"])
    return {"wall_per_mb_s": free["wall_per_mb_s"], "unpaced_cpu_per_mb_s": free["cpu_per_mb_s"],
            "cpu_per_mb_s": slow["cpu_per_mb_s"], "awake_per_mb_s": slow["awake_per_mb_s"]}


def fit(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares a + b S through (S, cost) points."""
    s = np.array([p[0] for p in points], dtype=float)
    c = np.array([p[1] for p in points], dtype=float)
    b, a = np.polyfit(s, c, 1) if len(points) > 1 else (c[0] / s[0], 0.0)
    return float(a), float(b)


def tiny_data(folder: str) -> str:
    """A data spec for the trivial stages: 4 clips of 8 frames of 4x4 in an npz file written in `folder`."""
    path = os.path.join(folder, "tiny.npz")
    rng = np.random.default_rng(0)
    np.savez(path, frames=rng.integers(0, 256, (4, 8, 4, 4), dtype=np.uint8), labels=np.arange(4))
    return f"npz:{path}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.driver", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="2,4,8", help="stage counts to measure")
    parser.add_argument("--steps", type=int, default=150, help="steady-state micro-batches per measurement")
    parser.add_argument("--transports", default=",".join(TRANSPORTS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import ray

    counts = [int(s) for s in args.stages.split(",")]
    ray.init(address="local", num_cpus=max(2, max(counts)), include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        data = tiny_data(tmp)
        rows = {t: {s: paced(s, t, args.steps, 10, data) for s in counts} for t in args.transports.split(",")}
    ray.shutdown()
    print(table(rows, args.steps))
    return 0


def table(rows: dict[str, dict[int, dict[str, float]]], steps: int) -> str:
    """The measurements and, per transport, the fit and the stage counts x rates the driver can drive."""
    out = [f"## The driver at scale: trivial stages, {steps} micro-batches per run", "",
           ("| transport | S | unpaced: wall per micro-batch (ms) | unpaced: driver CPU (ms) "
            "| paced: driver CPU per micro-batch (ms) | paced: driver awake (ms) |"), "|---|---|---|---|---|---|"]
    for t, by_s in rows.items():
        out += [f"| {t} | {s} | {r['wall_per_mb_s'] * 1e3:.2f} | {r['unpaced_cpu_per_mb_s'] * 1e3:.2f} "
                f"| {r['cpu_per_mb_s'] * 1e3:.2f} | {r['awake_per_mb_s'] * 1e3:.2f} |" for s, r in by_s.items()]
    out += ["", "| transport | fixed a (ms) | per stage b (ms) | driver-bound micro-batches/s at S = 8 / 64 / 256 |",
            "|---|---|---|---|"]
    for t, by_s in rows.items():
        a, b = fit([(s, r["cpu_per_mb_s"]) for s, r in by_s.items()])
        limits = " / ".join(f"{1 / (a + b * s):.0f}" if a + b * s > 0 else "n/a (the fit is noise)"
                            for s in (8, 64, 256))
        out.append(f"| {t} | {a * 1e3:.2f} | {b * 1e3:.3f} | {limits} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
