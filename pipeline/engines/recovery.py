"""Recovery policy: which failures the Ray engine retries, how it brings the stages back, when it gives up.

[Note: recovery]
A run with a checkpoint store always has a complete checkpoint: the state it started from is written
before the first micro-batch ([Note: barrier checkpoints] in pipeline/schedule.py). Two kinds of failure
differ (pipeline/errors.py):
  - a `StageError`, raised by a stage's own code (a non-finite loss, a bad input), is deterministic: the
    same micro-batch would fail again. The run stops, naming stage and micro-batch.
  - a `StageLost` (`ray.kill`, its process killed, its node gone: Ray raises RayActorError, or an error in
    the argument a dead stage never produced; a replica of the stage gone; a Direct Transport input that
    never arrived) is not the stage's doing. The driver replaces the dead actors in their placement-group
    bundles (Direct Transport: every stage, the group broke), has every stage (survivors too: they are
    ahead) load its part of the last complete checkpoint `s`, and replays the source from micro-batch s. A
    survivor's queued calls run before its restore (submission order), so nothing from the rolled-back
    timeline survives the restore, and the ledger saved with the state drops those applications as well.
    The source replays micro-batch m exactly (pipeline/sources/source.py); on_step is not called again for
    micro-batches it has seen.
A loss that recurs with no progress in between (no newer complete checkpoint and no micro-batch seen for
the first time) `MAX_RECOVERIES` times in a row stops the run with a `RecoveryError`.
"""

from __future__ import annotations

import logging

from pipeline.checkpoints import CheckpointStore
from pipeline.engines.actors import get
from pipeline.engines.placement import StageActors
from pipeline.errors import RecoveryError, StageLost

logger = logging.getLogger(__name__)

MAX_RECOVERIES = 3  # losses in a row without progress before a run gives up


class Recovery:
    """The recovery policy of one run over its stage actors and checkpoint store."""

    def __init__(self, actors: StageActors, store: CheckpointStore) -> None:
        self.actors, self.store = actors, store
        self.max_in_a_row = MAX_RECOVERIES
        self.count = 0  # recoveries so far
        self._latest, self._seen = -1, -1  # the newest checkpoint and micro-batches seen at the last loss
        self._stalled = 0  # losses in a row without progress

    def recover(self, error: StageLost, seen: int) -> int:
        """After `error`, with on_step having seen micro-batches below `seen`: restore every stage to the last
        complete checkpoint and return its step (the micro-batch to replay from), or raise RecoveryError."""
        latest = self.store.latest_complete()
        if latest is None:
            raise RecoveryError(f"{error} — and no complete checkpoint to recover from in {self.store.uri}") from error
        progress = latest > self._latest or seen > self._seen  # a newer checkpoint, or a micro-batch seen first
        self._stalled = 1 if progress else self._stalled + 1
        self._latest, self._seen = max(latest, self._latest), max(seen, self._seen)
        if self._stalled > self.max_in_a_row:
            raise RecoveryError(f"{error} — {self._stalled} failures in a row without progress (restoring "
                                f"checkpoint {latest}, {seen} micro-batches seen each time): not retrying") from error
        logger.warning("%s; recovering (%d) from checkpoint %s", error, self.count + 1, self.store.dir(latest))
        self.restore(latest)
        return latest

    def restore(self, step: int) -> None:
        """Replace the dead stage actors and have every stage load its part of checkpoint `step`. A stage
        that dies during the restore is replaced too (bounded by the same number of attempts)."""
        self.count += 1
        for attempt in range(self.max_in_a_row + 1):
            try:  # a stage may die again meanwhile, a replacement too: then it is replaced in the next attempt
                self.actors.replace_dead()
                refs = [a.restore.remote(self.store, step) for a in self.actors.handles]
                for k, ref in enumerate(refs):
                    get(ref, k, None, self.actors.names[k])
                return
            except StageLost as e:
                logger.warning("restore attempt %d failed: %s", attempt + 1, e)
        raise RecoveryError(f"could not restore checkpoint {step} after {self.max_in_a_row + 1} attempts")
