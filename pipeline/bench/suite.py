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
cores as S one-CPU stages when S = cores. With S > cores (S = 4 here) the stages are oversubscribed: four
1-thread processes time-share 2 cores, so each runs at most at half speed and the ideal rate is
min(1 / max t_iso, cores / sum t_iso).

Peak memory: inside a fresh Ray worker, RSS high-water mark (VmHWM, reset through /proc/self/clear_refs
after warm-up) minus the RSS before the stage was built: weights, gradients, Adam state, the activations
its backward keeps, the input. Same for end-to-end backprop of the whole network.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from pipeline.bench.transport import KB, MB, SIZES, TRANSPORTS, HopRow, hop_costs

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
    transports: tuple[str, ...] = ("numpy-ref",)  # the engine's transport; the full bench adds the others
    worker_niceness: int = 0  # niceness of Ray's workers when the bench starts Ray (Ray's default: 15)
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)  # threads of the in-process baselines

    def __post_init__(self) -> None:
        n = len(self.layers.split(","))
        for s in (*self.stages, self.headline_stages):
            if s < 1 or n % s:
                raise ValueError(f"stages must divide the {n} layers evenly (got {s})")
        if self.warmup < 2 or self.steps < 2 or self.repeats < 1:
            raise ValueError(f"need warmup >= 2, steps >= 2, repeats >= 1 (got {self.warmup}, "
                             f"{self.steps}, {self.repeats})")


QUICK = BenchConfig(warmup=3, steps=12, hop_rounds=15)
FULL = BenchConfig(scaling_clips=(4, 16, 64), warmup=5, steps=40, repeats=5, hop_rounds=20,
                   transports=TRANSPORTS)


def split(n_layers: int, stages: int) -> list[Range]:
    per = n_layers // stages
    return [(k, k + per) for k in range(0, n_layers, per)]


# -- measuring processes (plain classes, made Ray actors in `_actor`) -----------------------------------


def _rss_kb(field_name: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _reset_peak() -> None:
    """Set VmHWM back to the current RSS (Linux >= 4.0); the peak then covers only what follows."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class _StageProbe:
    """Times stage steps with no pipeline around them, one range of layers after another, and measures
    each one's peak memory. One torch thread per stage, as the stage actors run."""

    def __init__(self, cfg: BenchConfig, spec: Any, clips: int, threads: int) -> None:
        torch.set_num_threads(threads)
        self.cfg, self.spec, self.clips = cfg, spec, clips
        # The first stage built in a process pays one-time costs (kernel caches, allocator arenas) that
        # would count towards its peak: pay them here, outside any measurement.
        self.measure((0, 1), warmup=1, steps=1)

    def measure(self, rng: Range, e2e: bool = False, warmup: int | None = None, steps: int | None = None,
                ) -> dict[str, Any]:
        from workers.layers import normalise, output_shapes
        from workers.learner import LocalLearner, Stage

        warmup = self.cfg.warmup if warmup is None else warmup
        steps = self.cfg.steps if steps is None else steps
        gc.collect()
        _malloc_trim()  # hand the last range's freed memory back, so the baseline below is honest
        before = _rss_kb()
        first, last = rng
        learners = ([LocalLearner(self.spec, first, last)] if e2e
                    else [LocalLearner(self.spec, k, k + 1) for k in range(first, last)])
        stage = Stage(learners)
        shape = [self.spec.in_shape, *output_shapes(self.spec.blocks, self.spec.in_shape)][first]
        gen = torch.Generator().manual_seed(first)
        x = normalise(torch.randn(self.clips * self.cfg.clip_len, *shape, generator=gen))
        x = x.view(self.clips, self.cfg.clip_len, *shape)
        for _ in range(warmup):
            stage.step(x)
        _reset_peak()
        times, cpu = [], []
        for _ in range(steps):
            t, c = time.perf_counter(), time.process_time()
            stage.step(x)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        peak = _rss_kb("VmHWM") - before
        del stage, learners, x
        return {"range": rng, "e2e": e2e, "step_s": statistics.median(times), "cpu_s": statistics.median(cpu),
                "peak_mb": peak / 1024}


class _Loop:
    """The in-process engines (sequential layer-local loop, end-to-end backprop) inside a Ray worker, so
    that they run at the stages' priority (Ray's workers are niced)."""

    def rate(self, cfg: Any, spec: Any, sampler: Any, threads: int, warmup: int) -> float:
        from pipeline.engines import run_in_process

        torch.set_num_threads(threads)
        ends: dict[int, float] = {}
        run_in_process(cfg, spec, sampler, lambda m, rows: ends.__setitem__(m, time.perf_counter()))
        return _rate(ends, warmup)


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the baseline then includes freed-but-kept memory
        pass


def _rate(ends: dict[int, float], warmup: int) -> float:
    last = max(ends)
    return (last - warmup) / (ends[last] - ends[warmup])


def _actor(cls: type) -> Any:
    # num_cpus=0: measuring processes only run while nothing else of the bench does, and must not take
    # the logical CPUs the stage bundles need. OMP_WAIT_POLICY=PASSIVE: with libgomp's default (spin, then
    # sleep) a multi-threaded baseline loses up to 10x whenever another process holds one of its cores
    # ([Note: spinning] in PERFLOG.md); passive is the baseline at its best. One-thread stages never wait
    # in an OpenMP barrier, so it does not change them.
    return ray.remote(num_cpus=0, runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})(cls).remote


