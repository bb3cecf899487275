"""Stages with slack give way (pipeline/slack.py): the decision on made-up step times, a step at SCHED_IDLE
and back in a thread of its own, and a real pipeline, where the light stage's steps give way and the
bottleneck's never do."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import pytest
from support import Recorder, setup, tiny_config, tiny_npz

from pipeline import slack
from pipeline.engines.placement import StageActors
from pipeline.engines.ray_engine import RayPipeline

privileged = pytest.mark.skipif(not slack.possible(), reason="this process cannot take SCHED_OTHER back (CAP_SYS_NICE)")

Step = tuple[float, float, float]  # the step's seconds, the wait before it, the fraction of it on a core
SLACK: Step = (0.04, 0.03, 1.0)  # busy 0.57, on its core throughout: the bench's top stage
BUSY: Step = (0.07, 0.0005, 0.97)  # busy 0.99: a bottleneck


def decisions(steps: list[Step]) -> list[bool]:
    """Whether the steps after each of these would give way."""
    way, t, got = slack.GiveWay(), 0.0, []
    for seconds, wait, ran in steps:
        start = t + wait
        t = start + seconds
        way.record(start, t, ran * seconds)
        got.append(way.idle)
    return got


def test_a_stage_with_slack_gives_way_and_takes_its_priority_back_once_it_is_the_bottleneck() -> None:
    got = decisions([SLACK] * (slack.STEPS + 1) + [BUSY] * slack.STEPS)
    assert got[:slack.STEPS] == [False] * slack.STEPS  # not before a window's worth of steps
    assert got[slack.STEPS]
    # The median turns once more than half the window is busy.
    assert not got[-1] and got.index(False, slack.STEPS) == slack.STEPS + slack.STEPS // 2 + 1


def test_a_bottleneck_keeps_its_priority_through_a_pause() -> None:
    pause: Step = (0.07, 2.0, 0.97)  # the driver writing a barrier, say
    assert not any(decisions([BUSY] * 12 + [pause] + [BUSY] * 12))


def test_stages_time_sharing_a_core_never_give_way() -> None:
    assert not any(decisions([(0.08, 0.06, 0.5)] * 30))  # busy 0.57, but half of each step waiting


def test_a_step_that_giving_way_held_back_ends_it_at_once() -> None:
    held: Step = (0.2, 0.03, 0.2)  # 80% of the step waiting for a core
    got = decisions([SLACK] * (slack.STEPS + 1) + [held, SLACK])
    assert got[slack.STEPS] and got[-2:] == [False, True]  # back at once; the median still says slack


def test_stages_give_way_only_where_each_has_a_core() -> None:
    n = slack.cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))
    assert slack.fits(n) == slack.possible() and not slack.fits(n + 1)


def in_thread(fn: Callable[[], Any]) -> Any:
    out: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return out[0]


@privileged
def test_only_the_step_runs_at_sched_idle_and_threads_started_outside_it_do_not_inherit_it() -> None:
    def steps() -> list[int]:
        way = slack.GiveWay()
        way.idle = True
        seen = []
        with way:
            seen.append(os.sched_getscheduler(0))
        seen.append(os.sched_getscheduler(0))  # a snapshot, a restore: at the normal priority
        seen.append(in_thread(lambda: os.sched_getscheduler(0)))  # a thread started there
        assert way.stepped_idle
        return seen

    assert in_thread(steps) == [os.SCHED_IDLE, os.SCHED_OTHER, os.SCHED_OTHER]


@privileged
def test_a_thread_set_to_another_policy_is_left_alone() -> None:
    def step() -> int:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        way = slack.GiveWay()
        way.idle = True
        with way:
            inside = os.sched_getscheduler(0)
        assert not way.stepped_idle
        return inside

    assert in_thread(step) == os.SCHED_BATCH


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_npz(tmp_path_factory.mktemp("data"))


@privileged
@pytest.mark.timeout(180)
@pytest.mark.parametrize("yield_slack", ["on", "off"])
def test_in_a_pipeline_the_light_stage_gives_way_and_the_bottleneck_never_does(ray_local: str, data: str,
                                                                                yield_slack: str) -> None:
    if not slack.fits(2):
        pytest.skip("fewer than 2 cores: two stages would time-share one, and never give way")
    # Stage 0 steps a 128-channel conv (about 25 ms), stage 1 a 4-unit layer: one waits for the other most of
    # the time, and stage 0's step is long beside what a stray process on the machine takes from it.
    cfg = tiny_config(data, layers="conv:128,mlp:4", size=32, clip_len=6, steps=60, transport="shm",
                      yield_slack=yield_slack)
    spec, sampler = setup(cfg)
    calls = Recorder()
    with StageActors(cfg, spec) as actors:
        RayPipeline(actors).train(sampler, 0, cfg.steps, calls)
    busy = [r.busy for r in calls.calls[-1][1]]  # each stage's busy fraction over its last steps
    assert busy[0] > slack.HIGH > slack.LOW > busy[1], busy  # what the test is about: a bottleneck, and slack
    gave = [[r.giving_way for _, reports in calls.calls for r in reports if r.stage == k] for k in (0, 1)]
    assert not any(gave[0])
    assert any(gave[1]) == (yield_slack == "on")
