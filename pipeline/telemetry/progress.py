"""A progress line for the CLI (stderr) that owns the terminal: log records print above it.

On a terminal the line is redrawn in place at most 10 times a second, and while it is shown every log
record (lamina's and Ray's Python loggers alike go through the root logger) clears it, prints, and draws
it again below. Elsewhere (a file, CI) it prints a line every 10 %. The rate counts from where the bar
started (a resumed run's first micro-batch, not 0), and the ETA appears only after a warm-up (the first
micro-batches of a run include starting Ray and its actors: their rate says nothing of the rest).

    with Progress(total, "train ray", start=start) as bar:
        bar.update(n, "L1 0.812 L2 ...")
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from typing_extensions import Self

WARMUP = 0.05  # of the total, or ...
WARMUP_MIN = 10  # ... at least this many units, before an ETA is shown


class Progress(logging.Handler):
    def __init__(self, total: int, desc: str, stream: TextIO | None = None, start: int = 0,
                 unit: str = "mb") -> None:
        super().__init__()
        self.total, self.desc, self.n, self.start, self.unit = total, desc, start, start, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()
        self.info = ""
        self._shown = ""  # the line now on the terminal ("" when none)
        self._last_draw = 0.0
        self._last_decile = -1
        self._handlers: list[logging.Handler] = []

    # -- the terminal: log records above the line -----------------------------------------------------

    def __enter__(self) -> Self:
        if self.tty:  # route the root logger's stream output through us
            root = logging.getLogger()
            self._handlers = [h for h in root.handlers if isinstance(h, logging.StreamHandler)
                              and getattr(h, "stream", None) in (sys.stderr, sys.stdout)]
            if self._handlers:
                self.setFormatter(self._handlers[0].formatter)
                self.setLevel(self._handlers[0].level)
            for h in self._handlers:
                root.removeHandler(h)
            root.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - logging's own contract: a bad record must not break the caller
            self.handleError(record)
            return
        self.stream.write("\r\033[K" + text + "\n" + self._shown)
        self.stream.flush()

    # -- the line ---------------------------------------------------------------------------------------

    def update(self, n: int, info: str = "") -> None:
        """Set the position to n (units done) with a short status string."""
        self.n, self.info = n, info
        now = time.perf_counter()
        decile = 10 * n // max(self.total, 1)
        if self.tty and (now - self._last_draw > 0.1 or n >= self.total):
            self._last_draw = now
            self._shown = self._line(now)
            self.stream.write("\r" + self._shown + "\033[K")
            self.stream.flush()
        elif not self.tty and decile != self._last_decile:
            self._last_decile = decile
            self.stream.write(self._line(now) + "\n")
            self.stream.flush()

    def _line(self, now: float) -> str:
        frac = self.n / max(self.total, 1)
        bar = "#" * int(24 * frac)
        done = self.n - self.start
        rate = done / max(now - self.t0, 1e-9)
        warm = done >= max(WARMUP_MIN, WARMUP * (self.total - self.start))
        eta = f" eta {(self.total - self.n) / rate:4.0f}s" if warm and rate > 0 and self.n < self.total else ""
        speed = f"{rate:5.1f} {self.unit}/s" if rate >= 1 or done == 0 else f"{1 / rate:5.1f} s/{self.unit}"
        return (f"{self.desc} [{bar:<24}] {self.n}/{self.total} {speed}{eta}"
                + (f" | {self.info}" if self.info else ""))

    def close(self) -> None:
        if self._handlers:  # give the terminal back to the handlers we took it from
            root = logging.getLogger()
            root.removeHandler(self)
            for h in self._handlers:
                root.addHandler(h)
            self._handlers = []
        if self.tty and self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = ""
        super().close()
