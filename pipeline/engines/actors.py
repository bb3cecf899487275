"""The one place a pipeline stage becomes a Ray actor, and Ray's errors become lamina's.

`pipeline.stage.Stage` is a plain class. Inside an actor it needs three things more, added here and
nowhere else: the actor's CPU reservation as its thread budget, its gauges (pipeline/telemetry/gauges.py),
and the node it landed on in `info()`. The placement (which bundle, which name, how many GPUs) is the
caller's: pipeline/engines/placement.py.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayError, RayTaskError
from ray.util.placement_group import get_current_placement_group, placement_group_table
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pipeline import slack
from pipeline.allocator import WORKER_ENV
from pipeline.checkpoints import CheckpointStore
from pipeline.engines import channel
from pipeline.errors import LaminaError, StageError, StageLost
from pipeline.stage import Hop, HopFailed, HopResult, Stage, StepReport
from pipeline.telemetry.gauges import StageGauges
from workers.learner import LearnerSpec
from workers.replicas import ReplicaGroup, ReplicaLost, free_port, share

logger = logging.getLogger(__name__)

NAMESPACE = "lamina"  # Ray namespace of the stage actors: `ray list actors` / ray.get_actor(name, NAMESPACE)
SHM_GROUP = "shm"  # the concurrency group a stage's shm loop runs in (pipeline/engines/shm.py)
PING_TIMEOUT_S = 60.0  # how long a stage or replica may take to answer whether it is alive (its queue drains first)


@dataclass(frozen=True)
class Replicas:
    """Where a stage's replicas 1 .. R-1 go: bundles of the run's placement group, one each (replica 0, the
    stage actor itself, is in the stage's own bundle)."""

    pg: Any  # the run's PlacementGroup
    bundles: tuple[int, ...]  # bundle index of replica 1, 2, ...
    cpus: float
    gpus: float
    timeout_s: float  # how long a replica waits for the others in a collective (workers/replicas.py)


class TransferLost(RuntimeError):
    """A stage's input never reached it: Ray Direct Transport's transfer from the stage below failed (Ray
    gives up on one after 60 s, and on this project's 2-core machine one sometimes never completes under
    load). The stage's state is intact but the pipeline's order is broken: recovered as a lost stage."""


def _stages_here() -> int:
    """The bundles (stages and replicas, one thread each) of this actor's placement group on its node."""
    pg = get_current_placement_group()
    if pg is None:
        return 1
    here = ray.get_runtime_context().get_node_id()
    return sum(node == here for node in placement_group_table(pg)["bundles_to_node_id"].values())


class _StageActor(Stage):
    """A stage in a Ray actor. With `replicas`, it is replica 0 of its stage and drives the others
    ([Note: replica groups])."""

    def __init__(self, spec: LearnerSpec, first: int, last: int, index: int, run_id: str, name: str,
                 threads: int, device: str, give_way: bool, replicas: Replicas | None = None) -> None:
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
        if give_way and threads == 1 and slack.fits(_stages_here()):  # --yield-slack (pipeline/slack.py)
            self.give_way = slack.GiveWay()
        self._may_give_way = give_way
        self._args = (spec, first, last, index, run_id)
        self.replicas = replicas
        self.followers: list[Any] = []  # replicas 1 .. R-1, driven by this one
        self._spawned = 0  # followers started so far: each gets a fresh name
        self._direct: StepReport | BaseException | None = None  # step_direct's report, until take_report
        # The shm transport's channel ends: input, output (None at the top), results to the driver.
        self._shm: tuple[channel.Reader | None, channel.Writer | None, channel.Writer | None] = (None, None, None)
        if replicas is not None:
            self.followers = [self._spawn(r) for r in range(1, len(replicas.bundles) + 1)]
            self._form_group()

    def __repr__(self) -> str:  # the Repr column of the dashboard's Actors page
        return f"{self.name} layers {[k + 1 for k in self.layers]} on {self.device}"

    def info(self) -> dict[str, Any]:
        return {**super().info(), "node_id": ray.get_runtime_context().get_node_id(),
                "replicas": len(self.followers) + 1}

    # [Note: replica groups]
    # A stage of R replicas is one stage actor to the driver and to every transport: replica 0. It starts the
    # other R - 1 in their bundles (they are its children: they die with it), forms the torch.distributed
    # group (gloo on the cpu, NCCL on GPUs; loopback when all are on this node), and on each step hands
    # replica r its share of the clips, steps its own share, and waits for theirs. Inside the step the
    # replicas gather the embeddings and sum the gradients (workers/replicas.py), so every replica ends the
    # step with the same weights: replica 0's barrier snapshot is the stage's. A replica that dies breaks
    # the group's next collective (after at most `Replicas.timeout_s`): the step fails as ReplicaLost, the
    # driver sees the stage lost and recovers ([Note: recovery]); the restore starts a new replica in the
    # dead one's bundle, forms the group again and has every replica load the checkpoint.

    def step(self, m: int, x: np.ndarray | torch.Tensor, emit: bool = True, as_tensor: bool = False,
             into: Any = None) -> tuple[Any, StepReport]:
        if not self.followers:
            return super().step(m, x, emit, as_tensor, into)
        size = len(self.followers) + 1
        refs = [f.replica_step.remote(m, share(x, r, size), emit) for r, f in enumerate(self.followers, 1)]
        y, report = super().step(m, share(x, 0, size), emit, as_tensor)
        self._wait(refs)
        return y, report

    # The direct transport (pipeline/engines/transport.py) takes a step's output as a tensor that Ray sends
    # to the stage above over the collective group (the top stage: none), and the report in a second call
    # right behind it: a step whose input never arrived never runs, and only that second call can say so.

    def step_direct(self, m: int, x: np.ndarray | torch.Tensor, emit: bool = True) -> torch.Tensor | None:
        try:
            y, self._direct = self.step(m, x, emit, as_tensor=True)
        except Exception as e:
            self._direct = e
            raise
        return y

    def take_report(self, m: int) -> StepReport:
        """The report of step_direct(m), queued right behind it; its failure, if it failed."""
        got, self._direct = self._direct, None
        if got is None:  # step_direct(m) never ran: Ray could not resolve its input, the stage below's tensor
            raise TransferLost(f"{self.name}: the input of micro-batch {m} never arrived from the stage below")
        if isinstance(got, BaseException):
            raise got
        assert isinstance(got, StepReport) and got.micro_batch == m, (got, m)
        return got

    def replica_step(self, m: int, x: np.ndarray, emit: bool) -> None:
        """Replica r's part of a step: its share in, the whole batch's loss and gradient, nothing out."""
        super().step(m, x, emit)

    def join_group(self, address: str, rank: int, size: int, timeout_s: float) -> None:
        self.set_group(ReplicaGroup.join(address, rank, size, self.device, timeout_s))

    def load(self, states: list[dict], ledger: list[list[int]] | None = None) -> None:
        refs = [f.load.remote(states, ledger) for f in self.followers]
        super().load(states, ledger)
        self._wait(refs)

    def restore(self, store: CheckpointStore, step: int) -> int:
        if self.replicas is not None:
            self._heal()
        refs = [f.restore.remote(store, step) for f in self.followers]
        super().restore(store, step)
        self._wait(refs)
        return step

    def _spawn(self, r: int) -> Any:
        assert self.replicas is not None
        self._spawned += 1
        spec, first, last, index, run_id = self._args
        return stage_actor_class().options(
            name=f"{self.name}-replica{r}" + (f"-{self._spawned}" if self._spawned > r else ""), namespace=NAMESPACE,
            num_cpus=self.replicas.cpus, num_gpus=self.replicas.gpus, max_restarts=0, max_task_retries=0,
            max_concurrency=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.replicas.pg, placement_group_bundle_index=self.replicas.bundles[r - 1]),
        ).remote(spec, first, last, index, run_id, f"{self.name}-replica{r}", self.threads, str(self.device),
                  self._may_give_way)

    def _form_group(self) -> None:
        """Form the replica group (again): rank 0 here, listening on loopback when every replica is on this
        node, else on this node's address."""
        assert self.replicas is not None
        here = ray.get_runtime_context().get_node_id()
        nodes = [info["node_id"] for info in ray.get([f.info.remote() for f in self.followers])]
        host = "127.0.0.1" if all(n == here for n in nodes) else ray.util.get_node_ip_address()
        address, size = f"{host}:{free_port(host)}", len(self.followers) + 1
        refs = [f.join_group.remote(address, r, size, self.replicas.timeout_s) for r, f in enumerate(self.followers, 1)]
        self.join_group(address, 0, size, self.replicas.timeout_s)
        ray.get(refs)
        logger.info("%s: replica group of %d formed at %s", self.name, size, address)

    def _heal(self) -> None:
        """Replace the replicas that do not answer, then form the group again (a loss broke it)."""
        for r, f in enumerate(self.followers, 1):
            try:
                ray.get(f.info.remote(), timeout=PING_TIMEOUT_S)
            except (RayError, GetTimeoutError):
                ray.kill(f, no_restart=True)
                self.followers[r - 1] = self._spawn(r)
                logger.warning("%s: replica %d replaced", self.name, r)
        self._form_group()

    def _wait(self, refs: list[Any]) -> None:
        """The other replicas' part of a call; a replica gone is ReplicaLost (the driver recovers the stage)."""
        try:
            ray.get(refs)
        except RayTaskError as e:
            if isinstance(e.cause, LaminaError | ReplicaLost):
                raise e.cause from e
            raise
        except RayError as e:
            raise ReplicaLost(f"{self.name}: a replica is gone ({type(e).__name__})") from e

    # A compiled graph (pipeline/engines/compiled_graph.py) runs these in a thread of its own. OpenMP's thread
    # count is per thread, so the budget is set again there: the same count is what keeps the kernels'
    # reduction order, and so transparency, bit for bit. `on_device`: the graph carries the output to the
    # stage above as a tensor on this stage's GPU (over NCCL), not as a numpy array in host memory.

    @ray.method(num_returns=2)
    def relay(self, msg: Hop, on_device: bool = False) -> tuple[Hop, HopResult]:
        torch.set_num_threads(self.threads)
        return super().hop(msg, emit=True, as_tensor=on_device)

    def relay_top(self, msg: Hop) -> HopResult:
        """The top stage: its output goes nowhere, so it is not made."""
        torch.set_num_threads(self.threads)
        return super().hop(msg, emit=False)[1]


    # The shm transport (pipeline/engines/shm.py): the stage's channel ends, opened in two rounds, and its loop,
    # run in the actor's `shm` concurrency group (a thread of its own: the thread budget is set there too).

    def shm_open(self, directory: str, slots: int, phase: int, top: bool) -> None:
        """Phase 0: open this stage's read ends (its input, and the free-slot ends of what it writes);
        phase 1: its write ends. The driver runs phase 0 everywhere before phase 1 (channel.py)."""
        if phase == 0:
            self._shm_close()
            k = self.index
            self._shm = (channel.Reader(directory, f"in{k}"),
                         None if top else channel.Writer(directory, f"in{k + 1}", slots),
                         channel.Writer(directory, f"res{k}", 1))
        else:
            for end in self._shm:
                if end is not None:
                    end.open_write()

    def shm_loop(self) -> None:
        """Step on each message from the stage below (or the driver), hand the output up and the result to the
        driver, until a stop message or a closed channel ([Note: shm lifetime and recovery])."""
        torch.set_num_threads(self.threads)
        inp, out, res = self._shm
        assert inp is not None and res is not None, "shm_open first"
        failed: BaseException | None = None  # this stage's own failure: every later message fails with it
        try:
            while True:
                msg, x = inp.recv()  # a Hop without its array (x is that), a HopFailed, or None: stop
                if msg is None:  # the driver's stop, handed up
                    if out is not None:
                        out.send(None)
                    return
                error = msg.error if isinstance(msg, HopFailed) else failed
                if error is None:
                    try:
                        # The output is written straight into the next channel's slot: sending it copies nothing.
                        nxt, result = self.hop(dataclasses.replace(msg, x=x), out is not None,
                                               out.claim if out is not None else None)
                    except Exception as e:  # noqa: BLE001 - sent on in place of the results (shm.py)
                        error = failed = _portable(e, self.index, msg.m, self.name)
                if x is not None:
                    inp.release()  # the step is done with its input
                if error is not None:
                    failure = HopFailed(msg.m, msg.step, error)
                    if out is not None:
                        out.send(failure)
                    res.send(failure)
                    continue
                if out is not None:
                    out.send(dataclasses.replace(nxt, x=None), nxt.x)
                res.send(result)
        except channel.ChannelClosed:
            return  # a neighbour or the driver is gone: the driver tears down and recovers
        finally:
            self._shm_close()

    def _shm_close(self) -> None:
        for end in self._shm:
            if end is not None:
                end.close()
        self._shm = (None, None, None)


