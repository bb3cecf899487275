"""The shm transport (`--transport shm`): the stages of one node chained by shared-memory channels
(pipeline/engines/channel.py), each stage running its own loop, behind the seam of pipeline/engines/transport.py.

    driver --in0--> stage 0 --in1--> stage 1 --in2--> stage 2          activations: shared memory, no copy
       ^--res0-------'    ^--res1-------'    ^--res2-------'           reports and barrier parts, small

The driver writes micro-batch m's frames into channel in0 (one copy); stage k reads m from in<k> (a view of
the slot, no copy), steps with its output made in a slot of in<k+1> ([Note: emitting into a slot] in
workers/learner.py), sends it on and writes its `HopResult` into res<k>. No Ray call per step and no object
store: a hop is one FIFO wake-up, and the driver does one write and S small reads per micro-batch. Barriers
ride in the stream ([Note: in-band barriers] in inband.py).

[Note: shm lifetime and recovery]
`begin` makes the channels in a fresh directory (in /dev/shm, named with the driver's pid: a later run on
the node removes the directory of a driver that was killed before it could) and opens them in two rounds
of calls, read ends then write ends (channel.py says why), then starts each stage's loop as a call in the
actor's own `shm` concurrency group, so that the stage still answers its other calls (states, ledger, ping)
while the loop waits for input. A stage whose own code fails sends the error to the driver and up the chain in place
of its results, and goes on reading (nothing blocks below it). A stage that dies closes its channel ends:
the stage above sees end of file, the one below a broken pipe, the driver end of file on res<k>; each loop
ends and closes its own ends, so the loss spreads to every loop. The driver names the stage whose loop
failed with the actor's death (StageLost), tears the channels down (`reset`: its own ends closed, every
loop awaited, a loop still running after TEARDOWN_S killed so that it is replaced as well) and the
recovery restores and replays over a fresh set of channels ([Note: recovery]).

One node only: the driver and every stage must share /dev/shm; placement refuses `--transport shm`
across nodes (pipeline/engines/transport.py `resolve`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, Any

import ray

from pipeline.engines import channel
from pipeline.engines.actors import SHM_GROUP, get
from pipeline.engines.inband import InBandTransport
from pipeline.errors import LaminaError, StageError, StageLost
from pipeline.stage import Hop, HopFailed, HopResult
from workers.replicas import ReplicaLost

if TYPE_CHECKING:
    from pipeline.engines.placement import StageActors

logger = logging.getLogger(__name__)

TEARDOWN_S = 5.0  # how long a stage's loop may take to end once its channels close, before it is killed
LOST_S = 10.0  # after a channel closed, how long to wait for Ray to tell which stage died


def shm_dir() -> str:
    """Where channel directories go: /dev/shm (memory) where there is one, else the temporary directory."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def sweep(where: str | None = None) -> list[str]:
    """Remove the channel directories left in `where` (default `shm_dir()`) by drivers that are gone (killed
    before they could close them: a channel directory holds a driver's pid); returns what was removed."""
    where = where or shm_dir()
    gone = []
    for name in os.listdir(where):
        match = re.fullmatch(r"lamina-.+-p(\d+)-[^-]+", name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(where, name), ignore_errors=True)
            gone.append(name)
        except PermissionError:
            pass  # another user's live process
    if gone:
        logger.info("removed %d shm channel directories of drivers that are gone: %s", len(gone), gone)
    return gone


def slots(queue_depth: int) -> int:
    """Array slots per channel: the schedule's admission window of one boundary (depth + 1)."""
    return queue_depth + 1


