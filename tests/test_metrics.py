"""The metrics log ([Note: metrics that survive] in pipeline/telemetry/metrics_log.py): typed rows written as
the run goes, compacted, restarted on resume without duplicates, and kept by a run killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support import reports, tiny_npz, wait_until

from pipeline.rundir import RunDir
from pipeline.telemetry import metrics_log
from pipeline.telemetry.metrics_log import SCHEMA, MetricsLog, read_metrics

ROOT = Path(__file__).resolve().parents[1]


def test_rows_carry_every_column_typed(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, flush_s=1e9)
    log.append(reports(0))
    assert read_metrics(tmp_path).num_rows == 0  # buffered until a flush
    log.flush()
    (part,) = tmp_path.glob("part-*.parquet")
    assert pq.read_schema(part).remove_metadata() == SCHEMA.remove_metadata()  # typed as written, not cast on read
    row = read_metrics(tmp_path).to_pylist()[1]
    assert row | {"time": 0} == {"step": 0, "layer": 1, "stage": 1, "time": 0, "loss": 1.0, "pos": 0.1, "neg": 0.2,
                                 "over": 0.3, "spread": 0.9, "busy_start": 10.0, "busy_end": 10.5, "mb_per_s": 2.0,
                                 "busy": 0.5}


def test_parts_are_written_on_time_and_compacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_log, "COMPACT_AT", 4)
    log = MetricsLog(tmp_path, flush_s=0.0)  # every append is due
    for m in range(10):
        log.append(reports(m))
        assert len(list(tmp_path.glob("part-*.parquet"))) < 4
    assert read_metrics(tmp_path).column("step").to_pylist() == [m for m in range(10) for _ in range(2)]


def test_a_restart_drops_what_the_resumed_run_redoes_and_duplicates_keep_the_newest(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, flush_s=1e9)
    for m in range(8):
        log.append(reports(m, value=1.0))
    log.flush()
    resumed = MetricsLog(tmp_path, restart=5, flush_s=1e9)  # the checkpoint was at 5
    assert read_metrics(tmp_path).column("step").to_pylist() == [m for m in range(5) for _ in range(2)]
    for m in range(5, 7):
        resumed.append(reports(m, value=2.0))
    resumed.flush()
    table = read_metrics(tmp_path).to_pydict()
    assert table["step"] == [m for m in range(7) for _ in range(2)]
    assert table["loss"] == [1.0] * 10 + [2.0] * 4

    # A crash between writing the restart part and deleting the old ones leaves the first run's part: its
    # rows below the mark are duplicates (the newest copy wins), those at or above it stay hidden.
    first_run = MetricsLog(tmp_path / "first", flush_s=1e9)
    for m in range(8):
        first_run.append(reports(m, value=3.0))
    first_run.flush()
    os.replace(tmp_path / "first" / "part-000000.parquet", tmp_path / "part-000000.parquet")
    again = read_metrics(tmp_path).to_pydict()
    assert again["step"] == table["step"] and again["loss"] == table["loss"]


def test_an_unreadable_part_is_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = MetricsLog(tmp_path, flush_s=1e9)
    log.append(reports(0))
    log.flush()
    (tmp_path / "part-000007.parquet").write_bytes(b"\x80\x04not parquet")
    assert read_metrics(tmp_path).num_rows == 2
    assert "part-000007.parquet: not a metrics part" in caplog.text


def test_a_run_killed_with_sigkill_keeps_its_metrics_up_to_its_last_flush(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "pipeline.cli", "train", "--engine", "sequential", "--data", tiny_npz(tmp_path, size=8),
            "--layers", "conv:4,conv:4", "--size", "8", "--clips", "4", "--clip-len", "3", "--steps", "100000",
            "--checkpoint-every", "0", "--run-dir", str(run_dir)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        from pipeline.control.server import CONTROL_FILE, ControlClient

        deadline = time.monotonic() + 60
        while not (run_dir / CONTROL_FILE).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        client = ControlClient(run_dir)
        while client.status().steps_done < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        done_before = client.status().steps_done
        client.close()
        # A flush (every FLUSH_S) writes them; the kill comes once the log holds them, whatever the load.
        assert wait_until(lambda: (run_dir / "metrics").is_dir() and len(RunDir(run_dir).read_metrics()) // 2 >= done_before,
                          timeout=60)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    steps = RunDir(run_dir).read_metrics().column("step").to_pylist()
    assert done_before >= 20 and steps == [m for m in range(len(steps) // 2) for _ in range(2)]
    assert len(steps) // 2 >= done_before, (len(steps) // 2, done_before)
