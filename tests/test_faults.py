"""Faults a run survives: a checkpoint store that fails (reported, tolerated, then a clean stop), SIGTERM to a
Ray-engine driver (drain, checkpoint, exit 0, resume bit for bit), and (slow) stages and the driver killed
again and again in one run. (A step that makes a weight non-finite: tests/test_stage.py.)"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from support import sequential, setup, small_config, state_differences, tiny_npz

from pipeline.checkpoints import CheckpointStore
from pipeline.errors import CheckpointError
from pipeline.run import resume, train
from pipeline.rundir import RunDir

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_npz(tmp_path_factory.mktemp("data"), size=8)


def small(data: str, tmp_path: Path, **overrides: Any) -> Any:
    return small_config(data, tmp_path, **{"engine": "sequential", "checkpoint_every": 4, **overrides})


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Bit-for-bit comparisons need the stage actors' kernel thread count (1) in process too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def block(store_dir: Path, *steps: int) -> None:
    """Make checkpoints `steps` unwritable for real: a plain file where their directory must go."""
    store_dir.mkdir(parents=True, exist_ok=True)
    for step in steps:
        (store_dir / f"step-{step:06d}").write_text("in the way")


def final(run_dir: Path) -> list[dict]:
    cfg = RunDir(run_dir).config()
    checkpoint = RunDir(run_dir).store(cfg).load_latest()
    assert checkpoint is not None
    return checkpoint.learners


@pytest.mark.parametrize("engine", ["sequential", "ray"])
def test_a_barrier_the_store_cannot_write_is_reported_and_training_goes_on(
        data: str, tmp_path: Path, engine: str, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest,
) -> None:
    if engine == "ray":
        request.getfixturevalue("ray_local")
    cfg = small(data, tmp_path, engine=engine)
    block(tmp_path / "run" / "checkpoints", 4, 8)  # two in a row fail; 3 are tolerated
    outcome = train(cfg, progress=False)
    store = CheckpointStore(str(tmp_path / "run" / "checkpoints"))
    assert outcome.stopped_at is None and store.complete() == [0, 12, 16]
    assert "checkpoint 4 could not be written (1 in a row, 3 tolerated)" in caplog.text
    assert "checkpoint 8 could not be written (2 in a row" in caplog.text
    assert state_differences(final(tmp_path / "run"), sequential(cfg, setup(cfg)[1])) == []
    rows = RunDir(tmp_path / "run").read_metrics().column("step").to_pylist()
    assert rows == [m for m in range(cfg.steps) for _ in range(3)]


def test_too_many_failed_barriers_in_a_row_stop_the_run_cleanly(data: str, tmp_path: Path) -> None:
    cfg = small(data, tmp_path, tolerable_checkpoint_failures=1)
    block(tmp_path / "run" / "checkpoints", 4, 8)
    with pytest.raises(CheckpointError, match=r"2 checkpoint\(s\) in a row could not be written, the last \(8\).*"
                                              r"--tolerable-checkpoint-failures 1"):
        train(cfg, progress=False)
    assert CheckpointStore(str(tmp_path / "run" / "checkpoints")).complete() == [0]
    rows = RunDir(tmp_path / "run").read_metrics().column("step").to_pylist()
    assert rows == [m for m in range(8) for _ in range(3)]  # the record up to the stop is kept


def _cli(run_dir: Path, data: str, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "train", "--data", data, "--layers", "conv:4,conv:4,conv:4",
            "--size", "8", "--clips", "4", "--clip-len", "3", "--steps", str(steps), "--checkpoint-every", "10",
            "--run-dir", str(run_dir), *extra]


def _wait_for(store: CheckpointStore, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while (store.latest_complete() or 0) < step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (store.latest_complete() or 0) >= step, (proc.poll(), store.steps())


def test_sigterm_drains_a_ray_engine_run_and_resume_is_bit_for_bit(ray_local: str, data: str,
                                                                   tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_cli(run_dir, data, 400), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    store = CheckpointStore(str(run_dir / "checkpoints"))
    _wait_for(store, 20, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: stopping after the micro-batches in flight" in err and "--resume" in out
    stopped = store.latest_complete()
    assert stopped is not None and 20 < stopped < 400  # the drain's own final checkpoint
    resume(str(run_dir), progress=False)  # on this test session's Ray
    cfg = small(data, tmp_path, steps=400, engine="ray")
    assert state_differences(final(run_dir), sequential(cfg, setup(cfg)[1])) == []
    steps = RunDir(run_dir).read_metrics().column("step").to_pylist()
    assert steps == [m for m in range(400) for _ in range(3)]


def _stage_processes(driver: int) -> list[psutil.Process]:
    """The stage actors of the Ray a driver process started (its raylet's workers named ray::_StageActor)."""
    try:
        family = psutil.Process(driver).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in family if p.name().startswith("ray::_StageActo") or "_StageActor" in " ".join(p.cmdline())]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_soak_stages_and_the_driver_killed_again_and_again(data: str, tmp_path: Path) -> None:
    """One run of 600 micro-batches: stages SIGKILLed at random (recovered in place) and the driver
    SIGKILLed twice (resumed from the last checkpoint); the end is the uninterrupted run's, bit for bit."""
    rng = random.Random(11)
    run_dir, steps = tmp_path / "run", 600
    store = CheckpointStore(str(run_dir / "checkpoints"))
    command = _cli(run_dir, data, steps)
    # Per leg: the checkpoints after which a random stage is killed, then the one after which the driver is.
    legs = [((40, 90), 150), ((200, 260), 350), ((400, 470), None)]
    for leg, (stage_kills, driver_kill) in enumerate(legs):
        log = tmp_path / f"driver-{leg}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        command = [sys.executable, "-m", "pipeline.cli", "train", "--resume", str(run_dir)]
        for at in stage_kills:
            _wait_for(store, at, proc)
            stages = _stage_processes(proc.pid)
            assert stages, log.read_text()[-3000:]
            os.kill(rng.choice(stages).pid, signal.SIGKILL)
        if driver_kill is not None:
            _wait_for(store, driver_kill, proc)
            assert proc.poll() is None, log.read_text()[-3000:]  # alive until killed
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=300)
    assert proc.returncode == 0, log.read_text()[-3000:]
    cfg = small(data, tmp_path, steps=steps, engine="ray", checkpoint_every=10)
    assert state_differences(final(run_dir), sequential(cfg, setup(cfg)[1])) == []
    latest = store.load_latest()
    assert latest is not None and latest.step == steps and all(lg.exactly_once(steps) for lg in latest.ledgers)
