"""Every stage-to-stage transport keeps the pipeline's promises: the sequential loop's weights bit for bit,
barrier checkpoints, a stage's own error stopping the run once, and a lost stage recovered exactly once —
for a compiled graph, by tearing the graph down and compiling it again over the replaced actors; for the
shm channels, by closing them, letting every loop end and opening a fresh set.

The object-store transport is what tests/test_pipeline.py and tests/test_recovery.py run by default; here
the compiled graph, Ray Direct Transport (gloo on the cpu) and the shm channels run the same checks.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from support import (
    NaNAt,
    Recorder,
    count_tensors,
    flatten,
    piped_and_sequential,
    run_actors,
    sequential,
    setup,
    small_config,
    state_differences,
    tiny_config,
    tiny_npz,
    wait_until,
)

from pipeline.checkpoints import CheckpointStore
from pipeline.config import TrainConfig
from pipeline.control import RunControl
from pipeline.engines import compiled_graph, shm, transport
from pipeline.engines.actors import TransferLost, get
from pipeline.engines.placement import StageActors
from pipeline.engines.ray_engine import RayPipeline, run_ray
from pipeline.errors import ConfigError, StageError, StageLost

pytestmark = pytest.mark.timeout(240)

CG = "compiled-graph"
DIRECT = "direct"
SHM = "shm"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_npz(tmp_path_factory.mktemp("data"))


def test_auto_picks_per_device_kind_and_a_bad_name_is_refused() -> None:
    assert transport.resolve("auto", "cpu") in transport.TRANSPORTS
    assert transport.resolve("auto", "cuda") in transport.TRANSPORTS
    assert transport.resolve("object-store", "cuda") == "object-store"
    with pytest.raises(ConfigError, match="--transport"):
        transport.resolve("pigeon", "cpu")
    with pytest.raises(ConfigError, match="--transport"):
        TrainConfig(transport="pigeon")
    # shared memory needs one node: auto never picks it across nodes, and asking for it there is refused
    assert transport.resolve("auto", "cpu", nodes=2) != SHM
    assert transport.resolve("shm", "cpu", nodes=1) == SHM
    with pytest.raises(ConfigError, match="shm needs the driver and every stage on one node"):
        transport.resolve("shm", "cpu", nodes=2)


def test_channel_directories_of_drivers_that_are_gone_are_swept(tmp_path: Path) -> None:
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True,
                          text=True).stdout.strip()
    for name in (f"lamina-run-ab12-p{dead}-x1y2", f"lamina-run-ab12-p{os.getpid()}-x3y4", "lamina-not-a-channel-dir"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "in0.slot0.1").write_bytes(b"\0" * 16)
    assert shm.sweep(str(tmp_path)) == [f"lamina-run-ab12-p{dead}-x1y2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lamina-not-a-channel-dir", f"lamina-run-ab12-p{os.getpid()}-x3y4"]


VARIANTS = {  # (overrides, stages, resume at)
    "3-stages": ({}, 3, 0),
    "2-layers-per-stage-resumed": ({"layers_per_stage": 2, "queue_depth": 3}, 2, 4),
    "mlp-top-depth-1": ({"layers": "conv:8,conv:8,mlp:16", "queue_depth": 1}, 3, 0),
}


@pytest.mark.parametrize("kind", [CG, DIRECT, SHM])
@pytest.mark.parametrize("variant", [v if v != "mlp-top-depth-1" else pytest.param(v, marks=pytest.mark.slow)
                                     for v in VARIANTS])
def test_every_transport_equals_the_sequential_loop_bit_for_bit(ray_local: str, data: str, tmp_path: Path,
                                                                variant: str, kind: str) -> None:
    overrides, stages, resume_at = VARIANTS[variant]
    cfg = tiny_config(data, steps=10, transport=kind, **overrides)
    # Direct Transport: under load one of Ray's transfers can fail on its own (Ray gives up on it after 60 s;
    # a CI run met it once, at this test). That is a lost stage to the driver, so this run keeps barriers and
    # recovers, exactly once and bit for bit like any other loss, instead of stopping.
    store = CheckpointStore(str(tmp_path / "ck")) if kind == DIRECT else None
    piped, ref, piped_calls, ref_calls = piped_and_sequential(cfg, resume_at, store)

    assert {r.stage for _, reports in piped_calls.calls for r in reports} == set(range(stages))
    assert count_tensors(piped) == count_tensors(ref) > 3 * cfg.n_layers
    assert state_differences(piped, ref) == []
    assert piped_calls.steps == list(range(resume_at, cfg.steps))
    assert piped_calls.layers() == ref_calls.layers()[resume_at:]


@pytest.mark.gpu
def test_a_compiled_graph_between_gpus_hands_tensors_on_and_matches_the_host_path(ray_local: str, data: str) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices: NCCL refuses two ranks on one device")
    cfg = tiny_config(data, steps=6, layers_per_stage=2, gpus_per_stage=1.0, transport=CG)  # stages 0-1 | 2
    spec, sampler = setup(cfg)
    with StageActors(cfg, spec) as actors:
        assert actors.transport.on_device  # type: ignore[attr-defined]
        pipe = RayPipeline(actors)
        pipe.train(sampler, 0, cfg.steps, Recorder())
        on_device = pipe.states()
    # The same GPUs, each output through host memory and the object store: the same values to float tolerance
    # (GPU kernels need not repeat their reduction order bit for bit).
    host = run_ray(dataclasses.replace(cfg, transport="object-store"), spec, sampler, Recorder()).states
    a, b = dict(flatten(on_device)), dict(flatten(host))
    assert a.keys() == b.keys() and count_tensors(on_device) > 3 * cfg.n_layers
    for path, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.allclose(value, b[path], rtol=1e-4, atol=1e-6), path


def small(data: str, tmp_path: Path, **overrides: Any) -> TrainConfig:
    return small_config(data, tmp_path, **{"transport": CG, **overrides})


@pytest.fixture(scope="module")
def data8(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_npz(tmp_path_factory.mktemp("data8"), size=8)


@pytest.mark.parametrize(("kind", "how"), [(CG, "ray.kill"), pytest.param(CG, "SIGKILL", marks=pytest.mark.slow),
                                           (DIRECT, "ray.kill"), (SHM, "ray.kill"), (SHM, "SIGKILL")])
def test_a_lost_stage_is_recovered_exactly_once_and_bit_for_bit(ray_local: str, data8: str, tmp_path: Path,
                                                                kind: str, how: str) -> None:
    cfg = small(data8, tmp_path, transport=kind)
    spec, sampler = setup(cfg)
    store = CheckpointStore(str(tmp_path / "ck"), keep=cfg.keep_checkpoints)
    with StageActors(cfg, spec) as actors:
        assert actors.transport.name == kind
        pipe = RayPipeline(actors, store)
        first = list(actors.handles)

        def kill(m: int) -> None:
            if m == 7:  # after checkpoint 6 is complete; stage 1 dies mid-run
                if how == "ray.kill":
                    ray.kill(actors.handles[1])
                else:
                    import os
                    import signal
                    os.kill(ray.get(actors.handles[1].info.remote())["pid"], signal.SIGKILL)

        calls = Recorder(kill)
        pipe.train(sampler, 0, cfg.steps, calls)
        states, ledgers = pipe.states(), pipe.ledgers()
        compiles = getattr(actors.transport, "compiles", None)
        opens = getattr(actors.transport, "opens", None)
        replaced = [a is not b for a, b in zip(first, actors.handles, strict=True)]
    assert pipe.recovery is not None
    # Direct Transport: under load a transfer of Ray's can fail on its own (test below); each such failure is
    # one more recovery, with the same guarantees. The others recover once.
    assert pipe.recovery.count == 1 or (kind == DIRECT and pipe.recovery.count > 1), pipe.recovery.count
    if kind == CG:
        assert compiles == 2 and replaced[1]  # torn down, the dead stage replaced, the graph compiled again
    elif kind == SHM:
        assert opens == 2 and replaced == [False, True, False]  # the survivors' loops ended; new channels
    else:
        assert all(replaced)  # the group broke: every stage came back as a new actor, in a new group
    assert calls.steps == list(range(cfg.steps))
    assert all(lg.exactly_once(cfg.steps) for lg in ledgers), ledgers
    assert state_differences(states, sequential(cfg, setup(cfg)[1])) == []
    final = store.load_latest()
    assert final is not None and final.step == cfg.steps and all(lg.exactly_once(cfg.steps) for lg in final.ledgers)
    assert wait_until(lambda: run_actors(pipe.actors.run_id) == [])  # ray.kill returns before the actor is gone


@ray.remote
class _Looping:
    def loop(self) -> None:
        time.sleep(3600)


class _StuckGraph:
    """What Ray's teardown does with a stage loop that does not stop, unless it kills the actors: it waits
    for the loop, without end."""

    def __init__(self, actor: Any) -> None:
        self.worker_task_refs = {actor: actor.loop.remote()}

    def teardown(self, kill_actors: bool) -> None:
        ray.get(list(self.worker_task_refs.values()))


def test_a_graph_loop_that_never_stops_is_killed_not_waited_for(ray_local: str, data: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # A recovery tears the graph down without killing the survivors. Ray's teardown then waits for every
    # loop to end, and for one that does not, forever: the driver kills it after CANCEL_S + TEARDOWN_S
    # instead, and the replacement of dead actors that follows replaces it.
    monkeypatch.setattr(compiled_graph, "CANCEL_S", 1)
    monkeypatch.setattr(compiled_graph, "TEARDOWN_S", 1)
    with StageActors(tiny_config(data, transport=CG), setup(tiny_config(data))[0]) as actors:
        stuck = _Looping.remote()
        graph = _StuckGraph(stuck)
        actors.transport._graph = graph  # type: ignore[attr-defined]
        actors.transport.reset()
        assert not actors.transport._opened()  # type: ignore[attr-defined]
        with pytest.raises(ray.exceptions.ActorDiedError):
            ray.get(graph.worker_task_refs[stuck], timeout=60)


def test_an_input_that_never_arrived_is_a_lost_stage_not_a_stage_error(ray_local: str) -> None:
    # Ray gives up on a Direct Transport transfer after 60 s; the stage's call then never ran, and its report
    # says so. The driver recovers it like a lost stage instead of stopping the run.
    @ray.remote
    def report_of_a_step_that_never_ran() -> None:
        raise TransferLost("stage1: the input of micro-batch 6 never arrived from the stage below")

    with pytest.raises(StageLost, match="never arrived"):
        get(report_of_a_step_that_never_ran.remote(), 1, 6, "stage1")


def test_a_stage_ray_dropped_from_the_direct_group_is_a_lost_stage(ray_local: str, data: str) -> None:
    # Ray removes both ends of a failed transfer from the group; a step submitted to one of them after that
    # is refused at the call. The driver takes it as the stage lost (and recovers), not as a crash.
    cfg = tiny_config(data, transport=DIRECT)
    spec, sampler = setup(cfg)
    with StageActors(cfg, spec) as actors:
        actors.transport.begin(None)
        actors.transport._destroy()  # type: ignore[attr-defined]  # the group gone, as after a failed transfer
        with pytest.raises(StageLost, match="stage 0"):
            actors.transport.step(0, 0, sampler.batch(0).frames.numpy())


@pytest.mark.parametrize("kind", ["object-store", CG, DIRECT, SHM])
def test_a_stage_error_stops_the_run_once_and_is_not_retried(ray_local: str, data8: str, tmp_path: Path,
                                                            kind: str) -> None:
    cfg = small(data8, tmp_path, steps=8, checkpoint_every=2, transport=kind)
    spec, sampler = setup(cfg)
    with StageActors(cfg, spec) as actors:
        pipe = RayPipeline(actors, CheckpointStore(str(tmp_path / "ck")))
        with pytest.raises(StageError, match="micro-batch 4: FloatingPointError") as info:
            pipe.train(NaNAt(sampler, 4), 0, cfg.steps, Recorder())
        # Not retried: the run made no recovery (Direct Transport: but for one of a transfer Ray lost on its own
        # before micro-batch 4, as in the recovery test above; the StageError path is the same for all).
        assert type(info.value) is StageError and pipe.recovery is not None
        assert pipe.recovery.count == 0 or kind == DIRECT, pipe.recovery.count


@pytest.mark.parametrize("kind", [CG, SHM])
def test_barriers_in_the_stream_checkpoint_a_stop_and_resume_equals_the_uninterrupted_run(
        ray_local: str, data8: str, tmp_path: Path, kind: str) -> None:
    cfg = small(data8, tmp_path, steps=14, checkpoint_every=0, transport=kind)
    spec, sampler = setup(cfg)
    store = CheckpointStore(str(tmp_path / "ck"), keep=5)
    control = RunControl()

    def hook(m: int) -> None:
        if m == 2:
            control.request_checkpoint()
        if m == 6:
            control.request_stop()

    stopped = run_ray(cfg, spec, sampler, Recorder(hook), store=store, control=control).stopped_at
    assert stopped is not None and 7 <= stopped < cfg.steps
    complete = store.complete()
    assert complete[0] == 0 and complete[-1] == stopped and len(complete) == 3, complete  # init, requested, stop
    ckpt = store.load_latest()
    assert ckpt is not None and all(lg.exactly_once(stopped) for lg in ckpt.ledgers)
    # The barriers hold the sequential loop's state at their step, bit for bit.
    assert state_differences(ckpt.learners, sequential(dataclasses.replace(cfg, steps=stopped), sampler)) == []
    calls = Recorder()
    resumed = run_ray(cfg, spec, sampler, calls, resume=ckpt, store=store).states
    assert calls.steps == list(range(stopped, cfg.steps))
    assert state_differences(resumed, sequential(cfg, sampler)) == []
