"""Barrier checkpoints without Ray: the store (atomic, complete-only, pruned, any pyarrow.fs URI), resuming
the in-process engines bit for bit, and the graceful / hard stop of the driver (signals included).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ray_fixtures import Recorder, sequential, setup, state_differences, tiny_config, tiny_npz

from pipeline.checkpoint import (
    CheckpointError,
    Checkpointing,
    CheckpointStore,
    Ledger,
    RunControl,
    stage_payload,
)
from pipeline.rundir import RunDir
from pipeline.train import resume, store_of, train_run

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_npz(tmp_path_factory.mktemp("data"), size=8)


def small(data: str, **overrides: object) -> object:
    fields = {"layers": "conv:4,conv:4,conv:4", "size": 8, "clips": 4, "clip_len": 3, "steps": 12,
              "engine": "sequential", "checkpoint_every": 4}
    fields.update(overrides)
    return tiny_config(data, **fields)


def write(store: CheckpointStore, step: int, stages: int = 2) -> None:
    files = [store.write_stage(step, k, stage_payload(k, k, k + 1, step, [{"w": torch.full((3,), float(step))}],
                                                      Ledger([[0, step]])))
             for k in range(stages)]
    store.commit(step, files)


# -- the store ----------------------------------------------------------------------------------------


def test_only_complete_intact_checkpoints_are_loaded(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ck"), keep=10)
    for step in (4, 8, 12, 16):
        write(store, step)
    assert store.latest_complete() == 16

    # A checkpoint interrupted before its marker (a stage never wrote, or the driver died) is not complete.
    (tmp_path / "ck" / "step-000016" / "COMPLETE").unlink()
    # One whose stage file was truncated after the marker (a torn copy) does not match its record.
    f12 = tmp_path / "ck" / "step-000012" / "stage-1.pt"
    f12.write_bytes(f12.read_bytes()[:50])
    # One whose stage file was overwritten with other bytes of the same size fails the sha256 on load.
    f8 = tmp_path / "ck" / "step-000008" / "stage-0.pt"
    f8.write_bytes(bytes(len(f8.read_bytes())))
    # A half-written temporary file under a partial directory is never taken for a stage file.
    partial = tmp_path / "ck" / "step-000020"
    partial.mkdir()
    (partial / "stage-0.pt.tmp-0000").write_bytes(b"half")

    assert store.complete() == [4, 8]
    assert store.latest_complete() == 8
    with pytest.raises(CheckpointError, match="sha256"):
        store.load(8)
    loaded = store.load_latest()  # skips the corrupt 8, loads 4
    assert loaded is not None and loaded.step == 4
    assert [s["w"].tolist() for s in loaded.learners] == [[4.0] * 3] * 2
    assert [lg.ranges for lg in loaded.ledgers] == [[[0, 4]], [[0, 4]]]
    for step in (12, 16, 20):
        with pytest.raises(CheckpointError):
            store.load(step)


def test_commit_refuses_a_checkpoint_missing_a_stage(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    f0 = store.write_stage(3, 0, {"x": 1})
    with pytest.raises(CheckpointError, match="every stage"):
        store.commit(3, [f0, dataclasses.replace(f0, stage=2)])
    f1 = store.write_stage(3, 1, {"x": 2})
    os.remove(tmp_path / "step-000003" / "stage-1.pt")
    with pytest.raises(CheckpointError, match="missing"):
        store.commit(3, [f0, f1])
    assert store.latest_complete() is None


def test_keep_last_prunes_old_and_abandoned_checkpoints(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), keep=2)
    store.write_stage(2, 0, {})  # abandoned: never committed, older than what follows
    for step in (4, 8, 12):
        write(store, step)
    store.write_stage(16, 0, {})  # in progress: newer than the latest complete one, kept
    write(store, 14)
    assert store.steps() == [12, 14, 16]
    assert store.complete() == [12, 14]


def test_any_pyarrow_uri_and_the_store_pickles(tmp_path: Path) -> None:
    import pickle

    store = CheckpointStore(f"file://{tmp_path}/uri", keep=1)
    write(store, 5)
    again = pickle.loads(pickle.dumps(store))
    assert again.latest_complete() == 5 and again.keep == 1
    assert json.loads((tmp_path / "uri" / "step-000005" / "COMPLETE").read_text())["step"] == 5


# -- in-process engines: resume bit for bit --------------------------------------------------------------


def _hooked_train(cfg: object, hook: object, **kwargs: object) -> object:
    """train_run with `hook(m, control)` called after on_step(m): how a test stops or signals a run."""
    import pipeline.train as train_mod

    control = kwargs.setdefault("control", RunControl())
    engine_fn = train_mod._engine(cfg)  # type: ignore[arg-type]

    def hooked(cfg_, spec, sampler, on_step, start, states, ck):  # type: ignore[no-untyped-def]
        def on(m: int, rows: list) -> None:
            on_step(m, rows)
            hook(m, control)  # type: ignore[operator]
        return engine_fn(cfg_, spec, sampler, on, start, states, ck)

    saved = train_mod._engine
    train_mod._engine = lambda c: hooked  # type: ignore[assignment]
    try:
        return train_run(cfg, progress=False, **kwargs)  # type: ignore[arg-type]
    finally:
        train_mod._engine = saved


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    """Bit-for-bit comparisons need one kernel thread count everywhere (the CLI subprocess uses 1 too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("engine", ["sequential", "e2e"])
def test_a_stopped_in_process_run_resumes_to_the_uninterrupted_weights(data: str, tmp_path: Path,
                                                                        engine: str) -> None:
    cfg = small(data, engine=engine, run_dir=str(tmp_path / "run"))
    seen: list[int] = []

    def stop_at_5(m: int, control: RunControl) -> None:
        seen.append(m)
        if m == 5:
            control.request_stop()

    first = _hooked_train(cfg, stop_at_5)
    assert first.stopped_at == 6 and seen == list(range(6))  # type: ignore[attr-defined]
    assert store_of(cfg).complete() == [0, 4, 6]  # type: ignore[arg-type]  # initial, periodic, final
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # not finished

    second = resume(str(tmp_path / "run"), progress=False, handle_signals=False)
    assert second.stopped_at is None
    resumed = RunDir(second.path).load_checkpoint()["learners"]
    ref_dir = dataclasses.replace(cfg, run_dir=str(tmp_path / "ref"))  # type: ignore[type-var]
    ref = RunDir(train_run(ref_dir, progress=False).path).load_checkpoint()["learners"]
    assert state_differences(resumed, ref) == []
    layers = 3 if engine == "sequential" else 1
    assert RunDir(second.path).read_metrics().column("step").to_pylist() == \
        [m for m in range(cfg.steps) for _ in range(layers)]  # type: ignore[attr-defined]
    final = store_of(cfg).load_latest()  # type: ignore[arg-type]
    assert final is not None and final.step == cfg.steps  # type: ignore[attr-defined]
    assert all(lg.exactly_once(cfg.steps) for lg in final.ledgers)  # type: ignore[attr-defined]


def test_in_process_checkpoints_on_request_and_every_n(data: str, tmp_path: Path) -> None:
    from pipeline.engines import run_in_process

    cfg = small(data, steps=9, checkpoint_every=0)
    spec, sampler = setup(cfg)
    ck = Checkpointing(CheckpointStore(str(tmp_path), keep=10), every=0)
    calls = Recorder(lambda m: ck.control.request_checkpoint() if m == 2 else None)
    run_in_process(cfg, spec, sampler, calls, checkpointing=ck)
    assert ck.store is not None and ck.store.complete() == [0, 3, 9]  # initial, requested after 2, final


# -- signals: first Ctrl-C stops gracefully, the second at once ---------------------------------------------


def _signal_run(data: str, tmp_path: Path, interrupts: int) -> object:
    """A sequential run with its signal handlers on that sends itself SIGINT `interrupts` times after
    micro-batch 6."""
    def interrupt(m: int, control: RunControl) -> None:
        if m == 6:
            for _ in range(interrupts):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler runs before the next one is sent

    return _hooked_train(small(data, run_dir=str(tmp_path / "sig"), steps=40), interrupt, handle_signals=True)


def test_first_ctrl_c_drains_and_checkpoints(data: str, tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGINT)
    outcome = _signal_run(data, tmp_path, 1)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    assert outcome.stopped_at == 7  # type: ignore[attr-defined]
    assert CheckpointStore(str(tmp_path / "sig" / "checkpoints")).latest_complete() == 7


def test_second_ctrl_c_exits_at_once_leaving_the_last_checkpoint_valid(data: str, tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        _signal_run(data, tmp_path, 2)
    store = CheckpointStore(str(tmp_path / "sig" / "checkpoints"))
    latest = store.load_latest()
    assert latest is not None and latest.step == 4  # the last periodic one, intact
    assert all(lg.exactly_once(4) for lg in latest.ledgers)


def test_lamina_train_sigint_exits_0_and_resume_finishes_bit_for_bit(data: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "cli"
    cfg = small(data, steps=200, checkpoint_every=20, run_dir=str(run_dir))
    args = [sys.executable, "-m", "pipeline.cli", "train", "--engine", "sequential", "--data", data,
            "--layers", cfg.layers, "--size", "8", "--clips", "4", "--clip-len", "3", "--steps", "200",
            "--checkpoint-every", "20", "--run-dir", str(run_dir)]  # type: ignore[attr-defined]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    store = CheckpointStore(str(run_dir / "checkpoints"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (store.latest_complete() or 0) < 20 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"lamina train --resume {run_dir}" in out, out
    stopped = store.latest_complete()
    assert stopped is not None and 20 <= stopped < 200, (stopped, err[-2000:])

    outcome = resume(str(run_dir), progress=False, handle_signals=False)
    assert outcome.stopped_at is None
    ref = sequential(cfg, setup(cfg)[1])  # type: ignore[arg-type]
    assert state_differences(RunDir(run_dir).load_checkpoint()["learners"], ref) == []
