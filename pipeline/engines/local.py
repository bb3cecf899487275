"""The in-process engines: the sequential layer-local loop and the end-to-end baseline.

Both drive the schedule with one stage holding the whole network, in lock step (depth 0): micro-batch m
is reported before m + 1 is handed out. The sequential loop is the ground truth the Ray pipeline must
equal: for each micro-batch it visits the layers bottom to top, each learning from the output the one
below emitted.

    micro-batch m:   L1.step -> L2.step -> L3.step      then m+1, ...

`e2e` is end-to-end backprop: one learner holding every block, the objective on the top one. A checkpoint
of the sequential loop has one part holding every layer's learner; the Ray engine regroups them into its
stages (and back), so a run resumes on either. An e2e checkpoint resumes an e2e run only.
"""

from __future__ import annotations

from pipeline.checkpoints import Checkpoint, CheckpointStore, Part
from pipeline.config import TrainConfig
from pipeline.control import RunControl
from pipeline.engines.base import (
    BarrierHealth,
    EngineResult,
    OnStep,
    Reports,
    commit,
    follow_requests,
    make_schedule,
)
from pipeline.errors import CheckpointError
from pipeline.schedule import Commit, Snapshot, Step, Wait
from pipeline.sources import Source
from pipeline.stage import Stage, StepReport
from workers.learner import LearnerSpec


def run_local(cfg: TrainConfig, spec: LearnerSpec, source: Source, on_step: OnStep, *,
              resume: Checkpoint | None = None, store: CheckpointStore | None = None,
              control: RunControl | None = None, health: BarrierHealth | None = None) -> EngineResult:
    health = health or BarrierHealth(cfg.tolerable_checkpoint_failures)
    stage = Stage(spec, 0, len(spec.blocks), e2e=cfg.engine == "e2e")
    start = 0
    if resume is not None:
        stage.load(resume.learners, resume.ledgers[0].ranges if resume.ledgers else None)
        start = resume.step
    schedule = make_schedule(cfg, 1, 0, start, cfg.steps, store)
    reports = Reports(1, on_step, start)
    done: dict[int, StepReport] = {}
    parts: dict[int, Part | CheckpointError] = {}
    follow_requests(control, schedule)
    for action in schedule:
        if isinstance(action, Step):
            _, done[action.m] = stage.step(action.m, source.batch(action.m).frames, emit=False)
        elif isinstance(action, Wait):
            reports.add(done.pop(action.m))
        elif isinstance(action, Snapshot):
            assert store is not None
            try:
                parts[action.m] = stage.snapshot(action.m, store)
            except CheckpointError as e:  # reported at the commit, like the Ray engine's
                parts[action.m] = e
        elif isinstance(action, Commit):
            assert store is not None
            commit(store, action.m, [parts.pop(action.m)], health)
        follow_requests(control, schedule)  # before the schedule decides its next action
    return EngineResult(stage.states(), schedule.stopped_at)