# -- the pipeline, with where its time and the machine's CPU went ------------------------------------


class _CpuMeter:
    """CPU seconds per category of process between two snapshots: stages, driver, Ray's own, other."""

    def __init__(self) -> None:
        self.t0, self.machine0 = 0.0, 0.0
        self.snap0: dict[int, tuple[str, float]] = {}
        self.stages: set[int] = set()

    def _snapshot(self) -> tuple[dict[int, tuple[str, float]], float]:
        import psutil  # vendored by ray (ray/thirdparty_files), importable once ray is

        me = psutil.Process()
        ours = {p.pid for p in me.children(recursive=True)}  # Ray's daemons and workers started by this driver
        snap = {}
        for p in psutil.process_iter(["pid", "cpu_times"]):
            times, pid = p.info["cpu_times"], p.info["pid"]
            if times is None:
                continue
            kind = ("driver" if pid == me.pid else "stages" if pid in self.stages
                    else "ray" if pid in ours else "other")
            snap[pid] = (kind, times.user + times.system)
        machine = psutil.cpu_times()
        return snap, machine.user + machine.system + machine.nice + getattr(machine, "irq", 0) \
            + getattr(machine, "softirq", 0)

    def start(self, stages: Sequence[int] = ()) -> None:
        """Start counting; `stages`: the stage processes' ids (everything else this driver started is Ray's,
        every other process on the machine is `other`)."""
        self.stages = set(stages)
        self.t0 = time.perf_counter()
        self.snap0, self.machine0 = self._snapshot()

    def cpu_of(self, pids: Sequence[int]) -> list[float]:
        """CPU seconds each of these processes used since start (NaN for one that is gone)."""
        snap, _ = self._snapshot()
        return [snap[p][1] - self.snap0[p][1] if p in snap and p in self.snap0 else float("nan") for p in pids]

    def cores(self) -> dict[str, float]:
        """Cores used per category since start (CPU seconds / wall seconds)."""
        wall = time.perf_counter() - self.t0
        snap, machine = self._snapshot()
        used = {"stages": 0.0, "driver": 0.0, "ray": 0.0, "other": 0.0}
        for pid, (kind, cpu) in snap.items():
            used[kind] += cpu - self.snap0.get(pid, (kind, 0.0))[1]  # a process started since: all of it
        used["machine"] = machine - self.machine0
        return {k: round(v / wall, 3) for k, v in used.items()}


