"""Barrier checkpoints without Ray: the store (atomic, complete-only, verified, pruned, any pyarrow.fs URI),
resuming the in-process engines bit for bit, and the graceful / hard stop of the driver (signals included).
What a crafted checkpoint can and cannot do is in tests/test_trust.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from support import Recorder, sequential, setup, state_differences, tiny_config, tiny_npz

from pipeline import run as run_module
from pipeline.checkpoints import CheckpointStore
from pipeline.config import TrainConfig
from pipeline.control import RunControl
from pipeline.engines import engine_for
from pipeline.engines.local import run_local
from pipeline.errors import CheckpointError
from pipeline.run import Outcome, resume, train
from pipeline.rundir import RunDir

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_npz(tmp_path_factory.mktemp("data"), size=8)


def small(data: str, **overrides: Any) -> TrainConfig:
    fields = {"layers": "conv:4,conv:4,conv:4", "size": 8, "clips": 4, "clip_len": 3, "steps": 12,
              "engine": "sequential", "checkpoint_every": 4}
    fields.update(overrides)
    return tiny_config(data, **fields)


def part(stage: int, step: int) -> dict:
    return {"stage": stage, "first": stage, "last": stage + 1, "step": step, "ledger": [[0, step]],
            "learners": [{"w": torch.full((3,), float(step))}]}


def write(store: CheckpointStore, step: int, stages: int = 2) -> None:
    store.commit(step, [store.write_part(step, k, part(k, step)) for k in range(stages)])


def final_learners(run_dir: Path) -> list[dict]:
    """The learners of a run's newest complete checkpoint: what `probe` and `--resume` read."""
    cfg = RunDir(run_dir).config()
    checkpoint = RunDir(run_dir).store(cfg).load_latest()
    assert checkpoint is not None
    return checkpoint.learners


# -- the store ----------------------------------------------------------------------------------------


def test_only_complete_intact_checkpoints_are_loaded(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ck"), keep=10)
    for step in (4, 8, 12, 16):
        write(store, step)
    assert store.latest_complete() == 16

    # A checkpoint interrupted before its marker (a stage never wrote, or the driver died) is not complete.
    (tmp_path / "ck" / "step-000016" / "COMPLETE").unlink()
    # One whose part was truncated after the marker (a torn copy) does not match its record.
    f12 = tmp_path / "ck" / "step-000012" / "stage-1.state"
    f12.write_bytes(f12.read_bytes()[:50])
    # One whose part was overwritten with other bytes of the same size fails the sha256 on load.
    f8 = tmp_path / "ck" / "step-000008" / "stage-0.state"
    f8.write_bytes(bytes(len(f8.read_bytes())))
    # A half-written temporary file under a partial directory is never taken for a part.
    partial = tmp_path / "ck" / "step-000020"
    partial.mkdir()
    (partial / "stage-0.state.tmp-0000").write_bytes(b"half")

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


def test_a_flipped_byte_anywhere_in_a_part_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), keep=10)
    write(store, 3, stages=1)
    path = tmp_path / "step-000003" / "stage-0.state"
    good = path.read_bytes()
    for at in (0, 40, len(good) // 2, len(good) - 1):  # magic, header, tensor bytes, the last byte
        path.write_bytes(good[:at] + bytes([good[at] ^ 0x20]) + good[at + 1:])
        with pytest.raises(CheckpointError, match="sha256"):
            store.read_part(3, 0)
    path.write_bytes(good)
    assert store.read_part(3, 0)["learners"][0]["w"].tolist() == [3.0] * 3


def test_commit_refuses_a_checkpoint_missing_a_stage(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    p0 = store.write_part(3, 0, part(0, 3))
    with pytest.raises(CheckpointError, match="every stage"):
        store.commit(3, [p0, dataclasses.replace(p0, stage=2)])
    p1 = store.write_part(3, 1, part(1, 3))
    os.remove(tmp_path / "step-000003" / "stage-1.state")
    with pytest.raises(CheckpointError, match="missing"):
        store.commit(3, [p0, p1])
    assert store.latest_complete() is None


def test_keep_last_prunes_old_and_abandoned_checkpoints(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), keep=2)
    store.write_part(2, 0, part(0, 2))  # abandoned: never committed, older than what follows
    for step in (4, 8, 12):
        write(store, step)
    store.write_part(16, 0, part(0, 16))  # in progress: newer than the latest complete one, kept
    write(store, 14)
    assert store.steps() == [12, 14, 16]
    assert store.complete() == [12, 14]


def test_directories_the_store_did_not_write_are_left_alone(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), keep=1)
    for stray in ("step-7", "step-0000009", "notes"):
        (tmp_path / stray).mkdir()
    for step in (4, 8):
        write(store, step)  # commits prune: they must neither read nor delete the stray directories
    assert store.steps() == [8] and store.latest_complete() == 8
    assert all((tmp_path / stray).is_dir() for stray in ("step-7", "step-0000009", "notes"))


