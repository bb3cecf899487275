"""Engines that train a network: the sequential layer-local loop and the end-to-end baseline.

Both run in this process. The sequential loop is the ground truth the pipelined engine must equal: for
each micro-batch it visits the layers bottom to top, each learning from the output the one below emitted.

    micro-batch m:   L1.step -> L2.step -> L3.step      then m+1, ...

An engine takes (cfg, spec, sampler, start, on_step) and returns every learner's state, bottom to top.
`on_step(m, rows)` receives, after micro-batch m, one (layer index, metrics) pair per learner.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.config import TrainConfig
from pipeline.data import ClipSampler
from workers.learner import LearnerSpec, LocalLearner, Stage

OnStep = Callable[[int, list[tuple[int, dict[str, float]]]], None]


def build_stage(cfg: TrainConfig, spec: LearnerSpec) -> Stage:
    """The whole network in one process: one learner per layer, or one learner for all (e2e)."""
    if cfg.engine == "e2e":
        return Stage([LocalLearner(spec, 0, len(spec.blocks))])
    return Stage.layer_local(spec, 0, len(spec.blocks))


def run_in_process(cfg: TrainConfig, spec: LearnerSpec, sampler: ClipSampler, on_step: OnStep,
                   start: int = 0, states: list[dict] | None = None) -> list[dict]:
    stage = build_stage(cfg, spec)
    if states is not None:
        stage.load_state_dict({"learners": states})
    for m in range(start, cfg.steps):
        _, metrics = stage.step(sampler.batch(m).frames)
        on_step(m, [(lrn.last - 1, mt) for lrn, mt in zip(stage.learners, metrics, strict=True)])
    return stage.state_dict()["learners"]
