"""`lamina bench`: how close the Ray pipeline gets to the ideal, side by side in one run.

Every number below is a steady-state rate or a median, measured in this one run, so that a shared,
drifting machine reaches the compared things alike (the headline comparison is repeated, interleaved).

[Note: efficiency]
    t_iso[k]   stage k's step (forward, local loss, backward, optimizer step, emit) timed in a Ray worker
               process of its own, 1 torch thread (the stage actor's budget), nothing else of the bench
               running: the stage's step time in isolation on the same resources. Median over steps after
               warm-up. No Ray call, no transport: pure compute.
    rate       the pipeline's steady-state micro-batches/s: (last - w) / (end of last - end of w), ends as
               the driver sees them (on_step), w = the warm-up micro-batches (Ray start, actor start and the
               fill of S - 1 micro-batches are outside the window).
    efficiency = rate * max_k t_iso[k]       1.0: the slowest stage never waits and runs as fast as alone.

It factors into two numbers measured in the same pipeline run (from the stages' busy intervals):
    efficiency = (max t_iso / t_busy[b]) * (rate * t_busy[b])      b = the stage with the longest busy time
               = 1 / compute slowdown   *  busy fraction of the bottleneck
The slowdown is the machine (two compute processes sharing 2 vCPUs with Ray's own processes, the driver and
other tenants); the busy fraction is the pipeline (Ray call overhead, serialisation, the driver's latency).
`co-run` times every stage of the split stepping at once in separate processes with no transport at all:
the slowdown the machine alone imposes.

Speed-ups compare micro-batches/s (equal micro-batches, so also samples/s) against the sequential
layer-local loop and against end-to-end backprop of the same network and objective (one learner holding
every block, the objective on the top one), both in one process with `cores` torch threads: the same total
cores as S one-CPU stages when S = cores, each thread bound to a core of its own (BOUND_ENV in measure.py:
the loops at their best). With S > cores (S = 4 here) the stages are oversubscribed: four 1-thread
processes time-share 2 cores, so each runs at most at half speed and the ideal rate is
min(1 / max t_iso, cores / sum t_iso).

Peak memory: inside a fresh Ray worker, RSS high-water mark (VmHWM, reset through /proc/self/clear_refs
after warm-up) minus the RSS before the stage was built: weights, gradients, Adam state, the activations
its backward keeps, the input. Same for end-to-end backprop of the whole network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch

from pipeline.bench.measure import BOUND_ENV, Loop, StageProbe, actor, idle_cores, pipeline_run
from pipeline.bench.report import write
from pipeline.bench.sources import SOURCES_FULL, SOURCES_QUICK, SourceBenchConfig, run_sources
from pipeline.bench.summary import headline, hop_dict, marginal
from pipeline.bench.transport import SIZES, TRANSPORTS, hop_costs
from pipeline.errors import ConfigError, StageLost

if TYPE_CHECKING:
    from pipeline.engines.ray_engine import RayPipeline
    from workers.learner import LearnerSpec

logger = logging.getLogger(__name__)

Range = tuple[int, int]


@dataclass(frozen=True)
class BenchConfig:
    layers: str = "conv:32,conv:64,conv:128,mlp:256"  # 4 layers: S = 1, 2, 4 stages hold 4, 2, 1 each
    data: str = "synthetic"  # data spec (the embedded generator: no files needed)
    clips: int = 16  # B of the headline comparison: DESIGN's realistic micro-batch, 16 clips x 8 frames
    clip_len: int = 8  # T
    size: int = 32  # frame side
    headline_stages: int = 2  # S of the headline comparison (the 2-core machine: one core per stage)
    stages: tuple[int, ...] = (1, 2, 4)  # S of the scaling table
    scaling_clips: tuple[int, ...] = (4, 16)  # micro-batch sizes B of the scaling table
    warmup: int = 4  # micro-batches left out of every steady-state rate (start-up, pipeline fill)
    steps: int = 16  # steady-state micro-batches per measured run
    repeats: int = 3  # interleaved repeats of the headline comparison (medians reported)
    queue_depth: int = 2  # the pipeline's channel depth
    hop_sizes: tuple[int, ...] = SIZES  # activation sizes of the per-hop measurement
    hop_rounds: int = 8  # measured hops per size and transport
    transports: tuple[str, ...] = ("numpy-ref", "direct", "compiled-graph", "shm", "shm-in-place", "wake")  # per-hop: the engine's transports; full adds all
    # --transport values the headline pipeline runs with, side by side in every repeat (the first is the
    # headline's own numbers and the one the scaling and replica runs use: `auto`'s pick on the cpu)
    pipeline_transports: tuple[str, ...] = ("shm", "object-store", "direct", "compiled-graph")
    balance: bool = True  # also run the headline's S split by measured layer times (--balance auto)
    replicas: tuple[int, ...] = (1, 2)  # R of the replica section: the whole network as one stage of R replicas
    worker_niceness: int = 0  # niceness of Ray's workers when the bench starts Ray (Ray's default: 15)
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)  # threads of the in-process baselines
    sources: SourceBenchConfig | None = None  # the source throughput section (pipeline/bench/sources.py); None: off

    def __post_init__(self) -> None:
        n = len(self.layers.split(","))
        for s in (*self.stages, self.headline_stages):
            if s < 1 or n % s:
                raise ValueError(f"stages must divide the {n} layers evenly (got {s})")
        if self.warmup < 2 or self.steps < 2 or self.repeats < 1:
            raise ValueError(f"need warmup >= 2, steps >= 2, repeats >= 1 (got {self.warmup}, "
                             f"{self.steps}, {self.repeats})")


QUICK = BenchConfig(warmup=3, steps=12, repeats=5, hop_rounds=15, sources=SOURCES_QUICK)
FULL = BenchConfig(scaling_clips=(4, 16, 64), warmup=5, steps=40, repeats=5, hop_rounds=20, sources=SOURCES_FULL,
                   transports=TRANSPORTS)


def learner_spec(cfg: BenchConfig) -> LearnerSpec:
    """The bench's network as a learner spec, on the frames its data gives (for the benches of one step)."""
    from pipeline.config import TrainConfig
    from pipeline.sources import open_source

    frames = open_source(cfg.data, cfg.size, cfg.clips, cfg.clip_len, 0).frame_shape
    return TrainConfig(data=cfg.data, layers=cfg.layers, clip_len=cfg.clip_len, size=cfg.size).learner_spec(frames)


