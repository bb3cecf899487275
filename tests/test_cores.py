"""--pin-cpus (pipeline/cores.py): the plan of cores per node, and the stage processes' threads after a run:
the thread that stepped runs on its stage's core, every other thread anywhere."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import ray
from support import Recorder, setup, tiny_config, tiny_npz

from pipeline import cores
from pipeline.checkpoints import CheckpointStore
from pipeline.engines.actors import NAMESPACE
from pipeline.engines.placement import StageActors
from pipeline.engines.ray_engine import RayPipeline


def test_each_node_gives_its_stages_consecutive_blocks_in_order() -> None:
    got = cores.plan([("a", 1), ("b", 2), ("a", 2), ("b", 1)], {"a": (0, 1, 2, 3), "b": (4, 5, 6)})
    assert got == [(0,), (4, 5), (1, 2), (6,)]


def test_a_node_whose_stages_do_not_fit_is_left_alone_and_the_others_are_pinned() -> None:
    got = cores.plan([("a", 1), ("b", 1), ("a", 1), ("a", 1)], {"a": (0, 1), "b": (2, 3)})
    assert got == [None, (2,), None, None]
    assert cores.plan([("c", 1)], {}) == [None]  # a node that cannot say which cores it has


def test_pin_thread_moves_the_calling_thread_only() -> None:
    if len(cores.available()) < 2:
        pytest.skip("needs 2 cores")
    seen: dict[str, set[int]] = {}

    def pinned() -> None:
        cores.pin_thread([cores.available()[0]])
        seen["thread"] = os.sched_getaffinity(0)

    t = threading.Thread(target=pinned)
    t.start()
    t.join()
    assert seen["thread"] == {cores.available()[0]}
    assert len(os.sched_getaffinity(0)) >= 2  # this thread, and so the process's others, untouched


def test_the_registry_holds_the_cores_of_live_other_drivers_only(tmp_path: Path) -> None:
    registry = cores.Registry(tmp_path)
    other = subprocess.Popen(["sleep", "60"])
    try:
        with registry.locked():
            registry.claim("run-a", [3])  # this driver's own: never in its own way
            registry.claim("run-a", [4])
            registry.claim("run-b", [5])
            (tmp_path / f"{other.pid}-run-c").write_text("0,1")
            assert registry.held() == {0, 1}
        registry.release("run-b")
        other.kill()
        other.wait()
        with registry.locked():
            assert registry.held() == set()
        assert [f.name for f in tmp_path.glob("[0-9]*")] == [f"{os.getpid()}-run-a"]  # gone, released: removed
        assert (tmp_path / f"{os.getpid()}-run-a").read_text() == "3,4"
    finally:
        other.kill()


@pytest.fixture(autouse=True)
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A registry of this test's own: another run on this machine holds no core here."""
    monkeypatch.setattr(cores, "REGISTRY_DIR", tmp_path / "registry")
    return tmp_path / "registry"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_npz(tmp_path_factory.mktemp("data"))


def restricted(pid: int) -> list[set[int]]:
    """The affinity of each thread of `pid` that may not run on every core the process may."""
    allowed = set(cores.available())
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            mask = os.sched_getaffinity(int(task.name))
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
        if mask != allowed:
            out.append(mask)
    return out


def trained(cfg: Any, check: Any) -> None:
    spec, source = setup(cfg)
    with StageActors(cfg, spec) as actors:
        RayPipeline(actors).train(source, 0, cfg.steps, Recorder())
        check(actors)


@pytest.mark.parametrize("transport", ["object-store", "shm", "direct", "compiled-graph"])
def test_each_stage_steps_on_a_core_of_its_own(ray_local: str, data: str, tmp_path: Path, transport: str) -> None:
    if len(cores.available()) < 2:
        pytest.skip("needs 2 cores")
    first, second = cores.available()[:2]

    def check(actors: StageActors) -> None:
        assert actors.pinned == [[(first,)], [(second,)]]
        for i, mine in zip(actors.info, (first, second), strict=True):
            assert restricted(int(i["pid"])) == [{mine}]  # the thread that stepped, and only it

    trained(tiny_config(data, layers="conv:8,conv:8", transport=transport, run_dir=str(tmp_path / "run")), check)


