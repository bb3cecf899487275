"""Every error lamina raises on purpose: one root, one subclass per kind of problem.

    LaminaError                     the root: the CLI turns any of these into one line and a non-zero exit
      ConfigError   (ValueError)    a flag, a config.json or an argument is invalid; names the flag
      DataError     (ValueError)    input data is unusable; names the file
      StageError                    a stage's own code failed (a non-finite loss, a bad input): deterministic,
                                    the same micro-batch would fail again, so it is never retried
      StageLost                     a stage actor died (killed, OOM, its node lost): not the stage's doing,
                                    so a run with checkpoints restores and replays ([Note: recovery])
      PlacementError                the cluster cannot fit one bundle per stage
      RecoveryError                 stage losses keep recurring without progress
      CheckpointError               a checkpoint cannot be written, or a file does not match its record

StageError and StageLost are siblings, not parent and child: one must be retried and the other must not,
so no `except` clause can take one for the other by accident.
"""

from __future__ import annotations


class LaminaError(Exception):
    """The root of lamina's own errors. `exit_code` is what the CLI exits with."""

    exit_code = 1


class ConfigError(LaminaError, ValueError):
    """An invalid setting; the message names the flag (or the config file) and the offending value."""

    exit_code = 2


class DataError(LaminaError, ValueError):
    """Unusable input data; the message names the source and the problem."""

    exit_code = 2


class _StageFault(LaminaError):
    """Which stage, on which micro-batch (None: not during a step), and why. Picklable: Ray carries it."""

    verb = "failed"

    def __init__(self, stage: int, micro_batch: int | None, cause: BaseException, actor: str = "") -> None:
        # All fields go to Exception.args: that is what unpickling (Ray's error transport) rebuilds from.
        super().__init__(stage, micro_batch, cause, actor)
        self.stage, self.micro_batch, self.cause, self.actor = stage, micro_batch, cause, actor

    def __str__(self) -> str:
        who = f"stage {self.stage}" + (f" ({self.actor})" if self.actor else "")
        when = "" if self.micro_batch is None else f" on micro-batch {self.micro_batch}"
        return f"{who} {self.verb}{when}: {type(self.cause).__name__}: {self.cause}"


class StageError(_StageFault):
    """A stage's own code raised. Raised inside the stage (so the stage and micro-batch travel with it,
    even when Ray hands it to a later stage that depended on the failed output) and re-raised once by
    the driver. Never retried."""


class StageLost(_StageFault):
    """A stage actor died rather than failing in its own code; retryable from the last checkpoint."""

    verb = "was lost"


class PlacementError(LaminaError):
    """The cluster cannot fit one bundle per stage."""


class RecoveryError(LaminaError):
    """Stage losses keep recurring without progress: the run stops instead of looping."""


class CheckpointError(LaminaError):
    """A checkpoint could not be written, or a file of one does not match its record or its format."""