def split(n_layers: int, stages: int) -> list[Range]:
    per = n_layers // stages
    return [(k, k + per) for k in range(0, n_layers, per)]


# -- the bench --------------------------------------------------------------------------------------------


def run_or_rerun(pipe: RayPipeline, fresh: Callable[[], RayPipeline], lost: list[str],
                 run: Callable[[RayPipeline], dict[str, Any]]) -> tuple[RayPipeline, dict[str, Any]]:
    """run(pipe), or, when a stage is lost in it, run(fresh()) once on new stage actors, the loss appended to
    `lost`: the pipeline and what the run measured. Under load one of Ray's Direct Transport transfers can fail
    on its own (Ray gives up on it after 60 s); the driver sees a lost stage, and a bench without a checkpoint
    store has nothing to recover from."""
    try:
        return pipe, run(pipe)
    except StageLost as e:
        lost.append(str(e))
        logger.warning("%s; the run starts again on new stage actors", e)
        pipe.actors.close()
        pipe = fresh()
        return pipe, run(pipe)


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Every measurement of `lamina bench`; a JSON-able dict (see `format_tables`)."""
    from pipeline.config import TrainConfig
    from pipeline.engines.placement import StageActors
    from pipeline.engines.ray_engine import RayPipeline
    from pipeline.sources import Source, open_source

    t_start = time.perf_counter()
    if not ray.is_initialized():
        # Logical CPUs: one 1-CPU bundle for each of up to max(stages) stages, whatever the cores.
        # Workers at niceness 0 rather than Ray's 15 (PERFLOG.md, F3): the driver, Ray's daemons and any other
        # tenant run at 0, and niced stages would lose every contended core to them (CFS weight 36 vs 1024).
        ray.init(address="local", num_cpus=max(cfg.cores, *cfg.stages, 3 if cfg.sources else 1), include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False, _system_config={"worker_niceness": cfg.worker_niceness})
    n_layers = len(cfg.layers.split(","))
    sources: dict[int, Source] = {}  # one per micro-batch size: any data spec, streamed ones too
    total = cfg.warmup + cfg.steps + 1

    def train_cfg(clips: int, engine: str, stages: int = 1, transport: str = cfg.pipeline_transports[0],
                  replicas: int = 1, cpus: float = 1.0) -> TrainConfig:
        return TrainConfig(data=cfg.data, layers=cfg.layers, clips=clips, clip_len=cfg.clip_len, size=cfg.size,
                           steps=total, engine=engine, layers_per_stage=n_layers // stages,
                           queue_depth=cfg.queue_depth, cpus_per_stage=cpus, transport=transport,
                           replicas=str(replicas))

    def sampler(clips: int) -> Source:
        if clips not in sources:
            sources[clips] = open_source(cfg.data, cfg.size, clips, cfg.clip_len, 0)
        return sources[clips]

    spec = train_cfg(cfg.clips, "ray").learner_spec(sampler(cfg.clips).frame_shape)
    loop = actor(Loop, BOUND_ENV)()
    results: dict[str, Any] = {"config": dataclasses.asdict(cfg), "machine": _machine()}

    # 1. Isolation step times and peak memory of every range any split needs, and of e2e, per micro-batch size.
    ranges = sorted({r for s in cfg.stages for r in split(n_layers, s)} | set(split(n_layers, cfg.headline_stages))
                    | ({(0, n_layers)} if cfg.replicas else set()))
    iso: dict[int, dict[Range, float]] = {}
    memory: dict[int, dict[str, float]] = {}
    for clips in sorted({*cfg.scaling_clips, cfg.clips}):
        progress(f"isolation step times, B={clips}")
        probe = actor(StageProbe)(cfg, spec, clips, 1)
        got = ray.get([probe.measure.remote(r) for r in ranges] + [probe.measure.remote((0, n_layers), True)])
        ray.kill(probe)
        iso[clips] = {tuple(g["range"]): g["step_s"] for g in got if not g["e2e"]}  # type: ignore[misc]
        memory[clips] = {f"{'e2e' if g['e2e'] else 'layers'} {g['range'][0]}-{g['range'][1] - 1}": g["peak_mb"]
                         for g in got}

    def baselines(clips: int) -> dict[str, float]:
        s = sampler(clips)
        out = {}
        for engine, threads in (("sequential", 1), ("sequential", cfg.cores), ("e2e", cfg.cores)):
            out[f"{engine} {threads}t"] = ray.get(loop.rate.remote(train_cfg(clips, engine), spec, s, threads,
                                                                   cfg.warmup))
        return out

    # 2. The headline: S stages at B, each repeat next to its own isolation times, a co-run of the same
    # stages and the baselines. The stage actors start once and stay: a repeat trains on where the last one
    # stopped (the timing does not depend on the weights), so no repeat pays Ray's actor start.
    s_head, b_head = cfg.headline_stages, cfg.clips
    head_split = split(n_layers, s_head)
    iso_probe = actor(StageProbe)(cfg, spec, b_head, 1)
    corun_probes = [iso_probe, *(actor(StageProbe)(cfg, spec, b_head, 1) for _ in head_split[1:])]
    runs: list[dict[str, Any]] = []
    idle: dict[str, float] = {}  # transport -> cores its stage actors use while waiting for work
    # One set of stage actors per transport (the compiled graph's: started for each run, below), used in
    # turn: as only one set runs at a time, each reserves its share of a CPU per stage (the thread budget
    # stays 1: pipeline/engines/actors.py).
    share = 1 / len(cfg.pipeline_transports)
    lost: dict[str, list[str]] = {}  # transport -> why each repeat it ran again on new stage actors lost a stage

    def fresh(t: str, within: contextlib.ExitStack) -> RayPipeline:
        return RayPipeline(within.enter_context(StageActors(train_cfg(b_head, "ray", s_head, t, cpus=share), spec)))

    def measured(t: str, pipe: RayPipeline, within: contextlib.ExitStack, start: int) -> tuple[RayPipeline, dict]:
        return run_or_rerun(pipe, lambda: fresh(t, within), lost.setdefault(t, []),
                            lambda p: pipeline_run(p, sampler(b_head), start, cfg.warmup, cfg.steps))

    with contextlib.ExitStack() as stack:
        pipes = {t: fresh(t, stack) for t in cfg.pipeline_transports if t != "compiled-graph"}
        for r in range(cfg.repeats):
            progress(f"headline S={s_head}, B={b_head}: repeat {r + 1}/{cfg.repeats}")
            alone = [ray.get(iso_probe.measure.remote(rng)) for rng in head_split]  # one after the other
            run: dict[str, Any] = {"t_iso_s": [g["step_s"] for g in alone], "cpu_iso_s": [g["cpu_s"] for g in alone]}
            run["pipelines"] = {}
            for t in cfg.pipeline_transports:
                with contextlib.ExitStack() as own:
                    # An idle compiled graph's stage loops poll their channels, about a core each (the idle
                    # column): its actors are started for its run and killed after it, so that they take no
                    # CPU from the other transports' runs and the measurements in between.
                    pipe, run["pipelines"][t] = measured(t, pipes[t] if t in pipes else fresh(t, own),
                                                         stack if t in pipes else own, r * total)
                    if t in pipes:
                        pipes[t] = pipe
                    if r + 1 == cfg.repeats:
                        idle[t] = idle_cores(pipe.actors)
            run["pipeline"] = run["pipelines"][cfg.pipeline_transports[0]]
            run["corun_s"] = [g["step_s"] for g in ray.get(
                [p.measure.remote(rng, False, 2, cfg.steps) for p, rng in zip(corun_probes, head_split, strict=True)])]
            run["baselines"] = baselines(b_head)
            runs.append(run)
    results["headline"] = headline(runs, s_head, b_head, cfg.cores)
    results["by_transport"] = {t: {**headline([{**r, "pipeline": r["pipelines"][t]} for r in runs], s_head, b_head,
                                              cfg.cores), "idle_cores": idle[t], "lost": lost[t]}
                               for t in cfg.pipeline_transports}
    # 2b. Balance: the headline's S by measured layer times (--balance auto) against the even split, with the
    # slowest / mean stage of each, and one pipeline run of the balanced split (its own actors, measured right
    # after the even split's last repeat).
    if cfg.balance:
        from pipeline.engines.balance import imbalance, measure_layers, partition_by_cost, stage_bytes

        progress(f"balance S={s_head}, B={b_head}")
        per_layer = [g["step_s"] for g in ray.get([iso_probe.measure.remote((k, k + 1)) for k in range(n_layers)])]
        balanced = partition_by_cost(per_layer, s_head)
        held = measure_layers(spec, b_head, cfg.clip_len, steps=1)  # each layer's memory (its times: above)
        t_bal = [g["step_s"] for g in ray.get([iso_probe.measure.remote(r) for r in balanced])]
        # With the transport that was fastest in the headline: the even row is its number from there.
        best = max(results["by_transport"], key=lambda t: results["by_transport"][t]["rate"])
        bal_cfg = dataclasses.replace(train_cfg(b_head, "ray", s_head, best), balance="auto")
        with StageActors(bal_cfg, spec) as actors:
            bal_run = pipeline_run(RayPipeline(actors), sampler(b_head), 0, cfg.warmup, cfg.steps)
            ranges_run = list(actors.ranges)
        base = results["headline"]["baselines"]
        results["balance"] = {
            "transport": best,
            "per_layer_s": per_layer, "even": head_split, "balanced": balanced, "balanced_in_run": ranges_run,
            "even_imbalance": imbalance(per_layer, head_split), "balanced_imbalance": imbalance(per_layer, balanced),
            "even_stage_mb": [stage_bytes(held[a:b]) / 1e6 for a, b in head_split],
            "balanced_stage_mb": [stage_bytes(held[a:b]) / 1e6 for a, b in balanced],
            "even_t_iso_s": results["headline"]["t_iso_s"], "balanced_t_iso_s": t_bal,
            "even_busy_s": results["by_transport"][best]["busy_s"], "balanced_busy_s": bal_run["busy_s"],
            "even_rate": results["by_transport"][best]["rate"], "balanced_rate": bal_run["rate"],
            "balanced_efficiency": bal_run["rate"] * max(t_bal),
            "balanced_busy_fraction": max(bal_run["busy_fraction"]),
            "balanced_vs_sequential": {k: bal_run["rate"] / v for k, v in base.items() if k.startswith("sequential")}}
    for p in corun_probes:
        ray.kill(p)
    results["headline_runs"] = runs
    # 2c. Replicas: the whole network as one stage (S = 1) of R data-parallel replicas, 1 CPU each, each R
    # measured in turn right after the other; R = 1 is the same stage alone in a pipeline.
    if cfg.replicas:
        base = results["headline"]["baselines"]
        rows = []
        for r in cfg.replicas:
            progress(f"replicas R={r}, S=1, B={b_head}")
            with StageActors(train_cfg(b_head, "ray", 1, replicas=r), spec) as actors:
                rate = pipeline_run(RayPipeline(actors), sampler(b_head), 0, cfg.warmup, cfg.steps)["rate"]
            rows.append({"replicas": r, "rate": rate,
                         "vs_sequential": {k: rate / v for k, v in base.items() if k.startswith("sequential")}})
        for row in rows:  # data-parallel efficiency: R replicas against R times one
            row["scaling_efficiency"] = row["rate"] / (row["replicas"] * rows[0]["rate"] / rows[0]["replicas"])
        results["replicas"] = {"clips": b_head, "t_iso_s": iso[b_head][(0, n_layers)], "rows": rows}

    # 3. Scaling over S and B (one run each, isolation times from step 1; the headline's S and B reuse its
    # medians).
    scaling = []
    for clips in cfg.scaling_clips:
        base = results["headline"]["baselines"] if clips == b_head else baselines(clips)
        for s in cfg.stages:
            t_iso = [iso[clips][r] for r in split(n_layers, s)]
            if (s, clips) == (s_head, b_head):
                rate, t_iso = results["headline"]["rate"], results["headline"]["t_iso_s"]
            else:
                progress(f"scaling S={s}, B={clips}")
                with StageActors(train_cfg(clips, "ray", s), spec) as actors:
                    rate = pipeline_run(RayPipeline(actors), sampler(clips), 0, cfg.warmup, cfg.steps)["rate"]
            ideal = min(1 / max(t_iso), cfg.cores / sum(t_iso))  # [Note: efficiency], oversubscription
            scaling.append({"stages": s, "clips": clips, "rate": rate, "t_iso_s": t_iso, "ideal": ideal,
                            "efficiency": rate * max(t_iso), "efficiency_vs_ideal": rate / ideal,
                            "vs_sequential": rate / base[f"sequential {cfg.cores}t"],
                            "vs_sequential_1t": rate / base["sequential 1t"],
                            "vs_e2e": rate / base[f"e2e {cfg.cores}t"], "baselines": base})
    results["scaling"] = scaling
    ray.kill(loop)

    # 4. Memory per stage against end-to-end backprop, at B.
    results["memory"] = memory

    # 5. Per-hop transport against memcpy.
    progress("per-hop transport")
    hops = hop_costs(cfg.hop_sizes, cfg.hop_rounds, warmup=2, transports=cfg.transports)
    results["hops"] = [hop_dict(h) for h in hops]
    results["hop_marginal"] = marginal(hops)
    # 6. Source throughput against what the pipeline consumes ([Note: the source is not the bottleneck]).
    if cfg.sources is not None:
        results["sources"] = run_sources(cfg.sources, progress=progress)
    results["elapsed_s"] = time.perf_counter() - t_start
    return results


def _machine() -> dict[str, Any]:
    return {"cores": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
            "numpy": np.__version__, "load_avg_at_start": os.getloadavg()}


def bench_config(quick: bool, transports: str = "", repeats: int = 0, headline_only: bool = False) -> BenchConfig:
    """The quick or full bench, with the transports side by side and the repeats given (empty, 0: the mode's
    own); `headline_only` leaves out the balance, replicas and sources sections and
    keeps the scaling table's headline row only."""
    from pipeline.engines.transport import TRANSPORTS as ENGINE

    cfg = QUICK if quick else FULL
    if transports:
        names = tuple(t.strip() for t in transports.split(","))
        unknown = [t for t in names if t not in ENGINE]
        if unknown:
            raise ConfigError(f"--transports: unknown {unknown}; known: {list(ENGINE)}")
        cfg = dataclasses.replace(cfg, pipeline_transports=names)
    if repeats < 0:
        raise ConfigError(f"--repeats must be >= 1 (got {repeats})")
    if repeats:
        cfg = dataclasses.replace(cfg, repeats=repeats)
    if headline_only:
        cfg = dataclasses.replace(cfg, stages=(cfg.headline_stages,), scaling_clips=(cfg.clips,), balance=False,
                                  replicas=(), sources=None)
    return cfg


def main(quick: bool, out: str, transports: str = "", repeats: int = 0, headline_only: bool = False) -> str:
    cfg = bench_config(quick, transports, repeats, headline_only)
    res = run_bench(cfg)
    return write(res, Path(out))
