"""A pipeline stage as a plain class, stepped without Ray: reports, its part of a checkpoint, failures."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from support import state_differences

from pipeline.checkpoints import CheckpointStore
from pipeline.config import TrainConfig
from pipeline.engines import channel
from pipeline.errors import CheckpointError, StageError
from pipeline.stage import LayerReport, Stage

CFG = TrainConfig(layers="conv:4,conv:4,conv:4", size=8, clips=3, clip_len=2, head=(8, 4))
SPEC = CFG.learner_spec((1, 8, 8))


def frames(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((3, 2, 1, 8, 8), dtype=np.float32)


def test_a_stage_steps_its_layers_and_reports_each() -> None:
    seen = []
    stage = Stage(SPEC, 1, 3, index=1, name="lamina-x-stage1", report=seen.append)
    below = Stage(SPEC, 0, 1).step(0, frames())[0]
    assert below is not None and below.shape == (3, 2, 4, 4, 4)
    out, report = stage.step(0, below, emit=False)
    assert out is None and (report.stage, report.micro_batch) == (1, 0) and seen == [report]
    assert [lr.layer for lr in report.layers] == [1, 2] and all(isinstance(lr, LayerReport) for lr in report.layers)
    assert report.start <= report.end and 0 < report.busy <= 1
    assert stage.get_ledger() == [[0, 1]]


def test_a_stage_makes_its_output_in_the_next_channel_s_slot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What the shm transport's stage loop does (pipeline/engines/actors.py): the output is written into the
    # slot the channel to the stage above claims, so sending it copies nothing; the same bits as without.
    channel.make(str(tmp_path), "c")
    reader, writer = channel.Reader(str(tmp_path), "c"), channel.Writer(str(tmp_path), "c", 2)
    writer.open_write()
    reader.open_write()
    copies: list[int] = []
    copyto = np.copyto
    monkeypatch.setattr(channel.np, "copyto", lambda dst, src, **kw: (copies.append(src.nbytes), copyto(dst, src, **kw)))
    made, plain = Stage(SPEC, 0, 2), Stage(SPEC, 0, 2)
    for m in range(2):
        y, _ = made.step(m, frames(m), into=writer.claim)
        assert y is not None and np.array_equal(y, plain.step(m, frames(m))[0])
        writer.send(m, y)
        got, x = reader.recv()
        assert got == m and x is not None and np.array_equal(x, y)
        reader.release()
    assert copies == []
    assert state_differences(made.states(), plain.states()) == []
    reader.close()
    writer.close()


def test_its_part_of_a_checkpoint_restores_it_exactly(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    stage = Stage(SPEC, 0, 3)
    for m in range(3):
        stage.step(m, frames(m))
    store.commit(3, [stage.snapshot(2, store)])
    after = [stage.step(m, frames(m))[0] for m in (3, 4)]

    again = Stage(SPEC, 0, 3)
    assert again.restore(store, 3) == 3 and again.get_ledger() == [[0, 3]]
    replay = [again.step(m, frames(m))[0] for m in (3, 4)]
    assert all(np.array_equal(a, b) for a, b in zip(replay, after, strict=True))  # the same steps follow
    assert state_differences(again.states(), stage.states()) == []

    with pytest.raises(CheckpointError, match=r"holds learners \[0, 3\), this stage \[0, 1\)"):
        Stage(SPEC, 0, 1).restore(store, 3)
    wide = TrainConfig(layers="conv:8,conv:4,conv:4", size=8, clips=3, clip_len=2, head=(8, 4))
    with pytest.raises(CheckpointError, match="do not fit this network"):
        Stage(wide.learner_spec((1, 8, 8)), 0, 3).restore(store, 3)


def test_a_non_finite_loss_or_a_broken_input_is_a_stage_error_naming_it() -> None:
    stage = Stage(SPEC, 0, 2, index=0, name="lamina-x-stage0")
    bad = frames()
    bad[0, 0, 0, 0, 0] = math.nan
    with pytest.raises(StageError, match=r"stage 0 \(lamina-x-stage0\) failed on micro-batch 7: FloatingPointError: "
                                         r"layer 1: local loss is nan \(input finite: False\)") as info:
        stage.step(7, bad)
    assert (info.value.stage, info.value.micro_batch) == (0, 7)
    with pytest.raises(StageError, match="micro-batch 8: RuntimeError"):
        stage.step(8, torch.zeros(3, 2, 2, 8, 8))  # two channels where the layer takes one
    assert stage.get_ledger() == []  # the ledger records no application


def test_a_step_that_makes_a_weight_non_finite_stops_with_the_layer_named() -> None:
    stage = Stage(SPEC, 0, 2, index=0)
    stage.step(0, frames())
    learner = stage.stack.learners[1]
    weight = next(iter(learner.blocks.parameters()))
    learner.optimizer.state[weight]["exp_avg"].fill_(math.inf)  # the next update is infinite; the loss is not
    with pytest.raises(StageError, match=r"micro-batch 1: FloatingPointError: layer 2: a weight became "
                                         r"non-finite in this step \(loss \d"):
        stage.step(1, frames(1))