def pipeline_run(pipe: Any, sampler: Any, start: int, warmup: int, steps: int) -> dict[str, Any]:
    """Micro-batches [start, start + warmup + steps] through a started `StagePipeline`: steady-state rate,
    each stage's mean busy time and busy fraction, and the cores each kind of process used meanwhile."""
    ends: dict[int, float] = {}
    busy: dict[int, list[float]] = {}
    meter = _CpuMeter()
    cores: dict[str, float] = {}
    stage_cpu: list[float] = []
    pids = [int(i["pid"]) for i in getattr(pipe, "info", [])]  # StageWorker.info(), bottom to top
    first, stop = start + warmup, start + warmup + steps + 1

    def on_step(m: int, rows: list[tuple[int, dict[str, float]]]) -> None:
        ends[m] = time.perf_counter()
        if m == first:
            meter.start(pids)
        if m == stop - 1:
            stage_cpu.extend(meter.cpu_of(pids))
            cores.update(meter.cores())
        if m > first:
            seen = set()
            for _, r in rows:  # one row per layer; the stage's busy interval is on each
                k = int(r["stage"])
                if k not in seen:
                    seen.add(k)
                    busy.setdefault(k, []).append(r["busy_end"] - r["busy_start"])

    pipe.train(sampler, start, stop, on_step)
    rate = steps / (ends[stop - 1] - ends[first])
    busy_s = [statistics.mean(busy[k]) for k in sorted(busy)]
    # CPU seconds per micro-batch of each stage process: its step and everything Ray does in it (argument
    # resolution, serialising the output into the object store, the call's RPCs), whoever else runs.
    return {"rate": rate, "busy_s": busy_s, "busy_fraction": [rate * b for b in busy_s], "cores": cores,
            "cpu_per_mb_s": [c / steps for c in stage_cpu]}


