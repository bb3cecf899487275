"""A small progress bar for the CLI (stderr): redraws in place on a terminal, prints every 10 % otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, desc: str, stream: TextIO | None = None, start: int = 0) -> None:
        self.total, self.desc, self.n = total, desc, start
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()
        self.start = start
        self._last_draw = 0.0
        self._last_decile = -1

    def update(self, n: int, info: str = "") -> None:
        """Set the position to n (micro-batches done) with a short status string."""
        self.n = n
        now = time.perf_counter()
        decile = 10 * n // max(self.total, 1)
        if self.tty and (now - self._last_draw > 0.1 or n >= self.total):
            self._last_draw = now
            self.stream.write("\r" + self._line(now, info) + "\033[K")
            self.stream.flush()
        elif not self.tty and decile != self._last_decile:
            self._last_decile = decile
            self.stream.write(self._line(now, info) + "\n")
            self.stream.flush()

    def _line(self, now: float, info: str) -> str:
        frac = self.n / max(self.total, 1)
        bar = "#" * int(24 * frac)
        rate = (self.n - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        return (f"{self.desc} [{bar:<24}] {self.n}/{self.total} {rate:5.1f} mb/s eta {eta:4.0f}s"
                + (f" | {info}" if info else ""))

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
