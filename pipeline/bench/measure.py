"""The bench's measuring processes: a stage stepped alone (time, CPU, peak memory), the in-process engines,
and a pipeline run with where its time and the machine's CPU went. Plain classes, made Ray actors by
`actor`; pipeline/bench/suite.py runs them ([Note: efficiency] there).
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import torch

from pipeline.allocator import WORKER_ENV, keep_freed_memory

if TYPE_CHECKING:
    from pipeline.bench.suite import BenchConfig

Range = tuple[int, int]




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


def stage_input(spec: Any, first: int, clips: int, clip_len: int) -> torch.Tensor:
    """A micro-batch (clips, clip_len, ...) as the stage starting at layer `first` receives it: random values,
    normalised as the layer below emits them, the same for a given `first`."""
    from workers.layers import normalise, output_shapes

    shape = [spec.in_shape, *output_shapes(spec.blocks, spec.in_shape)][first]
    x = torch.randn(clips * clip_len, *shape, generator=torch.Generator().manual_seed(first))
    return normalise(x).view(clips, clip_len, *shape)


class StageProbe:
    """Times stage steps with no pipeline around them, one range of layers after another, and measures
    each one's peak memory. One torch thread per stage, as the stage actors run."""

    def __init__(self, cfg: BenchConfig, spec: Any, clips: int, threads: int) -> None:
        torch.set_num_threads(threads)
        keep_freed_memory()  # as the stages run (pipeline/allocator.py)
        self.cfg, self.spec, self.clips = cfg, spec, clips
        # The first stage built in a process pays one-time costs (kernel caches, allocator arenas) that
        # would count towards its peak: pay them here, outside any measurement.
        self.measure((0, 1), warmup=1, steps=1)

    def measure(self, rng: Range, e2e: bool = False, warmup: int | None = None, steps: int | None = None,
                ) -> dict[str, Any]:
        from workers.learner import Learner, LearnerStack

        warmup = self.cfg.warmup if warmup is None else warmup
        steps = self.cfg.steps if steps is None else steps
        gc.collect()
        _malloc_trim()  # hand the last range's freed memory back, so the baseline below is honest
        before = _rss_kb()
        first, last = rng
        learners = ([Learner(self.spec, first, last)] if e2e
                    else [Learner(self.spec, k, k + 1) for k in range(first, last)])
        stage = LearnerStack(learners)
        x = stage_input(self.spec, first, self.clips, self.cfg.clip_len)
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


class Loop:
    """The in-process engines (sequential layer-local loop, end-to-end backprop) inside a Ray worker, so
    that they run at the stages' priority (Ray's workers are niced)."""

    def rate(self, cfg: Any, spec: Any, sampler: Any, threads: int, warmup: int) -> float:
        from pipeline.engines.local import run_local

        torch.set_num_threads(threads)
        ends: dict[int, float] = {}
        run_local(cfg, spec, sampler, lambda m, reports: ends.__setitem__(m, time.perf_counter()))
        return _rate(ends, warmup)


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the baseline then includes freed-but-kept memory
        pass


def _rate(ends: dict[int, float], warmup: int) -> float:
    last = max(ends)
    return (last - warmup) / (ends[last] - ends[warmup])


# The in-process baselines at their best: libgomp binds each thread of a team to a core of its own (the
# first thread too, with one thread). A 2-thread loop waits at every parallel region for the thread that
# lost its core; bound against not, 4 interleaved pairs on the bench's machine: the 1-thread loop
# 1.00-1.03x, the 2-thread one 1.00-1.09x (PERFLOG.md, M13).
BOUND_ENV = {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}