# -- the bench --------------------------------------------------------------------------------------------


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Every measurement of `lamina bench`; a JSON-able dict (see `format_tables`)."""
    from pipeline.config import TrainConfig
    from pipeline.data import ClipSampler, load_videos
    from pipeline.ray_engine import StagePipeline

    t_start = time.perf_counter()
    if not ray.is_initialized():
        # Logical CPUs: one 1-CPU bundle for each of up to max(stages) stages, whatever the cores.
        # Workers at niceness 0 rather than Ray's 15 (PERFLOG.md, F3): the driver, Ray's daemons and any other
        # tenant run at 0, and niced stages would lose every contended core to them (CFS weight 36 vs 1024).
        ray.init(num_cpus=max(cfg.cores, *cfg.stages), include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False, _system_config={"worker_niceness": cfg.worker_niceness})
    n_layers = len(cfg.layers.split(","))
    videos = load_videos(cfg.data, cfg.size, "train")
    total = cfg.warmup + cfg.steps + 1

    def train_cfg(clips: int, engine: str, stages: int = 1) -> TrainConfig:
        return TrainConfig(data=cfg.data, layers=cfg.layers, clips=clips, clip_len=cfg.clip_len, size=cfg.size,
                           steps=total, engine=engine, layers_per_stage=n_layers // stages,
                           queue_depth=cfg.queue_depth, cpus_per_stage=1.0)

    spec = train_cfg(cfg.clips, "ray").learner_spec(videos.frame_shape)
    loop = _actor(_Loop)()
    results: dict[str, Any] = {"config": dataclasses.asdict(cfg), "machine": _machine()}

    # 1. Isolation step times and peak memory of every range any split needs, and of e2e, per micro-batch size.
    ranges = sorted({r for s in cfg.stages for r in split(n_layers, s)} | set(split(n_layers, cfg.headline_stages)))
    iso: dict[int, dict[Range, float]] = {}
    memory: dict[int, dict[str, float]] = {}
    for clips in sorted({*cfg.scaling_clips, cfg.clips}):
        progress(f"isolation step times, B={clips}")
        probe = _actor(_StageProbe)(cfg, spec, clips, 1)
        got = ray.get([probe.measure.remote(r) for r in ranges] + [probe.measure.remote((0, n_layers), True)])
        ray.kill(probe)
        iso[clips] = {tuple(g["range"]): g["step_s"] for g in got if not g["e2e"]}  # type: ignore[misc]
        memory[clips] = {f"{'e2e' if g['e2e'] else 'layers'} {g['range'][0]}-{g['range'][1] - 1}": g["peak_mb"]
                         for g in got}

    def sampler(clips: int) -> ClipSampler:
        return ClipSampler(videos, clips, cfg.clip_len, 0)

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
    iso_probe = _actor(_StageProbe)(cfg, spec, b_head, 1)
    corun_probes = [iso_probe, *(_actor(_StageProbe)(cfg, spec, b_head, 1) for _ in head_split[1:])]
    runs: list[dict[str, Any]] = []
    with StagePipeline(train_cfg(b_head, "ray", s_head), spec) as pipe:
        for r in range(cfg.repeats):
            progress(f"headline S={s_head}, B={b_head}: repeat {r + 1}/{cfg.repeats}")
            alone = [ray.get(iso_probe.measure.remote(rng)) for rng in head_split]  # one after the other
            run: dict[str, Any] = {"t_iso_s": [g["step_s"] for g in alone], "cpu_iso_s": [g["cpu_s"] for g in alone]}
            run["pipeline"] = pipeline_run(pipe, sampler(b_head), r * total, cfg.warmup, cfg.steps)
            run["corun_s"] = [g["step_s"] for g in ray.get(
                [p.measure.remote(rng, False, 2, cfg.steps) for p, rng in zip(corun_probes, head_split, strict=True)])]
            run["baselines"] = baselines(b_head)
            runs.append(run)
    for p in corun_probes:
        ray.kill(p)
    results["headline"] = _headline(runs, s_head, b_head, cfg.cores)
    results["headline_runs"] = runs

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
                with StagePipeline(train_cfg(clips, "ray", s), spec) as pipe:
                    rate = pipeline_run(pipe, sampler(clips), 0, cfg.warmup, cfg.steps)["rate"]
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
    results["hops"] = [_hop_dict(h) for h in hops]
    results["hop_marginal"] = _marginal(hops)
    results["elapsed_s"] = time.perf_counter() - t_start
    return results


def _headline(runs: list[dict[str, Any]], stages: int, clips: int, cores: int) -> dict[str, Any]:
    """Medians over the repeats; every ratio is taken within a repeat first (its rate with its own isolation
    times and CPU use), so that a drift of the machine between repeats cancels."""
    med = statistics.median
    rate = med(r["pipeline"]["rate"] for r in runs)
    base = {k: med(r["baselines"][k] for r in runs) for k in runs[0]["baselines"]}
    effs, slowdown, fraction, corun, avail_effs, cpu_ratio = [], [], [], [], [], []
    for r in runs:
        p, t_iso = r["pipeline"], r["t_iso_s"]
        b = max(range(stages), key=lambda k: p["busy_s"][k])  # the bottleneck in the pipeline
        effs.append(p["rate"] * max(t_iso))
        slowdown.append(p["busy_s"][b] / max(t_iso))
        fraction.append(p["busy_fraction"][b])
        corun.append(max(r["corun_s"]) / max(t_iso))
        # What the cores other processes left allow: min(1 / max t, free cores / sum t).
        free = max(0.05, cores - p["cores"].get("other", 0.0))
        avail_effs.append(p["rate"] / min(1 / max(t_iso), free / sum(t_iso)))
        # CPU time is what the stage spent, not what it waited for a core: the pipeline's own overhead.
        k = max(range(stages), key=lambda j: r["cpu_iso_s"][j])
        if p["cpu_per_mb_s"] and p["cpu_per_mb_s"][k] > 0:  # not NaN, not below the clock resolution
            cpu_ratio.append(r["cpu_iso_s"][k] / p["cpu_per_mb_s"][k])
    t_iso_med = [med(r["t_iso_s"][k] for r in runs) for k in range(stages)]
    cpu = {k: med(r["pipeline"]["cores"][k] for r in runs) for k in runs[0]["pipeline"]["cores"]}
    return {"stages": stages, "clips": clips, "rate": rate, "rates": [r["pipeline"]["rate"] for r in runs],
            "t_iso_s": t_iso_med, "efficiency": med(effs), "efficiencies": effs, "compute_slowdown": med(slowdown),
            "bottleneck_busy_fraction": med(fraction), "corun_slowdown": med(corun),
            "efficiency_vs_free_cores": med(avail_effs), "baselines": base,
            "cpu_efficiency": med(cpu_ratio) if cpu_ratio else float("nan"),
            "vs_sequential": {k: rate / v for k, v in base.items() if k.startswith("sequential")},
            "vs_e2e": {k: rate / v for k, v in base.items() if k.startswith("e2e")}, "cores": cpu}


def _hop_dict(h: HopRow) -> dict[str, Any]:
    return {"nbytes": h.nbytes, "ms": h.ms,
            "vs_memcpy": {t: v / h.ms["memcpy"] for t, v in h.ms.items() if t != "memcpy"}}


def _marginal(hops: Sequence[HopRow]) -> dict[str, float]:
    """Per-byte cost between the two largest payloads, as a multiple of memcpy's: the bandwidth part of a
    hop with its fixed latency (call dispatch, scheduling) taken out."""
    if len(hops) < 2:
        return {}
    a, b = sorted(hops, key=lambda h: h.nbytes)[-2:]
    copy = b.ms["memcpy"] - a.ms["memcpy"]
    return {t: (b.ms[t] - a.ms[t]) / copy for t in b.ms if t != "memcpy" and copy > 0}


def _machine() -> dict[str, Any]:
    return {"cores": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
            "numpy": np.__version__, "load_avg_at_start": os.getloadavg()}


# -- output -----------------------------------------------------------------------------------------------


def _size(nbytes: int) -> str:
    return f"{nbytes // MB} MB" if nbytes >= MB else f"{nbytes // KB} KB"


def format_tables(res: dict[str, Any]) -> str:
    h, cores = res["headline"], res["config"]["cores"]
    b = h["baselines"]
    lines = [(f"## Headline: S = {h['stages']} stages, B = {h['clips']} clips x {res['config']['clip_len']} frames "
             f"({len(h['rates'])} interleaved runs, medians)"), "",
             "| measure | value | target |", "|---|---|---|",
             f"| pipeline micro-batches/s | {h['rate']:.2f} ({', '.join(f'{x:.2f}' for x in h['rates'])}) | |",
             f"| stage step in isolation (ms, 1 thread) | {' / '.join(f'{t * 1e3:.1f}' for t in h['t_iso_s'])} | |",
             f"| **pipeline efficiency** = rate x max t_iso | **{h['efficiency']:.2f}** | >= 0.95 |",
             f"| = 1 / compute slowdown in the pipeline | 1 / {h['compute_slowdown']:.2f} | |",
             f"| x busy fraction of the bottleneck stage | {h['bottleneck_busy_fraction']:.2f} | |",
             f"| co-run slowdown (stages at once, no transport) | {h['corun_slowdown']:.2f} | |",
             f"| efficiency against the cores other processes left free | {h['efficiency_vs_free_cores']:.2f} | |",
             f"| CPU efficiency: slowest stage's CPU per step alone / in the pipeline | {h['cpu_efficiency']:.2f} | |"]
    for k, v in h["vs_sequential"].items():
        lines.append(f"| speed-up vs {k} ({b[k]:.2f} mb/s) | {v:.2f}x | |")
    for k, v in h["vs_e2e"].items():
        lines.append(f"| speed-up vs {k} backprop ({b[k]:.2f} mb/s) | {v:.2f}x | |")
    c = h["cores"]
    lines.append(f"| cores busy during the pipeline: stages / driver / Ray / other / machine | "
                 f"{c['stages']:.2f} / {c['driver']:.2f} / {c['ray']:.2f} / {c['other']:.2f} / {c['machine']:.2f} | |")
    lines += ["", f"## Scaling (one run each; {cores} cores: S > {cores} is oversubscribed)", "",
              ("| S | B | mb/s | stage t_iso (ms) | efficiency | vs ideal | vs sequential "
              f"{cores}t | vs sequential 1t | vs e2e {cores}t |"), "|---|---|---|---|---|---|---|---|---|"]
    for s in res["scaling"]:
        lines.append(f"| {s['stages']} | {s['clips']} | {s['rate']:.2f} | "
                     f"{' / '.join(f'{t * 1e3:.0f}' for t in s['t_iso_s'])} | {s['efficiency']:.2f} | "
                     f"{s['efficiency_vs_ideal']:.2f} | {s['vs_sequential']:.2f}x | {s['vs_sequential_1t']:.2f}x | "
                     f"{s['vs_e2e']:.2f}x |")
    mem = res["memory"][str(h["clips"])] if str(h["clips"]) in res["memory"] else res["memory"][h["clips"]]
    e2e = next(v for k, v in mem.items() if k.startswith("e2e"))
    lines += ["", f"## Peak memory at B = {h['clips']} (RSS high-water mark above the process's baseline)", "",
              "| layers | peak MB | vs e2e backprop |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {v / e2e:.2f} |" for k, v in mem.items()]
    names = [t for t in res["hops"][0]["ms"] if not t.startswith("memcpy")]
    lines += ["", "## Per-hop transport (median ms, and x memcpy; memcpy-new: into fresh pages)", "",
              "| payload | " + " | ".join(names) + " | memcpy | memcpy-new |", "|---|" + "---|" * (len(names) + 2)]
    for hop in res["hops"]:
        ms, vs = hop["ms"], hop["vs_memcpy"]
        lines.append(f"| {_size(hop['nbytes'])} | " + " | ".join(f"{ms[t]:.2f} ({vs[t]:.1f}x)" for t in names)
                     + f" | {ms['memcpy']:.3f} | {ms['memcpy-new']:.3f} ({vs['memcpy-new']:.1f}x) |")
    if res["hop_marginal"]:
        m = res["hop_marginal"]
        lines.append("| per extra byte, two largest sizes | " + " | ".join(f"{m[t]:.2f}x" for t in names)
                     + f" | 1x | {m['memcpy-new']:.2f}x |")
    lines += ["", (f"{res['machine']['cores']} cores, torch {res['machine']['torch']}, ray {res['machine']['ray']}; "
              f"load average at start {', '.join(f'{x:.1f}' for x in res['machine']['load_avg_at_start'])}; "
              f"bench took {res['elapsed_s']:.0f} s.")]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    cores = res["config"]["cores"]
    for clips in sorted({s["clips"] for s in res["scaling"]}):
        rows = [s for s in res["scaling"] if s["clips"] == clips]
        (line,) = ax1.plot([s["stages"] for s in rows], [s["rate"] / rows[0]["baselines"]["sequential 1t"]
                                                         for s in rows], "o-", label=f"pipeline, B={clips}")
        ax1.plot([s["stages"] for s in rows], [s["ideal"] / rows[0]["baselines"]["sequential 1t"] for s in rows],
                 ":", color=line.get_color(), label=f"ideal (isolated stages), B={clips}")
        ax1.axhline(rows[0]["baselines"][f"sequential {cores}t"] / rows[0]["baselines"]["sequential 1t"],
                    ls="--", color=line.get_color(), lw=0.8)
    ax1.set_xticks(sorted({s["stages"] for s in res["scaling"]}))
    ax1.set_xlabel("stages S (1 CPU, 1 thread each)")
    ax1.set_ylabel("micro-batches/s ÷ sequential loop, 1 thread")
    ax1.set_title(f"throughput (dashed: sequential, {cores} threads)")
    ax1.legend(fontsize=7)
    sizes = [h["nbytes"] / MB for h in res["hops"]]
    for t in res["hops"][0]["ms"]:
        ax2.loglog(sizes, [h["ms"][t] for h in res["hops"]], "o-" if t != "memcpy" else "k--", label=t)
    ax2.set_xlabel("activation (MB)")
    ax2.set_ylabel("per-hop ms (median)")
    ax2.set_title("transport vs memcpy")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(res: dict[str, Any], out: Path) -> str:
    """bench.json, bench.md and bench.png in `out`; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(res, indent=1, default=_jsonable))
    res = json.loads((out / "bench.json").read_text())  # the tables read what the json holds
    table = format_tables(res)
    (out / "bench.md").write_text(table + "\n")
    plot(res, out / "bench.png")
    return table


def _jsonable(o: Any) -> Any:
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def main(quick: bool, out: str, overrides: dict[str, Any] | None = None) -> str:
    cfg = dataclasses.replace(QUICK if quick else FULL, **(overrides or {}))
    res = run_bench(cfg)
    return write(res, Path(out))