def _portable(e: Exception, stage: int, m: int, actor: str) -> BaseException:
    """A stage's failure as it can travel through a channel: lamina's own errors and a lost replica as they
    are, anything else as a StageError; one that does not pickle as a StageError of its text."""
    error: BaseException = e if isinstance(e, LaminaError | ReplicaLost) else StageError(stage, m, e, actor)
    try:
        pickle.dumps(error)
    except Exception:  # noqa: BLE001 - any pickling failure: keep the text
        error = StageError(stage, m, RuntimeError(f"{type(e).__name__}: {e}"), actor)
    return error


def stage_actor_class(transport: str = "object-store") -> Any:
    """`Stage` as a Ray actor class for `transport`; the caller adds placement, name and resources as
    options. Direct Transport: its calls can return tensors over a collective group (a background thread per
    actor receives them). shm: its loop runs in a concurrency group of its own. Every stage's process starts
    with the allocator's environment (`WORKER_ENV`, pipeline/allocator.py): steps outside the main thread."""
    env = {"env_vars": WORKER_ENV}
    if transport == "direct":
        return ray.remote(enable_tensor_transport=True, runtime_env=env)(_StageActor)  # type: ignore[call-overload]  # (stubs lack it)
    if transport == "shm":
        return ray.remote(concurrency_groups={SHM_GROUP: 1}, runtime_env=env)(_StageActor)  # type: ignore[call-overload]  # (stubs lack it)
    return ray.remote(runtime_env=env)(_StageActor)


