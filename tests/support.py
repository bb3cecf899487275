"""Helpers shared by the tests: tiny data and configs, the sequential reference, exact state comparison,
waiting for Ray to forget a run, and a `ray start` head of the tests' own. Plain functions; the shared
local-Ray fixture is in conftest.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import ray
import torch

from pipeline.checkpoints import Checkpoint, CheckpointStore, Ledger
from pipeline.config import TrainConfig
from pipeline.engines.local import run_local
from pipeline.engines.placement import NAMESPACE
from pipeline.sources import ClipSampler, load_videos
from pipeline.stage import LayerReport, StepReport
from pipeline.telemetry import gauges
from workers.learner import LearnerSpec


def tiny_npz(directory: Path, sequences: int = 6, length: int = 8, size: int = 16, seed: int = 0) -> str:
    """A sequence archive of random uint8 frames, two sequences per label (a probe split by sequences then
    has labels on both sides); returns the `npz:` data spec for it."""
    rng = np.random.default_rng(seed)
    path = directory / f"tiny-{sequences}x{length}x{size}.npz"
    if not path.exists():
        np.savez(path, frames=rng.integers(0, 256, (sequences, length, size, size), dtype=np.uint8),
                 labels=np.arange(sequences) % max(1, sequences // 2))
    return f"npz:{path}"


def tiny_config(data: str, **overrides: Any) -> TrainConfig:
    """Three 8-channel conv layers on 16x16 frames, 4 clips of 3 frames: a stage step of ~1 ms."""
    fields: dict[str, Any] = {"data": data, "layers": "conv:8,conv:8,conv:8", "size": 16, "clips": 4,
                              "clip_len": 3, "steps": 8, "engine": "ray", "queue_depth": 2}
    fields.update(overrides)
    return TrainConfig(**fields)


def small_config(data: str, tmp_path: Path, **overrides: Any) -> TrainConfig:
    """Three 4-channel layers at 8x8, 16 micro-batches, a barrier every 3, a run directory in tmp_path: the
    run the recovery, fault and transport tests kill, stop and resume."""
    fields: dict[str, Any] = {"layers": "conv:4,conv:4,conv:4", "size": 8, "clips": 4, "clip_len": 3,
                              "steps": 16, "checkpoint_every": 3, "run_dir": str(tmp_path / "run")}
    return tiny_config(data, **{**fields, **overrides})


def setup(cfg: TrainConfig) -> tuple[LearnerSpec, ClipSampler]:
    videos = load_videos(cfg.data, cfg.size, "train")
    return cfg.learner_spec(videos.frame_shape), ClipSampler(videos, cfg.clips, cfg.clip_len, cfg.seed)


def sequential(cfg: TrainConfig, sampler: Any, on_step: Callable[..., None] | None = None,
               resume: Checkpoint | None = None) -> list[dict]:
    """The reference: the in-process layer-local loop, on the stage actors' thread count.

    The thread count fixes the CPU kernels' summation order, so bit-for-bit comparisons need the same one.
    """
    spec, _ = setup(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.cpus_per_stage)))
    try:
        return run_local(dataclasses.replace(cfg, engine="sequential"), spec, sampler,
                         on_step or (lambda m, reports: None), resume=resume).states
    finally:
        torch.set_num_threads(threads)


class Recorder:
    """An `on_step` that keeps every call: [(m, [StepReport of each stage]), ...]."""

    def __init__(self, hook: Callable[[int], None] | None = None) -> None:
        self.calls: list[tuple[int, list[StepReport]]] = []
        self.hook = hook

    def __call__(self, m: int, reports: list[StepReport]) -> None:
        self.calls.append((m, reports))
        if self.hook is not None:
            self.hook(m)

    @property
    def steps(self) -> list[int]:
        return [m for m, _ in self.calls]

    def layers(self) -> list[list[tuple]]:
        """Per micro-batch, every layer's (layer, loss, pos, neg, over, spread): what must not depend on how
        layers were grouped into stages."""
        return [[dataclasses.astuple(lr) for r in reports for lr in r.layers] for _, reports in self.calls]


def piped_and_sequential(cfg: TrainConfig, resume_at: int = 0, store: CheckpointStore | None = None,
                         ) -> tuple[list[dict], list[dict], Recorder, Recorder]:
    """The Ray pipeline's final states and the sequential loop's on the same micro-batches, with what each
    reported; resume_at > 0: the pipeline starts from the loop's state after `resume_at` micro-batches (a
    resume); `store`: the pipeline writes barriers there and recovers a lost stage from them."""
    from pipeline.engines.ray_engine import run_ray

    spec, sampler = setup(cfg)
    piped_calls, ref_calls = Recorder(), Recorder()
    resume = None
    if resume_at:
        half = sequential(dataclasses.replace(cfg, steps=resume_at), sampler)
        resume = Checkpoint(resume_at, half, [Ledger([[0, resume_at]]) for _ in half])
    piped = run_ray(cfg, spec, sampler, piped_calls, resume=resume, store=store).states
    return piped, sequential(cfg, sampler, ref_calls), piped_calls, ref_calls


class NaNAt:
    """A sampler whose micro-batch `bad` is all NaN: makes stage 0 fail there, and only there."""

    def __init__(self, sampler: Any, bad: int) -> None:
        self.sampler, self.bad = sampler, bad

    def batch(self, m: int) -> Any:
        b = self.sampler.batch(m)
        return dataclasses.replace(b, frames=torch.full_like(b.frames, math.nan)) if m == self.bad else b


def flatten(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(path, leaf) for every leaf of nested dicts / lists / tuples, in a fixed order."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from flatten(v, f"{path}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from flatten(v, f"{path}[{i}]")
    else:
        yield path, obj


def state_differences(a: Any, b: Any) -> list[str]:
    """Paths where two states differ: tensors compared bit for bit (torch.equal), other leaves with ==."""
    fa, fb = list(flatten(a)), list(flatten(b))
    if [p for p, _ in fa] != [p for p, _ in fb]:
        return [f"structure: {[p for p, _ in fa]} != {[p for p, _ in fb]}"]
    diffs = []
    for (path, x), (_, y) in zip(fa, fb, strict=True):
        same = (isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
                if isinstance(x, torch.Tensor) else x == y)
        if not same:
            diffs.append(path)
    return diffs


def count_tensors(state: Any) -> int:
    return sum(isinstance(leaf, torch.Tensor) for _, leaf in flatten(state))


def run_actors(run_prefix: str) -> list[str]:
    """Names of live actors in the lamina namespace whose run id starts with `run_prefix`."""
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == NAMESPACE and a["name"].startswith(f"lamina-{run_prefix}")]


def run_placement_groups(run_prefix: str) -> list[str]:
    """States of the placement groups of runs whose id starts with `run_prefix` that are not removed."""
    table = ray.util.placement_group_table()
    return [pg["state"] for pg in table.values()
            if pg["name"].startswith(f"lamina-{run_prefix}") and pg["state"] != "REMOVED"]


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, every: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


def kill_and_wait(handle: Any) -> None:
    """Kill an actor and return once it is gone (ray.kill returns before it is): a call then fails."""
    ray.kill(handle)
    with pytest.raises(ray.exceptions.RayActorError):
        while True:
            ray.get(handle.info.remote(), timeout=60)


def ensure_auth_token() -> None:
    """Make sure a Ray token exists for token authentication (what `ray start` expects to find)."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    if not (Path.home() / ".ray" / "auth_token").is_file():
        subprocess.run(["ray", "get-auth-token", "--generate"], check=True, capture_output=True)