def test_any_pyarrow_uri_and_the_store_pickles(tmp_path: Path) -> None:
    import pickle

    store = CheckpointStore(f"file://{tmp_path}/uri", keep=1, meta={"in_shape": [1, 8, 8]})
    write(store, 5)
    again = pickle.loads(pickle.dumps(store))
    assert again.latest_complete() == 5 and again.keep == 1
    record = json.loads((tmp_path / "uri" / "step-000005" / "COMPLETE").read_text())
    assert record["step"] == 5 and record["meta"] == {"in_shape": [1, 8, 8]}
    with pytest.raises(CheckpointError, match="nosuchfs"):
        CheckpointStore("nosuchfs://bucket/run")


# -- in-process engines: resume bit for bit --------------------------------------------------------------


@pytest.fixture
def hooked(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Outcome]:
    """train, or resume, with `hook(m, control)` called after on_step(m): how a test stops or signals a run."""

    def go(cfg: TrainConfig | str, hook: Callable[[int, RunControl], None], **kwargs: Any) -> Outcome:
        control = kwargs.setdefault("control", RunControl())

        def engine(name: str) -> Any:
            inner = engine_for(name)

            def run(cfg_: TrainConfig, spec: Any, source: Any, on_step: Any, **kw: Any) -> Any:
                def on(m: int, reports: list) -> None:
                    on_step(m, reports)
                    hook(m, control)
                return inner(cfg_, spec, source, on, **kw)
            return run

        monkeypatch.setattr(run_module, "engine_for", engine)
        if isinstance(cfg, str):
            return resume(cfg, progress=False, **kwargs)
        return train(cfg, progress=False, **kwargs)

    return go


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Bit-for-bit comparisons need one kernel thread count everywhere (the CLI subprocess uses 1 too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("engine", ["sequential", "e2e"])
def test_a_stopped_in_process_run_resumes_to_the_uninterrupted_weights(data: str, tmp_path: Path, engine: str,
                                                                        hooked: Callable[..., Outcome]) -> None:
    cfg = small(data, engine=engine, run_dir=str(tmp_path / "run"))
    seen: list[int] = []

    def stop_at_5(m: int, control: RunControl) -> None:
        seen.append(m)
        if m == 5:
            control.request_stop()

    first = hooked(cfg, stop_at_5)
    assert first.stopped_at == 6 and seen == list(range(6))
    store = RunDir(first.path).store(cfg)
    assert store.complete() == [0, 4, 6]  # initial, periodic, final
    assert first.path == tmp_path / "run" and (first.path / "loss.png").is_file()  # the record of a stopped run

    second = resume(str(tmp_path / "run"), progress=False)
    assert second.stopped_at is None
    ref = train(dataclasses.replace(cfg, run_dir=str(tmp_path / "ref")), progress=False)
    assert state_differences(final_learners(second.path), final_learners(ref.path)) == []
    layers = 3 if engine == "sequential" else 1
    metrics = RunDir(second.path).read_metrics().to_pydict()
    assert metrics["step"] == [m for m in range(cfg.steps) for _ in range(layers)]  # each once, in order
    assert set(metrics["stage"]) == {0} and all(r >= 0 for r in metrics["mb_per_s"])
    final = store.load_latest()
    assert final is not None and final.step == cfg.steps
    assert all(lg.exactly_once(cfg.steps) for lg in final.ledgers)


def test_in_process_checkpoints_on_request_and_every_n(data: str, tmp_path: Path) -> None:
    cfg = small(data, steps=9, checkpoint_every=0)
    spec, sampler = setup(cfg)
    store, control = CheckpointStore(str(tmp_path), keep=10), RunControl()
    calls = Recorder(lambda m: control.request_checkpoint() if m == 2 else None)
    run_local(cfg, spec, sampler, calls, store=store, control=control)
    assert store.complete() == [0, 4, 9]  # initial, requested after 2 (behind the next, 3), final


def test_a_non_finite_loss_stops_an_in_process_run(data: str, tmp_path: Path) -> None:
    from pipeline.errors import StageError

    with pytest.raises(StageError, match=r"^stage 0 failed on micro-batch \d+: FloatingPointError: layer \d: local loss is nan"):
        train(small(data, lr=1e30, run_dir=str(tmp_path / "run")), progress=False)


def test_a_run_directory_holding_a_run_is_not_overwritten(data: str, tmp_path: Path) -> None:
    from pipeline.errors import ConfigError

    cfg = small(data, steps=2, run_dir=str(tmp_path / "run"))
    train(cfg, progress=False)
    with pytest.raises(ConfigError, match="already holds a run: continue it with `lamina train --resume"):
        train(cfg, progress=False)


# -- signals: first Ctrl-C stops gracefully, the second at once ---------------------------------------------


def _signal_run(data: str, tmp_path: Path, interrupts: int, hooked: Callable[..., Outcome]) -> Outcome:
    """A sequential run with its signal handlers on that sends itself SIGINT `interrupts` times after
    micro-batch 6."""
    def interrupt(m: int, control: RunControl) -> None:
        if m == 6:
            for _ in range(interrupts):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler runs before the next one is sent

    return hooked(small(data, run_dir=str(tmp_path / "sig"), steps=40), interrupt, handle_signals=True)


def test_first_ctrl_c_drains_and_checkpoints(data: str, tmp_path: Path, hooked: Callable[..., Outcome]) -> None:
    before = signal.getsignal(signal.SIGINT)
    outcome = _signal_run(data, tmp_path, 1, hooked)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    assert outcome.stopped_at == 7
    assert CheckpointStore(str(tmp_path / "sig" / "checkpoints")).latest_complete() == 7


def test_second_ctrl_c_exits_at_once_leaving_the_last_checkpoint_valid(data: str, tmp_path: Path,
                                                                       hooked: Callable[..., Outcome]) -> None:
    with pytest.raises(KeyboardInterrupt):
        _signal_run(data, tmp_path, 2, hooked)
    store = CheckpointStore(str(tmp_path / "sig" / "checkpoints"))
    latest = store.load_latest()
    assert latest is not None and latest.step == 4  # the last periodic one, intact
    assert all(lg.exactly_once(4) for lg in latest.ledgers)
    rows = RunDir(tmp_path / "sig").read_metrics().column("step").to_pylist()
    assert rows == [m for m in range(7) for _ in range(3)]  # the record up to the interrupt survives


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_lamina_train_signal_exits_0_and_resume_finishes_bit_for_bit(data: str, tmp_path: Path, sig: int) -> None:
    run_dir = tmp_path / "cli"
    cfg = small(data, steps=400, checkpoint_every=20, run_dir=str(run_dir))  # ~4 s left to signal in
    args = [sys.executable, "-m", "pipeline.cli", "train", "--engine", "sequential", "--data", data,
            "--layers", cfg.layers, "--size", "8", "--clips", "4", "--clip-len", "3", "--steps", "400",
            "--checkpoint-every", "20", "--run-dir", str(run_dir)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    store = CheckpointStore(str(run_dir / "checkpoints"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (store.latest_complete() or 0) < 20 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"lamina train --resume {run_dir}" in out, out
    stopped = store.latest_complete()
    assert stopped is not None and 20 <= stopped < 400, (stopped, err[-2000:])

    outcome = resume(str(run_dir), progress=False)
    assert outcome.stopped_at is None
    ref = sequential(cfg, setup(cfg)[1])
    assert state_differences(final_learners(run_dir), ref) == []
    final = store.load_latest()
    assert final is not None and all(lg.exactly_once(400) for lg in final.ledgers)
