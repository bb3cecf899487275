"""The ledger: which micro-batches a stage applied. Saved with its state, it is the exactly-once evidence."""

from __future__ import annotations


class Ledger:
    """The micro-batches a stage applied, as sorted half-open ranges [a, b): bounded by the number of
    interruptions, not of micro-batches. A duplicate or a gap shows as a second range."""

    def __init__(self, ranges: list[list[int]] | None = None) -> None:
        self.ranges: list[list[int]] = [list(r) for r in ranges or []]

    def add(self, m: int) -> None:
        if self.ranges and self.ranges[-1][1] == m:
            self.ranges[-1][1] = m + 1
        else:
            self.ranges.append([m, m + 1])

    def exactly_once(self, stop: int) -> bool:
        """True when micro-batches 0 .. stop-1 were each applied exactly once, and nothing else."""
        return self.ranges == ([[0, stop]] if stop > 0 else [])

    def __repr__(self) -> str:
        return f"Ledger({self.ranges})"