def free_ports(n: int) -> list[int]:
    """n TCP ports free on 127.0.0.1 right now (held open together, so they are distinct)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


T = TypeVar("T")


def start_ray(start: Callable[[], T], undo: Callable[[], None], attempts: int = 2) -> T:
    """`start()` a Ray, tried again once if it times out at startup.

    Ray gives a starting raylet a fixed 30 s to register with the GCS; on a loaded 2-core machine (a fresh
    environment compiling Ray's modules, the processes of a Ray just stopped still exiting) that can pass.
    Any other failure, or a second timeout, is raised; `undo()` cleans up what a failed try left.
    """
    for attempt in range(attempts):
        try:
            return start()
        except Exception as e:  # Ray raises a bare Exception for this
            undo()
            if "timed out during startup" not in str(e) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


@contextmanager
def ray_head(temp_dir: str, num_cpus: int, env: dict[str, str]) -> Iterator[str]:
    """A head started with `ray start --head` on free ports; yields its dashboard (job API) address.

    Stopped by process id — only the processes of this head (whose command lines name `temp_dir`) and
    their children — rather than `ray stop`, which would stop every Ray on the machine.
    """
    gcs, dashboard, client, agent = free_ports(4)
    subprocess.run(["ray", "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}",
                    "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--ray-client-server-port={client}",
                    f"--dashboard-agent-listen-port={agent}", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}"],
                   env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        stop_processes_of(temp_dir)


def stop_processes_of(temp_dir: str) -> None:
    import psutil  # comes with ray[default]

    own = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(temp_dir in arg for arg in proc.info["cmdline"] or ()):
            own.append(proc)
    family = {p.pid: p for p in own}
    for proc in own:
        try:
            family.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    for proc in family.values():
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(family.values()), timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def reports(m: int, stages: int = 2, value: float = 1.0) -> list[StepReport]:
    """What `stages` stages report for micro-batch m, one layer each, every metric made up (`value` the loss)."""
    return [StepReport(k, m, (LayerReport(k, value, 0.1, 0.2, 0.3, 0.9),), 10.0 + m, 10.5 + m, 2.0, 0.5)
            for k in range(stages)]


def lamina_gauges() -> dict[str, tuple[str, ...]]:
    """Every gauge lamina sets, by its Prometheus name (`ray_lamina_<name>`), with its tag keys: read from
    pipeline/telemetry/gauges.py by building a stage's and the driver's gauges on a stand-in for Ray's Gauge."""
    made: dict[str, tuple[str, ...]] = {}

    class Recording:
        def __init__(self, name: str, description: str = "", tag_keys: tuple[str, ...] = ()) -> None:
            made[name] = tuple(tag_keys)

        def set_default_tags(self, tags: dict[str, str]) -> None:
            pass

        def set(self, value: float, tags: dict[str, str] | None = None) -> None:
            pass

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gauges, "Gauge", Recording)
        gauges.StageGauges("run", 0)
        gauges.DriverGauges("run")
    return {f"ray_{name}": keys for name, keys in made.items()}