class ShmTransport(InBandTransport):
    """Shared-memory channels between the stage actors of one node (module docstring)."""

    name = "shm"

    def __init__(self, actors: StageActors) -> None:
        super().__init__(actors)
        self._dir: str | None = None  # the channels' directory, while they are open
        self._in0: channel.Writer | None = None
        self._res: list[channel.Reader] = []
        self._loops: list[Any] = []  # each stage's loop call
        self._early: list[dict[tuple[int, bool], HopResult]] = []  # per stage, results read before asked for
        self.opens = 0  # channel sets opened so far: one, plus one per recovery

    def _opened(self) -> bool:
        return self._dir is not None

    def _open(self) -> None:
        handles, n = list(self.actors.handles), len(self.actors)
        sweep()
        self._dir = tempfile.mkdtemp(prefix=f"lamina-{self.actors.run_id}-p{os.getpid()}-", dir=shm_dir())
        for k in range(n):
            channel.make(self._dir, f"in{k}")
            channel.make(self._dir, f"res{k}")
        depth = slots(self.actors.cfg.queue_depth)
        # Read ends first, everywhere; then write ends (channel.py): two rounds.
        refs = [h.shm_open.remote(self._dir, depth, 0, k + 1 == n) for k, h in enumerate(handles)]
        self._in0 = channel.Writer(self._dir, "in0", depth)
        self._res = [channel.Reader(self._dir, f"res{k}") for k in range(n)]
        self._gather(refs)
        refs = [h.shm_open.remote(self._dir, depth, 1, k + 1 == n) for k, h in enumerate(handles)]
        self._in0.open_write()
        for r in self._res:
            r.open_write()
        self._gather(refs)
        self._loops = [h.shm_loop.options(concurrency_group=SHM_GROUP).remote() for h in handles]
        self._early = [{} for _ in range(n)]
        self.opens += 1
        logger.info("shm channels for %d stages in %s (%d slots each)", n, self._dir, depth)

    def _gather(self, refs: list[Any]) -> None:
        for k, ref in enumerate(refs):
            get(ref, k, None, self.actors.names[k])

    def _send(self, msg: Hop) -> None:
        assert self._in0 is not None
        try:
            self._in0.send(dataclasses.replace(msg, x=None), msg.x)  # the control, and the frames beside it
        except channel.ChannelClosed as e:
            raise self._lost(0, msg.m, e) from e

    def _result(self, k: int, m: int, step: bool) -> HopResult:
        """Stage k's result of m's message; results come in the order the messages were sent."""
        early = self._early[k]
        while (m, step) not in early:
            try:
                got, _ = self._res[k].recv()  # a HopResult, or a HopFailed in its place
            except channel.ChannelClosed as e:
                raise self._lost(k, m, e) from e
            if isinstance(got, HopFailed):
                raise _failure(got.error, k, got.m, self.actors.names[k])
            early[(got.m, got.step)] = got
        return early.pop((m, step))

    def _lost(self, k: int, m: int, cause: BaseException) -> StageLost:
        """A channel closed under stage k's message m: the stage whose actor died (Ray says which, once its
        loop call fails), or k when none has failed within LOST_S."""
        deadline = time.monotonic() + LOST_S
        while time.monotonic() < deadline:
            ready, _ = ray.wait(self._loops, num_returns=len(self._loops), timeout=0.1)
            for j, ref in enumerate(self._loops):
                if ref in ready:
                    try:
                        ray.get(ref)  # a loop that ended on a closed channel returns: its stage is alive
                    except Exception as e:  # noqa: BLE001 - the actor died (RayActorError), or its loop broke
                        return StageLost(j, m, e, self.actors.names[j])
        return StageLost(k, m, cause, self.actors.names[k])

    def _forget(self) -> None:
        for early in self._early:
            early.clear()

    # -- lifetime ---------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Close the channels and wait for every loop to end (killing what does not, so that it is
        replaced); the next `begin` opens a fresh set."""
        self._teardown(stop=False)

    def close(self) -> None:
        """Before the actors are killed: tell the loops to stop, then close the channels."""
        self._teardown(stop=True)

    def _teardown(self, stop: bool) -> None:
        self.abandon()
        if self._dir is None:
            return
        if stop and self._in0 is not None:
            try:
                self._in0.send(None)  # the loops end in order, bottom to top
            except channel.ChannelClosed:
                pass
        if self._in0 is not None:
            self._in0.close()
        for r in self._res:
            r.close()  # a loop blocked on its result channel sees a broken pipe
        self._in0, self._res = None, []
        _, left = ray.wait(self._loops, num_returns=len(self._loops), timeout=TEARDOWN_S)
        for h, ref in zip(self.actors.handles, self._loops, strict=False):
            if ref in left:
                logger.warning("a stage's shm loop did not end within %gs: killing it", TEARDOWN_S)
                ray.kill(h, no_restart=True)
        self._loops = []
        shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None


def _failure(error: BaseException, k: int, m: int, actor: str) -> LaminaError:
    """What stage k sent in place of its result of m: its own StageError (or the one below's, handed up),
    a lost replica (the stage is lost: recoverable), or another of lamina's errors."""
    if isinstance(error, ReplicaLost):
        return StageLost(k, m, error, actor)
    if isinstance(error, LaminaError):
        return error
    return StageError(k, m, error, actor)
