"""Engines that train a network: the sequential layer-local loop and the end-to-end baseline.

Both run in this process. The sequential loop is the ground truth the pipelined engine must equal: for
each micro-batch it visits the layers bottom to top, each learning from the output the one below emitted.

    micro-batch m:   L1.step -> L2.step -> L3.step      then m+1, ...

An engine takes (cfg, spec, sampler, on_step, start, states, checkpointing) and returns every learner's
state, bottom to top. `on_step(m, rows)` receives, after micro-batch m, one (layer index, metrics) pair
per learner. With `checkpointing`, it writes barrier checkpoints (pipeline/checkpoint.py) every N
micro-batches, on request and at the end, and stops early — after a final checkpoint — when asked to
(`checkpointing.control.stopped_at` then says where). In process the whole network is one stage, so a
checkpoint here has one stage file; it loads into any engine, which regroups the learners.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.checkpoint import Checkpointing, Ledger, stage_payload
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
                   start: int = 0, states: list[dict] | None = None,
                   checkpointing: Checkpointing | None = None) -> list[dict]:
    stage = build_stage(cfg, spec)
    if states is not None:
        stage.load_state_dict({"learners": states})
    ck = checkpointing
    ledger = ck.ledgers[0] if ck is not None and ck.ledgers else Ledger()
    store = ck.store if ck is not None else None

    def snapshot(m: int) -> None:
        if store is not None:
            payload = stage_payload(0, 0, len(spec.blocks), m + 1, stage.state_dict()["learners"], ledger)
            store.commit(m + 1, [store.write_stage(m + 1, 0, payload)])

    if store is not None and start == 0:
        snapshot(-1)  # the initial state: what a run that fails before its first barrier restores
    for m in range(start, cfg.steps):
        _, metrics = stage.step(sampler.batch(m).frames)
        ledger.add(m)
        on_step(m, [(lrn.last - 1, mt) for lrn, mt in zip(stage.learners, metrics, strict=True)])
        if ck is None:
            continue
        stopping = ck.control.stop_requested and m + 1 < cfg.steps
        if ck.due(m) or stopping or m + 1 == cfg.steps:
            snapshot(m)
        if stopping:
            ck.control.stopped_at = m + 1
            break
    return stage.state_dict()["learners"]