def actor(cls: type, env: dict[str, str] | None = None) -> Any:
    # num_cpus=0: measuring processes only run while nothing else of the bench does, and must not take
    # the logical CPUs the stage bundles need. OMP_WAIT_POLICY=PASSIVE: with libgomp's default (spin, then
    # sleep) a multi-threaded baseline loses up to 10x whenever another process holds one of its cores
    # ([Note: spinning] in PERFLOG.md); passive is the baseline at its best. One-thread stages never wait
    # in an OpenMP barrier, so it does not change them. The allocator's environment: as the stages run.
    # `env`: more variables for this actor's process.
    return ray.remote(num_cpus=0, runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", **WORKER_ENV, **(env or {})}})(cls).remote


# -- the pipeline, with where its time and the machine's CPU went ------------------------------------


class CpuMeter:
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

    @staticmethod
    def threads_of(pid: int) -> dict[int, tuple[float, float]]:
        """Seconds each thread of a process has run on a CPU and waited in a run queue for one, so far, from
        the scheduler's /proc/PID/task/TID/schedstat (empty for a process that is gone, or a kernel without
        it)."""
        out = {}
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                run_ns, wait_ns = (task / "schedstat").read_text().split()[:2]
            except (OSError, ValueError):  # the thread ended meanwhile
                continue
            out[int(task.name)] = (int(run_ns) / 1e9, int(wait_ns) / 1e9)
        return out

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


def idle_cores(actors: Any, seconds: float = 2.0) -> float:
    """Cores the stage actors use while they wait for work (between runs), over `seconds`."""
    pids = [int(i["pid"]) for i in actors.info]
    meter = CpuMeter()
    meter.start(pids)
    time.sleep(seconds)
    return sum(meter.cpu_of(pids)) / seconds


def pipeline_run(pipe: Any, sampler: Any, start: int, warmup: int, steps: int) -> dict[str, Any]:
    """Micro-batches [start, start + warmup + steps] through a `RayPipeline` over started stage actors:
    steady-state rate, each stage's mean busy time and busy fraction, and the cores each kind of process
    used meanwhile."""
    ends: dict[int, float] = {}
    busy: dict[int, list[float]] = {}
    meter = CpuMeter()
    cores: dict[str, float] = {}
    stage_cpu: list[float] = []
    threads0: list[dict[int, tuple[float, float]]] = []
    step_cpu: list[tuple[float, float]] = []  # each stage's busiest thread (the one that steps): run, wait
    giving_way: dict[int, list[bool]] = {}  # per stage, whether each step gave way (pipeline/slack.py)
    intervals: dict[int, list[tuple[float, float]]] = {}  # per stage, its steps' (start, end), time.time()
    window: list[float] = []  # time.time() at the CPU meter's start and end
    pids = [int(i["pid"]) for i in pipe.actors.info]  # Stage.info(), bottom to top
    first, stop = start + warmup, start + warmup + steps + 1

    def on_step(m: int, reports: list[Any]) -> None:
        ends[m] = time.perf_counter()
        if m == first:
            window.append(time.time())
            meter.start(pids)
            threads0.extend(meter.threads_of(p) for p in pids)
        if m == stop - 1:
            window.append(time.time())
            stage_cpu.extend(meter.cpu_of(pids))
            for p, t0 in zip(pids, threads0, strict=True):
                ran = {t: (r - t0[t][0], w - t0[t][1]) for t, (r, w) in meter.threads_of(p).items() if t in t0}
                step_cpu.append(max(ran.values(), default=(float("nan"), float("nan"))))
            cores.update(meter.cores())
        if m > first:
            for r in reports:  # one StepReport per stage
                busy.setdefault(r.stage, []).append(r.end - r.start)
                giving_way.setdefault(r.stage, []).append(r.giving_way)
                intervals.setdefault(r.stage, []).append((r.start, r.end))

    pipe.train(sampler, start, stop, on_step)
    rate = steps / (ends[stop - 1] - ends[first])
    busy_s = [statistics.mean(busy[k]) for k in sorted(busy)]
    # CPU seconds per step of each stage process: its step and everything Ray does in it (argument
    # resolution, serialising the output into the object store, the call's RPCs), whoever else runs; and
    # of the process's busiest thread alone (the step's), so that a slower step tells itself apart from
    # other threads of the process taking CPU; and how long that thread waited for a core. Per step that
    # stage ran inside the metered window, not per micro-batch the top finished in it: a stage below the
    # top runs ahead of it, so at the window's start it has already stepped on micro-batches the top has
    # yet to finish, and at its end it waits for the top, idle (about one step fewer than 12, M19).
    ran = [_steps_within(intervals[k], *window) or float("nan") for k in sorted(intervals)]
    return {"rate": rate, "busy_s": busy_s, "busy_fraction": [rate * b for b in busy_s], "cores": cores,
            "cpu_per_mb_s": [c / n for c, n in zip(stage_cpu, ran, strict=True)],
            "step_cpu_per_mb_s": [r / n for (r, _), n in zip(step_cpu, ran, strict=True)],
            "step_wait_per_mb_s": [w / n for (_, w), n in zip(step_cpu, ran, strict=True)],
            "giving_way": [statistics.mean(giving_way[k]) for k in sorted(giving_way)]}


def _steps_within(intervals: list[tuple[float, float]], t0: float, t1: float) -> float:
    """How many of these steps ran between t0 and t1, a step partly inside counted by the part."""
    return sum(max(0.0, min(e, t1) - max(s, t0)) / (e - s) for s, e in intervals if e > s)
