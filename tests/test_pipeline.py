"""The Ray pipeline engine on one local Ray: transparency (the spine), overlap and backpressure, failures,
interruption, placement errors, metrics, and the `lamina train` path.

The session's local Ray (conftest.py) serves every test; each run builds its own stage actors, so each
pipelined run costs a few seconds of actor start.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import re
import urllib.request
from pathlib import Path

import pytest
import ray
import torch
from ray.util.state import list_actors
from support import (
    NaNAt,
    Recorder,
    count_tensors,
    piped_and_sequential,
    run_actors,
    run_placement_groups,
    sequential,
    setup,
    state_differences,
    tiny_config,
    tiny_npz,
    wait_until,
)

from pipeline import cli
from pipeline.allocator import WORKER_ENV
from pipeline.bench import transport as transport_bench
from pipeline.config import TrainConfig
from pipeline.engines import placement
from pipeline.engines.actors import NAMESPACE
from pipeline.engines.placement import StageActors
from pipeline.engines.ray_engine import RayPipeline, run_ray
from pipeline.errors import PlacementError, StageError
from pipeline.rundir import RunDir
from pipeline.sources import ClipSampler, MicroBatch
from pipeline.telemetry.gauges import DRIVER_GAUGES, LAYER_GAUGES, PREFIX, STAGE_GAUGES
from workers.learner import LearnerStack

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_npz(tmp_path_factory.mktemp("data"))


class Reordered:
    """A sampler that serves micro-batches in another order: what a pipeline that reordered would see."""

    def __init__(self, sampler: ClipSampler, order: list[int]) -> None:
        self.sampler, self.order = sampler, order

    def batch(self, m: int) -> MicroBatch:
        return self.sampler.batch(self.order[m])


# -- transparency: the spine ------------------------------------------------------------------------------


ZOO = {  # the networks and settings the pipeline must not change a bit of
    "3-stages": ({}, 3, 0),
    "2-layers-per-stage-resumed": ({"layers_per_stage": 2, "queue_depth": 3}, 2, 4),
    "mlp-top-depth-1": ({"layers": "conv:8,conv:8,mlp:16", "queue_depth": 1}, 3, 0),
    "no-head": ({"head": None}, 3, 0),
    "channel-norm-hinge-neg": ({"norm": "channel", "objective": "hinge-neg", "deltas": (0.3, 0.2, 0.1)}, 3, 0),
}


@pytest.mark.parametrize("variant", list(ZOO))
def test_pipelined_run_equals_the_sequential_loop_bit_for_bit(ray_local: str, data: str, variant: str) -> None:
    overrides, stages, resume_at = ZOO[variant]
    cfg = tiny_config(data, steps=10, **overrides)
    piped, ref, piped_calls, ref_calls = piped_and_sequential(cfg, resume_at)

    # The pipeline really had `stages` actors, and every layer learned from every micro-batch.
    assert {r.stage for _, reports in piped_calls.calls for r in reports} == set(range(stages))
    assert [s["steps"] for s in piped] == [cfg.steps] * cfg.n_layers
    # Weights, Adam moments and step counts of every layer: bit for bit.
    assert count_tensors(piped) == count_tensors(ref) > 3 * cfg.n_layers
    assert state_differences(piped, ref) == []
    # on_step: once per micro-batch, in order, every layer, the same metrics as the loop computed.
    assert piped_calls.steps == list(range(resume_at, cfg.steps))
    assert piped_calls.layers() == ref_calls.layers()[resume_at:]

    # The comparison is sharp: learning moved the weights, and a different seed, or the same micro-batches
    # in another order (what an out-of-order pipeline would compute), gives different bits.
    spec, sampler = setup(cfg)
    init = [lrn.state_dict() for lrn in LearnerStack.layer_local(spec, 0, cfg.n_layers).learners]
    assert state_differences([s["modules"] for s in piped], [s["modules"] for s in init])
    other_seed = dataclasses.replace(cfg, seed=cfg.seed + 1)
    assert state_differences(piped, sequential(other_seed, setup(other_seed)[1]))
    swapped = Reordered(sampler, [0, 2, 1, *range(3, cfg.steps)])
    assert state_differences(piped, sequential(cfg, swapped))


# -- asynchrony, shown: overlap and backpressure ----------------------------------------------------------

DEPTH = 2


@pytest.fixture(scope="module")
def intervals(ray_local: str, tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[tuple[int, float, float]]]:
    """Busy intervals (m, start, end) per stage of one 2-stage run whose top stage is the slower one
    (conv 1->8 at 32x32, then 8->128 at 16x16: about 7 and 20 ms a step here)."""
    data = tiny_npz(tmp_path_factory.mktemp("data32"), sequences=16, length=8, size=32)
    cfg = tiny_config(data, layers="conv:8,conv:128", size=32, clips=16, clip_len=4, steps=40, queue_depth=DEPTH)
    spec, sampler = setup(cfg)
    calls = Recorder()
    run_ray(cfg, spec, sampler, calls)
    out: dict[int, list[tuple[int, float, float]]] = {0: [], 1: []}
    for m, reports in calls.calls:
        for r in reports:
            out[r.stage].append((m, r.start, r.end))
    return out


def test_stages_work_at_the_same_time_on_different_micro_batches(
        intervals: dict[int, list[tuple[int, float, float]]]) -> None:
    overlaps = [(a, b, min(e0, e1) - max(s0, s1))
                for a, s0, e0 in intervals[0] for b, s1, e1 in intervals[1] if min(e0, e1) > max(s0, s1)]
    # While stage 1 learns from micro-batch b, stage 0 learns from a later one (it produced b already).
    assert overlaps and all(a > b for a, b, _ in overlaps), overlaps
    # And not once by chance: stage 0 works during a good share of stage 1's steps. (Counted, not timed:
    # how long the overlaps last depends on what else the machine runs.)
    assert len({b for _, b, _ in overlaps}) > len(intervals[1]) / 4, (overlaps, len(intervals[1]))


def test_a_fast_stage_runs_at_most_queue_depth_ahead(intervals: dict[int, list[tuple[int, float, float]]]) -> None:
    ends_top = sorted(e for _, _, e in intervals[1])
    # Lead of stage 0 when it starts micro-batch a: how far a is beyond what stage 1 has finished.
    leads = [a - bisect.bisect_right(ends_top, s) for a, s, _ in intervals[0]]
    assert max(leads) <= DEPTH, leads  # the bound: stage 0 was never handed more
    assert max(leads) == DEPTH, leads  # and it binds: the fast stage was held back, not merely slow


# -- lifecycle: failures, Ctrl-C, placement ---------------------------------------------------------------


def test_a_failing_stage_stops_the_run_once_naming_stage_and_micro_batch(ray_local: str, data: str,
                                                                         tmp_path: Path) -> None:
    cfg = tiny_config(data, steps=12, run_dir=str(tmp_path / "failrun"))
    spec, sampler = setup(cfg)
    calls = Recorder()

    with pytest.raises(StageError) as info:
        run_ray(cfg, spec, NaNAt(sampler, 5), calls)

    err = info.value
    assert type(err) is StageError  # the driver's own error, not Ray's wrapper
    assert (err.stage, err.micro_batch) == (0, 5)
    assert isinstance(err.cause, FloatingPointError) and "nan" in str(err.cause)
    assert re.search(r"stage 0 \(lamina-failrun-[0-9a-f]{4}-stage0\) failed on micro-batch 5", str(err)), str(err)
    # on_step saw a prefix of the micro-batches before the failure, never the failed one.
    seen = calls.steps
    assert seen == list(range(len(seen))) and len(seen) <= 5
    # Torn down: no stage actor, no placement group left behind.
    assert wait_until(lambda: not run_actors("failrun")), run_actors("failrun")
    assert run_placement_groups("failrun") == []


class ThreadsSeen:
    """A sampler that notes the driver's torch thread count whenever it is asked for a micro-batch."""

    def __init__(self, sampler: ClipSampler) -> None:
        self.sampler, self.threads = sampler, set()

    def batch(self, m: int) -> MicroBatch:
        self.threads.add(torch.get_num_threads())
        return self.sampler.batch(m)


