"""Stages with slack giving way (pipeline/slack.py), measured: the same pipeline with and without, in pairs.

    python -m pipeline.bench.slack [--pairs 8] [--steps 40] [--transport shm] [--stages 2]

The bench's headline pipeline (S = 2 stages of its network by default, B = 16) twice: one set of stage actors with
`--yield-slack on`, one with `off`, both alive, run in turn, the order alternating from pair to pair, each
pair next to the stages' isolation step times measured just before it (`lamina bench`'s [Note: efficiency]).
Per pair: micro-batches/s, efficiency, how long the bottleneck stage's stepping thread waited for a core per
micro-batch, and the fraction of each stage's steps that gave way.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import ray

from pipeline.bench.measure import StageProbe, actor, pipeline_run
from pipeline.bench.suite import QUICK, BenchConfig, split


def run(cfg: BenchConfig, pairs: int, steps: int, transport: str, stages: int) -> list[dict[str, Any]]:
    """`pairs` pairs of pipeline runs of `cfg`'s network split into `stages`, on and off (module docstring)."""
    from pipeline.config import TrainConfig
    from pipeline.engines.placement import StageActors
    from pipeline.engines.ray_engine import RayPipeline
    from pipeline.sources import open_source

    n = len(cfg.layers.split(","))

    def train_cfg(give_way: str) -> TrainConfig:  # half a CPU per stage each: one set runs at a time
        return TrainConfig(data=cfg.data, layers=cfg.layers, clips=cfg.clips, clip_len=cfg.clip_len, size=cfg.size,
                           steps=10**9, layers_per_stage=n // stages, queue_depth=cfg.queue_depth,
                           cpus_per_stage=0.5, transport=transport, yield_slack=give_way)

    source = open_source(cfg.data, cfg.size, cfg.clips, cfg.clip_len, 0)
    spec = train_cfg("on").learner_spec(source.frame_shape)
    probe = actor(StageProbe)(cfg, spec, cfg.clips, 1)
    rows: list[dict[str, Any]] = []
    with StageActors(train_cfg("on"), spec) as on, StageActors(train_cfg("off"), spec) as off:
        pipes = {"on": RayPipeline(on), "off": RayPipeline(off)}
        start = {"on": 0, "off": 0}
        for k in range(pairs):
            t_iso = max(ray.get(probe.measure.remote(r))["step_s"] for r in split(n, stages))
            row: dict[str, Any] = {"t_iso_s": t_iso}
            for way in ("on", "off") if k % 2 else ("off", "on"):
                got = pipeline_run(pipes[way], source, start[way], cfg.warmup, steps)
                start[way] += cfg.warmup + steps + 1
                b = max(range(stages), key=lambda j: got["busy_s"][j])
                row[way] = {"rate": got["rate"], "efficiency": got["rate"] * t_iso,
                            "wait_ms": got["step_wait_per_mb_s"][b] * 1e3,
                            "giving_way": got["giving_way"]}
            rows.append(row)
            logging.getLogger(__name__).info("pair %d/%d: on / off %.3f", k + 1, pairs,
                                             row["on"]["rate"] / row["off"]["rate"])
    ray.kill(probe)
    return rows


def table(rows: Sequence[dict[str, Any]], cfg: BenchConfig, transport: str, stages: int) -> str:
    med = statistics.median
    ratios = [r["on"]["rate"] / r["off"]["rate"] for r in rows]
    lines = [(f"## Stages with slack giving way: --yield-slack on against off (S = {stages}, B = {cfg.clips}, "
             f"--transport {transport}, {len(rows)} pairs)"), "",
             ("| pair | t_iso (ms) | mb/s on / off | on / off | efficiency on / off | bottleneck waiting for a core, "
             "ms per micro-batch, on / off | steps given way, per stage, on |"), "|---|---|---|---|---|---|---|"]
    for k, (r, q) in enumerate(zip(rows, ratios, strict=True)):
        on, off = r["on"], r["off"]
        lines.append(f"| {k + 1} | {r['t_iso_s'] * 1e3:.1f} | {on['rate']:.2f} / {off['rate']:.2f} | {q:.3f} | "
                     f"{on['efficiency']:.3f} / {off['efficiency']:.3f} | {on['wait_ms']:.2f} / {off['wait_ms']:.2f} | "
                     f"{' / '.join(f'{g:.2f}' for g in on['giving_way'])} |")
    lines += ["", (f"on / off: median {med(ratios):.3f}, on ahead in {sum(q > 1 for q in ratios)} of {len(rows)}; "
              f"efficiency median {med(r['on']['efficiency'] for r in rows):.3f} on, "
              f"{med(r['off']['efficiency'] for r in rows):.3f} off; the bottleneck waited "
              f"{med(r['on']['wait_ms'] for r in rows):.2f} ms per micro-batch on, "
              f"{med(r['off']['wait_ms'] for r in rows):.2f} off (medians)")]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.slack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=8, help="pairs of runs, on and off")
    parser.add_argument("--steps", type=int, default=40, help="steady-state micro-batches per run")
    parser.add_argument("--transport", default="shm", help="the stages' --transport")
    parser.add_argument("--stages", type=int, default=QUICK.headline_stages, help="S, a divisor of the 4 layers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.pairs < 1 or args.steps < 2:
        parser.error(f"need --pairs >= 1 and --steps >= 2 (got {args.pairs}, {args.steps})")
    # Workers at niceness 0, as `lamina bench` runs them (PERFLOG.md, F3).
    ray.init(address="local", num_cpus=max(QUICK.cores, args.stages), include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, _system_config={"worker_niceness": 0})
    rows = run(QUICK, args.pairs, args.steps, args.transport, args.stages)
    ray.shutdown()
    print(table(rows, QUICK, args.transport, args.stages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
