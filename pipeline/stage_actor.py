"""The edge where a pipeline stage becomes a Ray actor.

The stage logic is `workers.learner.Stage`, plain torch. `StageWorker` hosts one inside an actor process
and adds only what crossing a process boundary needs:

  - arrays in, arrays out: activations travel as numpy arrays, which Ray's object store hands to the
    next stage without a copy (torch tensors are pickled by value — see pipeline/bench/transport.py);
  - the device (cuda when Ray gave the actor a GPU) and the thread count (its CPU reservation);
  - a `StepReport` per micro-batch: the layers' metrics and the busy interval, small, no tensors;
  - the stage's gauges (pipeline/telemetry.py);
  - errors become a `StageError` naming the stage and the micro-batch;
  - a ledger of the micro-batches it applied, and barrier snapshots of its state, written by the stage
    itself to the checkpoint store ([Note: barrier checkpoints] in pipeline/checkpoint.py).

`remote_stage_class()` is the one place that wraps it with `ray.remote`; pipeline/ray_engine.py places
and drives the actors.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from pipeline.checkpoint import CheckpointStore, Ledger, StageFile, stage_payload
from pipeline.telemetry import BusyWindow, StageTelemetry
from workers.learner import LearnerSpec, Stage

logger = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A pipeline stage failed: which stage, on which micro-batch, and why.

    Raised inside the actor (so the stage and micro-batch travel with the error, even when Ray hands it
    to a later stage that depended on the failed output) and re-raised once by the driver.
    """

    def __init__(self, stage: int, micro_batch: int | None, cause: BaseException, actor: str = "") -> None:
        # All fields go to Exception.args: that is what pickling (Ray's error transport) rebuilds from.
        super().__init__(stage, micro_batch, cause, actor)
        self.stage, self.micro_batch, self.cause, self.actor = stage, micro_batch, cause, actor

    def __str__(self) -> str:
        who = f"stage {self.stage}" + (f" ({self.actor})" if self.actor else "")
        when = "" if self.micro_batch is None else f" on micro-batch {self.micro_batch}"
        return f"{who} failed{when}: {type(self.cause).__name__}: {self.cause}"


@dataclass(frozen=True)
class StepReport:
    """What a stage tells the driver after each micro-batch (the activation travels separately)."""

    stage: int  # stage index, 0 = bottom
    micro_batch: int  # micro-batch number m
    layers: tuple[tuple[int, dict[str, float]], ...]  # (layer index, that layer's metrics), bottom to top
    start: float  # busy interval of this step, time.time() seconds: arguments resolved ...
    end: float  # ... to output ready
    rate: float  # micro-batches per second over the stage's recent steps
    busy: float  # busy fraction over the same window


class StageWorker:
    """One pipeline stage inside an actor: layers [first, last) of the network, each learning locally."""

    def __init__(self, spec: LearnerSpec, first: int, last: int, index: int, run: str, threads: int,
                 name: str = "") -> None:
        # The actor's CPU reservation is its thread budget: more threads than reserved cores would make
        # stages sharing a node steal from each other. It also fixes the kernels' reduction order, which
        # the bit-for-bit transparency test relies on (the reference runs with the same count).
        torch.set_num_threads(threads)
        # Inputs arrive as read-only numpy views of the object store; the learner never writes its input,
        # so wrapping them without a copy is safe, and torch's "not writable" warning is noise.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.index, self.name, self.threads = index, name, threads
        self.first, self.last = first, last
        self.ledger = Ledger()  # micro-batches applied, restored with the state: exactly-once evidence
        self.device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        self.stage = Stage.layer_local(spec, first, last, self.device)
        self.layers = tuple(lrn.last - 1 for lrn in self.stage.learners)
        self.window = BusyWindow()
        self.telemetry = StageTelemetry(run, index)
        logger.info("stage %d (%s): layers %s on %s, %d thread(s)", index, name, self.layers, self.device,
                    threads)

    @ray.method(num_returns=2)
    def step(self, m: int, x: np.ndarray, emit: bool = True) -> tuple[np.ndarray | None, StepReport]:
        """Learn from micro-batch m; return this stage's output (None when `emit` is off) and a report."""
        start = time.time()
        try:
            out, metrics = self.stage.step(torch.from_numpy(x).to(self.device))
            for layer, mt in zip(self.layers, metrics, strict=True):
                # A non-finite loss has already been stepped into the weights: the run cannot recover,
                # so stop it here, where the stage and micro-batch are known. The check is free: the
                # metrics are already Python floats.
                if not math.isfinite(mt["loss"]):
                    raise FloatingPointError(f"layer {layer}: local loss is {mt['loss']} (input finite: "
                                             f"{bool(np.isfinite(x).all())})")
            # .cpu() is a device sync on cuda; on the cpu .numpy() shares the tensor's memory, and the
            # only copy is Ray's into the object store.
            y = out.cpu().numpy() if emit else None
        except Exception as e:
            raise StageError(self.index, m, e, self.name) from e
        self.ledger.add(m)
        end = time.time()
        rate, busy = self.window.add(start, end)
        layers = tuple(zip(self.layers, metrics, strict=True))
        self.telemetry.record(layers, rate, busy)
        return y, StepReport(self.index, m, layers, start, end, rate, busy)

    def state_dict(self) -> dict:
        """Every learner's state, tensors on the cpu (what checkpoints hold)."""
        return _to_cpu(self.stage.state_dict())

    def load_state_dict(self, state: dict, ledger: list[list[int]] | None = None) -> None:
        self.stage.load_state_dict(state)
        self.ledger = Ledger(ledger)

    def snapshot(self, m: int, store: CheckpointStore) -> StageFile:
        """Write this stage's state as it is after micro-batch m (the barrier: queued right behind
        step(m), so nothing later has been applied) to checkpoint m + 1 of `store`."""
        try:
            payload = stage_payload(self.index, self.first, self.last, m + 1, self.state_dict()["learners"],
                                    self.ledger)
            return store.write_stage(m + 1, self.index, payload)
        except Exception as e:
            raise StageError(self.index, m, e, self.name) from e

    def restore(self, store: CheckpointStore, step: int) -> int:
        """Load this stage's part of complete checkpoint `step` (read here, not through the driver)."""
        payload = store.read_stage(step, self.index)
        if (payload["first"], payload["last"]) != (self.first, self.last):
            raise ValueError(f"checkpoint {step} stage {self.index} holds layers [{payload['first']}, "
                             f"{payload['last']}), this stage [{self.first}, {self.last})")
        self.stage.load_state_dict({"learners": payload["learners"]})
        self.ledger = Ledger(payload["ledger"])
        torch.set_rng_state(payload["rng"])
        return step

    def get_ledger(self) -> list[list[int]]:
        return self.ledger.ranges

    def info(self) -> dict[str, Any]:
        """Where this stage runs: for logs and for tests of placement."""
        return {"stage": self.index, "name": self.name, "layers": self.layers, "device": str(self.device),
                "threads": self.threads, "node_id": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid()}


def remote_stage_class() -> Any:
    """`StageWorker` as a Ray actor class (the caller adds placement, name and resources as options)."""
    return ray.remote(StageWorker)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
