"""The one place a pipeline stage becomes a Ray actor, and Ray's errors become lamina's.

`pipeline.stage.Stage` is a plain class. Inside an actor it needs three things more, added here and
nowhere else: the actor's CPU reservation as its thread budget, its gauges (pipeline/telemetry/gauges.py),
and the node it landed on in `info()`. The placement (which bundle, which name, how many GPUs) is the
caller's: pipeline/engines/placement.py.
"""

from __future__ import annotations

import warnings
from typing import Any

import ray
import torch
from ray.exceptions import RayError, RayTaskError

from pipeline.errors import LaminaError, StageError, StageLost
from pipeline.stage import Hop, HopResult, Stage
from pipeline.telemetry.gauges import StageGauges
from workers.learner import LearnerSpec


class _StageActor(Stage):
    def __init__(self, spec: LearnerSpec, first: int, last: int, index: int, run_id: str, name: str,
                 threads: int, device: str) -> None:
        # The CPU reservation is the thread budget: more threads than reserved cores would make stages sharing
        # a node steal from each other. It also fixes the kernels' reduction order, which the bit-for-bit
        # transparency test relies on (the reference runs with the same count).
        torch.set_num_threads(threads)
        self.threads = threads
        # Inputs arrive as read-only numpy views of the object store; a learner never writes its input, so
        # wrapping them without a copy is safe, and torch's "not writable" warning is noise.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        super().__init__(spec, first, last, index, name=name, device=device,
                         report=StageGauges(run_id, index).record)

    def __repr__(self) -> str:  # the Repr column of the dashboard's Actors page
        return f"{self.name} layers {[k + 1 for k in self.layers]} on {self.device}"

    def info(self) -> dict[str, Any]:
        return {**super().info(), "node_id": ray.get_runtime_context().get_node_id()}

    # A compiled graph (pipeline/engines/transport.py) runs these in a thread of its own. OpenMP's thread
    # count is per thread, so the budget is set again there: the same count is what keeps the kernels'
    # reduction order, and so transparency, bit for bit.

    @ray.method(num_returns=2)
    def relay(self, msg: Hop) -> tuple[Hop, HopResult]:
        torch.set_num_threads(self.threads)
        return super().hop(msg, emit=True)

    def relay_top(self, msg: Hop) -> HopResult:
        """The top stage: its output goes nowhere, so it is not made."""
        torch.set_num_threads(self.threads)
        return super().hop(msg, emit=False)[1]


def stage_actor_class() -> Any:
    """`Stage` as a Ray actor class; the caller adds placement, name and resources as options."""
    return ray.remote(_StageActor)


def get(ref: Any, stage: int, micro_batch: int | None, actor: str, fetch: Any = ray.get) -> Any:
    """ray.get of stage `stage`'s result for `micro_batch` (None: not a step), failures mapped once:

      a StageError raised in a stage (possibly one below, which failed first)   StageError, as raised
      another of lamina's errors raised in the stage (a checkpoint it refused)  that error
      any other exception raised by the stage's own code                        StageError (not retried)
      anything else: the actor, or the one that produced its input, is gone     StageLost (recoverable)
    `fetch`: how to get it (a compiled graph's result: without Ray's default timeout).
    """
    try:
        return fetch(ref)
    except RayError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, StageError):
            raise StageError(cause.stage, cause.micro_batch, cause.cause, cause.actor) from e
        if isinstance(e, RayTaskError) and isinstance(cause, LaminaError):
            raise cause from e
        if isinstance(e, RayTaskError) and isinstance(cause, Exception) and not isinstance(cause, RayError):
            raise StageError(stage, micro_batch, cause, actor) from e
        raise StageLost(stage, micro_batch, e, actor) from e
