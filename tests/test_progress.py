"""The progress line: a rate counted from where it started, an ETA only after the warm-up, log records above
the line on a terminal, and a readable rate for slow units."""

from __future__ import annotations

import io
import logging

import pytest

from pipeline.telemetry import progress
from pipeline.telemetry.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def clock(monkeypatch: pytest.MonkeyPatch, t0: float = 100.0) -> list[float]:
    now = [t0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    return now


def test_a_resumed_run_counts_its_rate_from_where_it_started_and_waits_for_the_eta(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = clock(monkeypatch)
    bar = Progress(1000, "train", stream=io.StringIO(), start=500)
    now[0] += 1.0
    assert "eta" not in bar._line(now[0])  # no ETA at the start
    bar.update(505)
    now[0] += 1.0
    assert "eta" not in bar._line(now[0])  # 5 units done: not warm yet (at least 10, and 5 % of the rest)
    bar.update(530)
    now[0] += 1.0
    line = bar._line(now[0])
    # 30 units in 3 s since the bar started at 500: 10 units/s, not 530 / 3; 470 left at that rate.
    assert " 10.0 mb/s" in line and "eta   47s" in line, line


def test_slow_units_read_as_seconds_per_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    now = clock(monkeypatch)
    bar = Progress(8, "probe", stream=io.StringIO(), unit="step")
    bar.update(1)
    now[0] += 4.0
    assert "4.0 s/step" in bar._line(now[0])


def test_on_a_terminal_a_log_record_prints_above_the_line(monkeypatch: pytest.MonkeyPatch) -> None:
    clock(monkeypatch)
    term = Terminal()
    root = logging.getLogger()
    handler = logging.StreamHandler(term)
    monkeypatch.setattr(handler, "stream", term)
    root.addHandler(handler)
    monkeypatch.setattr(progress.sys, "stderr", term)
    try:
        with Progress(10, "train", stream=term) as bar:
            bar.update(3, "L1 0.5")
            logging.getLogger("lamina.test").warning("a record")
        out = term.getvalue()
        assert handler in root.handlers  # the terminal is given back
    finally:
        root.removeHandler(handler)
    # The record clears the line, prints on its own line, and the line is drawn again below it.
    before, after = out.split("a record", 1)
    assert before.endswith("\r\033[K") and "3/10" in before
    assert after.startswith("\n") and "3/10" in after