def test_a_replaced_stage_steps_on_its_predecessors_core(ray_local: str, data: str, tmp_path: Path) -> None:
    if len(cores.available()) < 2:
        pytest.skip("needs 2 cores")
    cfg = tiny_config(data, layers="conv:8,conv:8", steps=12, checkpoint_every=3, run_dir=str(tmp_path / "run"))
    spec, source = setup(cfg)
    with StageActors(cfg, spec) as actors:
        pipe = RayPipeline(actors, CheckpointStore(str(tmp_path / "ck")))
        first = actors.info[1]["pid"]
        pipe.train(source, 0, cfg.steps, Recorder(lambda m: ray.kill(actors.handles[1]) if m == 5 else None))
        assert pipe.recovery is not None and pipe.recovery.count == 1
        assert actors.info[1]["pid"] != first
        assert actors.pinned == [[(cores.available()[0],)], [(cores.available()[1],)]]
        assert restricted(int(actors.info[1]["pid"])) == [{cores.available()[1]}]


def test_a_replica_steps_on_a_core_of_its_own(ray_local: str, data: str, tmp_path: Path) -> None:
    if len(cores.available()) < 2:
        pytest.skip("needs 2 cores")
    first, second = cores.available()[:2]

    def check(actors: StageActors) -> None:
        assert actors.pinned == [[(first,), (second,)]]
        follower = ray.get_actor(f"{actors.names[0]}-replica1", namespace=NAMESPACE)
        assert restricted(int(ray.get(follower.info.remote())["pid"])) == [{second}]
        assert restricted(int(actors.info[0]["pid"])) == [{first}]

    trained(tiny_config(data, layers="conv:8", replicas="2", run_dir=str(tmp_path / "run")), check)


@pytest.mark.parametrize("overrides", [{"pin_cpus": "off"}, {"layers": "conv:8,conv:8,conv:8,conv:8"}],
                         ids=["off", "more stages than cores"])
def test_nothing_is_pinned_when_off_or_when_the_stages_do_not_fit(ray_local: str, data: str, tmp_path: Path,
                                                                   overrides: dict[str, str]) -> None:
    cfg = tiny_config(data, **{"layers": "conv:8,conv:8", "run_dir": str(tmp_path / "run"), **overrides})
    if len(cores.available()) >= len(cfg.layers.split(",")) and cfg.pin_cpus != "off":
        pytest.skip("this machine has a core for every stage")

    def check(actors: StageActors) -> None:
        assert all(c is None for per_stage in actors.pinned for c in per_stage)
        assert all(restricted(int(i["pid"])) == [] for i in actors.info)

    trained(cfg, check)


def test_a_second_run_on_the_machine_plans_around_the_cores_the_first_holds(
        ray_local: str, data: str, tmp_path: Path, registry: Path) -> None:
    if len(cores.available()) != 2:
        pytest.skip("written for 2 cores")
    first, second = cores.available()
    other = subprocess.Popen(["sleep", "120"])  # stands in for another driver, its stage on the first core
    try:
        registry.mkdir()
        (registry / f"{other.pid}-run").write_text(str(first))

        def one_stage(actors: StageActors) -> None:
            assert actors.pinned == [[(second,)]]
            assert (registry / f"{os.getpid()}-{actors.run_id}").read_text() == str(second)

        def two_stages(actors: StageActors) -> None:
            assert actors.pinned == [[None], [None]]  # one core left for two stages: none pinned

        trained(tiny_config(data, layers="conv:8", run_dir=str(tmp_path / "one")), one_stage)
        assert [f.name for f in registry.glob("[0-9]*")] == [f"{other.pid}-run"]  # the finished run's released
        trained(tiny_config(data, layers="conv:8,conv:8", run_dir=str(tmp_path / "two")), two_stages)
    finally:
        other.kill()


def test_a_record_out_of_reach_leaves_the_stages_unpinned_and_the_run_going(
        ray_local: str, data: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr(cores, "REGISTRY_DIR", tmp_path / "a-file" / "registry")  # cannot be made

    def check(actors: StageActors) -> None:
        assert actors.pinned == [[None]]
        assert restricted(int(actors.info[0]["pid"])) == []

    trained(tiny_config(data, layers="conv:8", run_dir=str(tmp_path / "run")), check)
