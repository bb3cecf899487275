"""Stages with slack give way (pipeline/slack.py): the policy on made-up step times, in a thread of its own,
and in a real pipeline, where the light stage's stepping thread ends at SCHED_IDLE and the bottleneck's never
leaves SCHED_OTHER."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from support import Recorder, setup, tiny_config, tiny_npz

from pipeline import slack
from pipeline.engines.placement import StageActors
from pipeline.engines.ray_engine import RayPipeline

pytestmark = pytest.mark.skipif(not slack.possible(), reason="this process cannot take SCHED_OTHER back (CAP_SYS_NICE)")

Step = tuple[float, float, float]  # the step's seconds, the wait before it, the fraction of it on a core


def policies(steps: list[Step]) -> list[int]:
    """Feed a GiveWay these steps from a fresh thread; its thread's policy after each."""
    got: list[int] = []
    errors: list[BaseException] = []

    def feed() -> None:
        try:
            way, t = slack.GiveWay(), 0.0
            for seconds, wait, ran in steps:
                start = t + wait
                t = start + seconds
                way.step(start, t, ran * seconds)
                got.append(os.sched_getscheduler(0))
                assert way.idle == (got[-1] == IDLE)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)

    thread = threading.Thread(target=feed)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return got


IDLE, OTHER = getattr(os, "SCHED_IDLE", -1), os.SCHED_OTHER
SLACK: Step = (0.04, 0.03, 1.0)  # busy 0.57, on its core throughout: the bench's top stage
BUSY: Step = (0.07, 0.0005, 0.97)  # busy 0.99: a bottleneck


def test_a_stage_with_slack_gives_way_and_takes_its_priority_back_once_it_is_the_bottleneck() -> None:
    got = policies([SLACK] * (slack.STEPS + 1) + [BUSY] * slack.STEPS)
    assert got[:slack.STEPS] == [OTHER] * slack.STEPS  # not before a window's worth of steps
    assert got[slack.STEPS] == IDLE
    # The median turns once more than half the window is busy.
    assert got[-1] == OTHER and got.index(OTHER, slack.STEPS) == slack.STEPS + slack.STEPS // 2 + 1


def test_a_bottleneck_keeps_its_priority_through_a_pause() -> None:
    pause: Step = (0.07, 2.0, 0.97)  # the driver writing a barrier, say
    assert set(policies([BUSY] * 12 + [pause] + [BUSY] * 12)) == {OTHER}


def test_stages_time_sharing_a_core_never_give_way() -> None:
    assert set(policies([(0.08, 0.06, 0.5)] * 30)) == {OTHER}  # busy 0.57, but half of each step waiting


def test_a_stage_that_giving_way_left_waiting_for_a_core_takes_its_priority_back() -> None:
    starved: Step = (0.2, 0.03, 0.2)  # busy 0.87: between the thresholds, but held back 80% of its steps
    got = policies([SLACK] * (slack.STEPS + 1) + [starved] * slack.STEPS)
    assert got[slack.STEPS] == IDLE and got[-1] == OTHER


def test_stages_give_way_only_where_each_stepping_thread_has_a_core() -> None:
    cores = len(os.sched_getaffinity(0))
    assert slack.fits(cores) and not slack.fits(cores + 1)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_npz(tmp_path_factory.mktemp("data"))


def stepping_policies(pid: int) -> set[int]:
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out.add(os.sched_getscheduler(int(task.name)))
        except OSError:  # the thread ended meanwhile
            pass
    return out


@pytest.mark.timeout(180)
@pytest.mark.parametrize("yield_slack", ["on", "off"])
def test_in_a_pipeline_the_light_stage_gives_way_and_the_bottleneck_does_not(ray_local: str, data: str,
                                                                              yield_slack: str) -> None:
    if not slack.fits(2):
        pytest.skip("fewer than 2 cores: two stages would time-share one, and never give way")
    cfg = tiny_config(data, layers="conv:64,mlp:4", size=32, clip_len=6, steps=60, transport="shm", yield_slack=yield_slack)
    spec, sampler = setup(cfg)
    calls = Recorder()
    with StageActors(cfg, spec) as actors:
        RayPipeline(actors).train(sampler, 0, cfg.steps, calls)
        got = [stepping_policies(int(i["pid"])) for i in actors.info]
        # Both stages on this machine: two stepping threads, each with a core where the machine has two.
        assert [actors._node_threads(k) for k in range(2)] == ([2, 2] if yield_slack == "on" else [None, None])
    busy = [r.busy for r in calls.calls[-1][1]]  # each stage's busy fraction over its last steps
    print(busy, got)
    assert busy[0] > slack.HIGH > slack.LOW > busy[1], busy  # what the test is about: a bottleneck, and slack
    assert IDLE not in got[0]
    assert (IDLE in got[1]) == (yield_slack == "on")
    # ... and each says so in its report (the progress line, the lamina_giving_way gauge)
    assert [r.giving_way for r in calls.calls[-1][1]] == [False, yield_slack == "on"]
