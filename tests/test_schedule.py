"""The schedule as data, without Ray or torch: admission window, barriers, drain, and the timeline of
[Note: channels] in pipeline/schedule.py. Milliseconds."""

from __future__ import annotations

import itertools
import random

import pytest

from pipeline.errors import ConfigError
from pipeline.schedule import Action, Commit, Schedule, Snapshot, Step, Wait, render, simulate, timeline


def check(actions: list[Action], sched: Schedule, end: int) -> None:
    """Every invariant an engine relies on, for a run that handed out [start, end)."""
    s, d, start = sched.stages, sched.depth, sched.start
    pos = {a: i for i, a in enumerate(actions)}
    assert len(pos) == len(actions), "an action appears twice"
    for k in range(s):
        mine = [a for a in actions if isinstance(a, Step | Snapshot) and a.stage == k]
        assert [a.m for a in mine if isinstance(a, Step)] == list(range(start, end))  # in order, each once
        for i, a in enumerate(mine):  # a snapshot sits right behind its step on the same stage
            if isinstance(a, Snapshot) and a.m >= start:
                assert mine[i - 1] == Step(k, a.m)
        for m in range(start, end):
            assert pos[Step(k, m)] < pos[Wait(k, m)]  # nothing is waited for before it is handed out
            if k:
                assert pos[Step(k - 1, m)] < pos[Step(k, m)]  # its input is submitted first
            gate = (k + 1 if k + 1 < s else k, m - d - 1)  # [Note: channels]: the admission window
            if gate[1] >= start:
                assert pos[Wait(*gate)] < pos[Step(k, m)], (k, m)
    tops = [a.m for a in actions if isinstance(a, Wait) and a.stage == s - 1]
    assert tops == list(range(start, end))  # reports complete in order of m
    for a in actions:
        if isinstance(a, Commit):
            assert all(pos[Snapshot(k, a.m)] < pos[a] for k in range(s))
            if a.m >= start:
                assert pos[Wait(s - 1, a.m)] < pos[a]


@pytest.mark.parametrize(("stages", "depth", "start", "stop", "every"),
                         [c for c in itertools.product([1, 2, 3, 5], [0, 1, 2, 4], [0, 7], [7, 20], [0, 3])
                          if c[1] or c[0] == 1])
def test_every_invariant_holds(stages: int, depth: int, start: int, stop: int, every: int) -> None:
    sched = Schedule(stages, depth, start, stop, every=every, checkpoints=True, initial=True)
    actions = list(sched)
    check(actions, sched, stop)
    commits = [a.m for a in actions if isinstance(a, Commit)]
    periodic = [m for m in range(start, stop) if every and (m + 1) % every == 0]
    expected = sorted({start - 1, *periodic} | ({stop - 1} if stop > start else set()))
    assert commits == (expected if stop > start else [])
    assert sched.stopped_at is None


def test_two_stages_read_as_the_note_says() -> None:
    assert render(Schedule(2, 2, 0, 5)) == ("0S0 1S0 0S1 1S1 0S2 1S2 0W0 1W0 0S3 1S3 0W1 1W1 0S4 1S4 "
                                            "0W2 1W2 0W3 1W3 0W4 1W4")
    assert render(Schedule(1, 0, 0, 3, checkpoints=True, every=2)) == "0S0 0W0 0S1 0B1 0W1 0S2 0B2 C1 0W2 C2"
    assert render(Schedule(2, 1, 0, 2, checkpoints=True), per_line=4) == "0S0 1S0 0S1 0B1\n1S1 1B1 0W0 1W0\n0W1 1W1 C1"