def get(ref: Any, stage: int, micro_batch: int | None, actor: str, fetch: Any = ray.get) -> Any:
    """ray.get of stage `stage`'s result for `micro_batch` (None: not a step), failures mapped once:

      a StageError raised in a stage (possibly one below, which failed first)   StageError, as raised
      another of lamina's errors raised in the stage (a checkpoint it refused)  that error
      any other exception raised by the stage's own code                        StageError (not retried)
      a replica of the stage gone (ReplicaLost)                                 StageLost (recoverable)
      its input's Direct Transport transfer failed (TransferLost)               StageLost (recoverable)
      anything else: the actor, or the one that produced its input, is gone     StageLost (recoverable)
    `fetch`: how to get it (a compiled graph's result: without Ray's default timeout).
    """
    try:
        return fetch(ref)
    except RayError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, ReplicaLost | TransferLost):  # recoverable, as the stage's own loss
            raise StageLost(stage, micro_batch, cause, actor) from e
        if isinstance(cause, StageError):
            raise StageError(cause.stage, cause.micro_batch, cause.cause, cause.actor) from e
        if isinstance(e, RayTaskError) and isinstance(cause, LaminaError):
            raise cause from e
        if isinstance(e, RayTaskError) and isinstance(cause, Exception) and not isinstance(cause, RayError):
            raise StageError(stage, micro_batch, cause, actor) from e
        raise StageLost(stage, micro_batch, e, actor) from e
