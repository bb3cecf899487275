"""What the compiled-graph and shm transports share: the driver writes one message per micro-batch into the
bottom stage, each stage hands it on to the one above, and barriers travel inside that stream.

[Note: in-band barriers]
The stages run their messages in the order the driver sent them, and nothing can be queued between two of
them. So a barrier travels *inside* the stream: the message for micro-batch m carries the checkpoint store
when a barrier falls after m (`pipeline.stage.Hop`); every stage writes its part right behind its step of m
and hands it to the driver with its report. The schedule says a barrier falls after m with Snapshot(0, m)
right behind Step(0, m), so stage 0's step is sent one action late, once it is known whether a snapshot
rides with it. A barrier that cannot ride (the initial one, or one a stop request adds after m was handed
out) is a snapshot-only message, queued behind everything sent so far: each stage writes its state as it
is after m, because a stop hands out nothing after m.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.checkpoints import CheckpointStore, Part
from pipeline.errors import CheckpointError
from pipeline.stage import Hop, HopResult, StepReport

if TYPE_CHECKING:
    from pipeline.engines.placement import StageActors


class InBandTransport:
    """The seam's actions over a message stream ([Note: in-band barriers]). A subclass opens the stream
    (`_open`, when `_opened` is false), sends a message into it (`_send`), takes stage k's result of the
    message for m (`_result`: its step's, or with `step` false its snapshot-only message's), forgets what is
    in flight (`_forget`) and tears the stream down (`reset`, `close`)."""

    name = ""

    def __init__(self, actors: StageActors) -> None:
        self.actors = actors
        self.store: CheckpointStore | None = None
        self._held: tuple[int, np.ndarray] | None = None  # stage 0's step, sent once its barrier is known
        self._riding: set[int] = set()  # micro-batches whose barrier travels in the stream already
        self._parts: dict[int, dict[int, Part | CheckpointError]] = {}  # m -> {k: stage k's part of barrier m}

    # -- what a subclass provides ---------------------------------------------------------------------

    def _opened(self) -> bool:
        raise NotImplementedError

    def _open(self) -> None:
        raise NotImplementedError

    def _send(self, msg: Hop) -> None:
        raise NotImplementedError

    def _result(self, k: int, m: int, step: bool) -> HopResult:
        raise NotImplementedError

    def _forget(self) -> None:
        raise NotImplementedError

    # -- the seam -----------------------------------------------------------------------------------------

    def begin(self, store: CheckpointStore | None) -> None:
        self.store = store
        self.abandon()
        if not self._opened():  # the first segment, or the actors were replaced since (reset)
            self._open()

    def step(self, k: int, m: int, frames: np.ndarray | None) -> None:
        if k:
            return  # the stream hands m on from stage k - 1 by itself
        self._release()
        assert frames is not None
        self._held = (m, frames)

    def snapshot(self, k: int, m: int) -> None:
        if self._held is not None and k == 0 and self._held[0] == m:
            self._release(barrier=True)
            return
        self._release()
        if m in self._riding:
            return
        # A barrier that cannot ride with its step: a snapshot-only message behind everything so far.
        self._riding.add(m)
        self._send(Hop(m, False, self.store, None))

    def report(self, k: int, m: int, waiting: Any) -> StepReport:
        self._release()
        result = self._keep(k, m, self._result(k, m, True))
        assert result.report is not None
        return result.report

    def parts(self, m: int, waiting: Any) -> list[Part | CheckpointError]:
        self._release()
        for k in range(len(self.actors)):
            if k not in self._parts.get(m, {}):  # a snapshot-only message's result (a step's came with its report)
                self._keep(k, m, self._result(k, m, False))
        self._riding.discard(m)
        got = self._parts.pop(m)
        assert sorted(got) == list(range(len(self.actors))), (m, sorted(got))
        return [got[k] for k in sorted(got)]

    def in_flight_parts(self) -> list[Any]:
        return []  # parts come back with the stream's results, which cannot be waited on with a timeout

    def abandon(self) -> None:
        self._held = None
        self._riding.clear()
        self._parts.clear()
        self._forget()

    def _release(self, barrier: bool = False) -> None:
        """Send the held stage-0 step, with the barrier after it when `barrier`."""
        if self._held is None:
            return
        m, frames = self._held
        self._held = None
        if barrier:
            self._riding.add(m)
        self._send(Hop(m, True, self.store if barrier else None, frames))

    def _keep(self, k: int, m: int, result: HopResult) -> HopResult:
        if result.part is not None:  # kept for the barrier's commit, which comes after every stage's report
            self._parts.setdefault(m, {})[k] = result.part
        return result