def test_the_driver_gathers_micro_batches_on_one_torch_thread_and_restores_its_count(ray_local: str,
                                                                                    data: str) -> None:
    # More threads leave OpenMP workers spinning in the driver after each gather, on the stages' cores.
    cfg = tiny_config(data, steps=3)
    spec, sampler = setup(cfg)
    source = ThreadsSeen(sampler)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with StageActors(cfg, spec) as actors:
            RayPipeline(actors).train(source, 0, cfg.steps, Recorder())
        assert source.threads == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("transport", ["object-store", "shm"])
def test_every_stage_process_starts_with_the_allocators_environment(ray_local: str, data: str, transport: str) -> None:
    # Read by the C library at the process's start (pipeline/allocator.py), so it has to come with the actor.
    cfg = tiny_config(data, transport=transport, replicas="1,2,1")
    spec, _ = setup(cfg)
    with StageActors(cfg, spec) as actors:
        pids = [int(i["pid"]) for i in actors.info]
        follower = ray.get_actor(f"{actors.names[1]}-replica1", namespace=NAMESPACE)
        pids.append(int(ray.get(follower.info.remote())["pid"]))
        for pid in pids:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert all(f"{k}={v}".encode() in environ for k, v in WORKER_ENV.items()), pid


def test_ctrl_c_tears_down_and_re_raises(ray_local: str, data: str, tmp_path: Path) -> None:
    cfg = tiny_config(data, layers="conv:8,conv:8", steps=200, run_dir=str(tmp_path / "intrun"))
    spec, sampler = setup(cfg)

    def interrupt(m: int) -> None:
        if m == 3:
            raise KeyboardInterrupt

    calls = Recorder(interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_ray(cfg, spec, sampler, calls)

    assert calls.steps == [0, 1, 2, 3]  # nothing reported after the interrupt
    assert wait_until(lambda: not run_actors("intrun")), run_actors("intrun")
    assert run_placement_groups("intrun") == []


def test_stages_that_do_not_fit_fail_with_the_bundles_and_the_cluster_named(
        ray_local: str, data: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placement, "PLACEMENT_TIMEOUT_S", 1.0)
    cfg = tiny_config(data, cpus_per_stage=3.0, run_dir=str(tmp_path / "bigrun"))  # 3 x 3 CPUs > 4
    spec, sampler = setup(cfg)

    with pytest.raises(PlacementError, match=r"3 bundles \{'CPU': 3\.0\} \(3 stages; PACK\)") as info:
        run_ray(cfg, spec, sampler, Recorder())

    assert "'CPU': 4.0" in str(info.value)  # the cluster's resources, to compare with
    assert run_placement_groups("bigrun") == []
    assert wait_until(lambda: not run_actors("bigrun")), run_actors("bigrun")


# -- observability: Ray's dashboard and Prometheus --------------------------------------------------------

SERIES = re.compile(r"^ray_(lamina_\w+)\{([^}]*)\} (\S+)$")


def _series(text: str, run: str) -> dict[tuple[str, str, str], float]:
    """{(gauge, stage, layer): value} of one run's lamina gauges in a Prometheus text page."""
    out = {}
    for line in text.splitlines():
        match = SERIES.match(line)
        if match:
            tags = dict(re.findall(r'(\w+)="([^"]*)"', match[2]))
            if tags.get("run") == run:
                out[(match[1], tags.get("stage", ""), tags.get("layer", ""))] = float(match[3])
    return out


def test_stage_metrics_reach_prometheus_and_the_actors_are_listed(ray_local: str, data: str,
                                                                  tmp_path: Path) -> None:
    cfg = tiny_config(data, layers_per_stage=2, steps=6, run_dir=str(tmp_path / "metricsrun"))  # stages 0-1 | 2
    spec, sampler = setup(cfg)
    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"
    calls = Recorder()
    layer_keys = {(PREFIX + g, s, layer) for g in LAYER_GAUGES for s, layer in (("0", "0"), ("0", "1"), ("1", "2"))}
    stage_keys = {(PREFIX + g, s, "") for g in [*STAGE_GAUGES, *DRIVER_GAUGES] for s in ("0", "1")}
    series: dict[tuple[str, str, str], float] = {}

    def scrape() -> bool:
        nonlocal series
        with urllib.request.urlopen(url, timeout=5) as page:
            series = _series(page.read().decode(), actors.run_id)
        return layer_keys | stage_keys <= set(series)

    with StageActors(cfg, spec) as actors:
        RayPipeline(actors).train(sampler, 0, cfg.steps, calls)
        # `ray list actors` (the state API) shows the stage actors by name while they run.
        alive = {a.name: a for a in list_actors(address=ray_local, filters=[("state", "=", "ALIVE")], detail=True)}
        assert set(actors.names) <= set(alive), (actors.names, alive)
        assert actors.names == [f"lamina-{actors.run_id}-stage{k}" for k in range(2)]
        assert alive[actors.names[0]].repr_name == f"{actors.names[0]} layers [1, 2] on cpu"  # dashboard's Repr
        found = wait_until(scrape, timeout=40, every=1.0)

    assert found, sorted(layer_keys | stage_keys - set(series))
    # The gauges hold the last micro-batch's values, as the stages reported them to the driver.
    _, last = calls.calls[-1]
    for report in last:
        for lr in report.layers:
            for g in LAYER_GAUGES:
                assert series[(PREFIX + g, str(report.stage), str(lr.layer))] == pytest.approx(getattr(lr, g), abs=1e-9)
    assert all(0 <= series[(PREFIX + "busy_fraction", s, "")] <= 1 for s in ("0", "1"))
    assert all(series[(PREFIX + "microbatches_per_s", s, "")] > 0 for s in ("0", "1"))


# -- the command line: `lamina train` is the Ray engine ---------------------------------------------------


@pytest.mark.parametrize("transport", [None, "auto"])
def test_lamina_train_runs_the_ray_engine_by_default(ray_local: str, data: str, tmp_path: Path,
                                                     transport: str | None) -> None:
    run_dir = tmp_path / "clirun"
    rc = cli.main(["train", "--data", data, "--layers", "conv:8,conv:8", "--size", "16", "--clips", "4",
                   "--clip-len", "3", "--steps", "5", "--run-dir", str(run_dir),
                   *(["--transport", transport] if transport else [])])

    assert rc == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["engine"], config["run_dir"], config["transport"]) == ("ray", str(run_dir), transport or "object-store")
    metrics = RunDir(run_dir).read_metrics().to_pydict()
    assert list(zip(metrics["step"], metrics["layer"], metrics["stage"], strict=True)) == \
        [(m, k, k) for m in range(5) for k in (0, 1)]  # one stage per layer
    checkpoint = RunDir(run_dir).store(TrainConfig.from_dict(config)).load_latest()
    assert checkpoint is not None and checkpoint.step == 5 and [s["steps"] for s in checkpoint.learners] == [5, 5]
    assert checkpoint.meta["in_shape"] == [1, 16, 16]


# -- the measurement behind the transport ---------------------------------------------------------------


def test_transport_bench_measures_every_transport_against_memcpy(ray_local: str) -> None:
    rows = transport_bench.hop_costs(sizes=[64 * 1024], rounds=3, warmup=1)

    (row,) = rows
    assert set(row.ms) == {*transport_bench.TRANSPORTS, "memcpy", "memcpy-new"}
    assert all(ms > 0 for ms in row.ms.values())  # each against memcpy in the table: the comparison is the bench's
    assert transport_bench.hop_table(rows).splitlines()[2].startswith("| 64 KB |")