def test_backpressure_timeline_of_the_note() -> None:
    runs = simulate(Schedule(2, 2, 0, 6), [1.0, 2.0])
    assert timeline(runs, cols=9).splitlines() == [
        "time ->      1   2   3   4   5   6   7   8   9",
        "stage 0     m0  m1  m2  m3   .  m4   .  m5   .",
        "stage 1         m0  m0  m1  m1  m2  m2  m3  m3",
    ]


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_a_fast_stage_is_held_exactly_depth_ahead(depth: int) -> None:
    runs = simulate(Schedule(3, depth, 0, 40), [0.3, 0.5, 1.0])
    for k in range(2):
        ends = sorted(e for _, _, e in runs[k + 1])
        # When stage k starts m, stage k+1 has finished all but `lead` of the micro-batches before m.
        leads = [m - sum(e <= s for e in ends) for m, s, _ in runs[k]]
        assert max(leads) == depth, (k, leads)  # never more than D, and the bound binds


@pytest.mark.parametrize("stages", range(1, 9))
def test_the_fixed_order_of_waits_never_starves_the_bottleneck(stages: int) -> None:
    rng = random.Random(stages)
    for _ in range(20):
        durations = [rng.uniform(0.2, 1.0) for _ in range(stages)]
        b = rng.randrange(stages)
        durations[b] = 1.0
        runs = simulate(Schedule(stages, rng.choice([1, 2]), 0, 50), durations)
        steady = runs[b][10:45]
        # In steady state the bottleneck starts every step the moment it finished the one before.
        gaps = [s1 - e0 for (_, _, e0), (_, s1, _) in itertools.pairwise(steady)]
        assert max(gaps) < 1e-9, (durations, b, gaps)


def test_lock_step_depth_0_reports_each_micro_batch_before_handing_out_the_next() -> None:
    actions = list(Schedule(1, 0, 3, 6))
    assert actions == [Step(0, 3), Wait(0, 3), Step(0, 4), Wait(0, 4), Step(0, 5), Wait(0, 5)]


def test_a_checkpoint_request_puts_a_barrier_behind_the_next_micro_batch() -> None:
    sched = Schedule(3, 2, 0, 12, checkpoints=True)
    actions: list[Action] = []
    for a in sched:
        actions.append(a)
        if a == Wait(2, 1):
            sched.request_checkpoint()
            handed = sched.handed[0]
    check(actions, sched, 12)
    assert [a.m for a in actions if isinstance(a, Commit)] == [handed, 11]
    assert actions.index(Snapshot(0, handed)) == actions.index(Step(0, handed)) + 1


@pytest.mark.parametrize(("stages", "depth"), [(1, 0), (2, 2), (3, 1), (4, 3)])
@pytest.mark.parametrize("at", [0, 5, 30])
def test_a_stop_drains_what_stage_0_was_handed_then_checkpoints(stages: int, depth: int, at: int) -> None:
    sched = Schedule(stages, depth, 2, 40, every=10, checkpoints=True, initial=True)
    actions: list[Action] = []
    for i, a in enumerate(sched):
        actions.append(a)
        if i == at:
            handed = sched.handed[0]
            assert sched.request_stop()
            assert not sched.request_stop()  # a second request changes nothing
    assert sched.stopped_at == handed
    check(actions, sched, handed)
    commits = [a.m for a in actions if isinstance(a, Commit)]
    assert commits[0] == 1 and all(m < handed for m in commits)
    if handed > 2:
        assert commits[-1] == handed - 1  # a final barrier behind the last micro-batch handed out
    assert isinstance(actions[-1], Commit | Wait)


def test_a_stop_after_everything_was_handed_out_is_not_a_stop() -> None:
    sched = Schedule(2, 1, 0, 3, checkpoints=True)
    actions = []
    for a in sched:
        actions.append(a)
        if a == Step(1, 2):
            assert not sched.request_stop()
    assert sched.stopped_at is None
    check(actions, sched, 3)


def test_bad_arguments_are_refused() -> None:
    for args in [(0, 1, 0, 1), (1, -1, 0, 1), (2, 0, 0, 4), (1, 1, 5, 4), (1, 1, -1, 4)]:
        with pytest.raises(ConfigError, match="schedule needs"):
            Schedule(*args)
    with pytest.raises(ValueError, match="one duration per stage"):
        simulate(Schedule(2, 1, 0, 1), [1.0])
