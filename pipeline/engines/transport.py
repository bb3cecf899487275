"""Transports: how an activation gets from stage k to stage k + 1, behind one seam the driver loop drives.

The driver (pipeline/engines/ray_engine.py) executes the schedule's actions (pipeline/schedule.py) through a
`Transport`: `step(k, m, frames)` hands micro-batch m to stage k, `snapshot(k, m)` puts stage k's barrier
snapshot right behind its step of m, `report(k, m)` waits for stage k's report of m, `parts(m)` gathers a
barrier's parts. Each transport keeps the one order transparency rests on: every stage sees m, m+1, ... and
writes a barrier snapshot right behind the step it belongs to.

    object-store     one Ray actor call per stage step; the output's object reference is chained into the
                     next stage's call, so the activation goes stage -> object store -> stage (numpy:
                     one copy in, zero-copy read) and never through the driver. ~1 ms of Ray per call.
    direct           Ray Direct Transport: a stage's output stays a torch tensor, in the stage's memory (on
                     its GPU), and Ray sends it straight to the stage above over a collective group of the
                     stage actors (gloo on the cpu, NCCL between GPUs); only its small description and the
                     report go through the object store, the report in a second call behind the step.
    compiled-graph   a Ray Compiled Graph over the stage actors, compiled once: the driver writes micro-batch
                     m into the graph's input channel, each stage reads the one below's output from a
                     shared-memory channel and writes its own for the stage above (on GPUs Ray can carry
                     torch tensors over NCCL instead: not measured here). No per-call RPC, no object store.

[Note: compiled-graph barriers and recovery]
A compiled graph runs each stage's calls in the order the driver executed them, and nothing else can be
queued between two of them. So a barrier travels *inside* the graph: the message for micro-batch m carries
the checkpoint store when a barrier falls after m (`pipeline.stage.Hop`), every stage writes its part right
behind its step of m and hands it to the driver with its report. The schedule says a barrier falls after m
with Snapshot(0, m) right behind Step(0, m), so stage 0's step is executed one action late, once it is known
whether a snapshot rides with it. A barrier that cannot ride (the initial one, or one a stop request adds
after m was handed out) is a snapshot-only message, queued behind everything executed so far: each stage
writes its state as it is after m, because a stop hands out nothing after m.
A lost actor breaks the whole graph (its channels die with it): every result in flight fails, the graph
is torn down, the dead actor is replaced in its bundle (pipeline/engines/placement.py), every stage restores
the last complete checkpoint ([Note: recovery]) and the graph is compiled again over the new set of actors
before the replay. A survivor whose graph loop does not stop within TEARDOWN_S is killed and replaced too.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pipeline.checkpoints import CheckpointStore, Part
from pipeline.engines.actors import get
from pipeline.errors import CheckpointError, ConfigError, StageLost
from pipeline.stage import Hop, HopResult, StepReport

if TYPE_CHECKING:
    from pipeline.engines.placement import StageActors

logger = logging.getLogger(__name__)

TRANSPORTS = ("object-store", "direct", "compiled-graph")
# `--transport auto`, per device kind, from `lamina bench` on this project's 2-core machine (PERFLOG,
# "transports side by side"): the compiled graph ran S = 2 at 1.40x and 1.50x the object store's rate in two
# runs, and at 0.50x in a third, when other processes held 0.8 of the 2 cores: its channels are polled, and
# polling loses when the stages do not each have a core of their own. The object store never collapsed, so
# it is the choice here; take `compiled-graph` where every stage (and the driver) has a core to itself.
# `direct` (Ray Direct Transport over gloo) ran within a few percent of the object store in the same repeats
# and costs more per hop below 16 MB: on the cpu it buys nothing. cuda: not measured (no GPU lent); `direct`
# over NCCL is the candidate (device to device), and the compiled graph's NCCL path is not built: the object
# store until `python -m pipeline.bench.gpu_check` says otherwise.
AUTO = {"cpu": "object-store", "cuda": "object-store"}
TEARDOWN_S = 5  # how long a survivor's graph loop may take to stop before it is killed and replaced


def resolve(name: str, device: str) -> str:
    """The transport `--transport name` means on stages of `device` ("cpu" or "cuda")."""
    if name == "auto":
        return AUTO["cuda" if device.startswith("cuda") else "cpu"]
    if name not in TRANSPORTS:
        raise ConfigError(f"--transport must be auto or one of {list(TRANSPORTS)} (got {name!r})")
    return name


class Transport(Protocol):
    """One run's stage-to-stage transport over placed stage actors. `begin` before each segment of the
    schedule; `abandon` forgets what is in flight (a failure); `reset` drops what the actors' replacement
    invalidates; `close` before the actors are killed."""

    name: str

    def begin(self, store: CheckpointStore | None) -> None: ...
    def step(self, k: int, m: int, frames: np.ndarray | None) -> None: ...
    def snapshot(self, k: int, m: int) -> None: ...
    def report(self, k: int, m: int, waiting: Any) -> StepReport: ...
    def parts(self, m: int, waiting: Any) -> list[Part | CheckpointError]: ...
    def in_flight_parts(self) -> list[Any]: ...
    def abandon(self) -> None: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...


def make_transport(name: str, actors: StageActors) -> Transport:
    if name == "object-store":
        return ObjectStoreTransport(actors)
    if name == "direct":
        return DirectTransport(actors)
    if name == "compiled-graph":
        return CompiledGraphTransport(actors)
    raise ConfigError(f"--transport must be one of {list(TRANSPORTS)} (got {name!r})")


class ObjectStoreTransport:
    """Plain actor calls, output references chained stage to stage (the module docstring's diagram)."""

    name = "object-store"

    def __init__(self, actors: StageActors) -> None:
        self.actors = actors
        self.store: CheckpointStore | None = None
        self._outputs: dict[tuple[int, int], Any] = {}  # (k, m) -> stage k's output ref of m, until k+1 takes it
        self._pending: dict[tuple[int, int], Any] = {}  # (k, m) -> report ref of stage k's step m
        self._parts: dict[int, dict[int, Any]] = {}  # m -> {k: ref of stage k's snapshot of m}

    def begin(self, store: CheckpointStore | None) -> None:
        self.store = store
        self.abandon()

    def step(self, k: int, m: int, frames: np.ndarray | None) -> None:
        n = len(self.actors)
        x = frames if k == 0 else self._outputs.pop((k - 1, m))
        out, self._pending[(k, m)] = self.actors.handles[k].step.options(num_returns=2).remote(m, x, k + 1 < n)
        if k + 1 < n:
            self._outputs[(k, m)] = out

    def snapshot(self, k: int, m: int) -> None:
        self._parts.setdefault(m, {})[k] = self.actors.handles[k].snapshot.remote(m, self.store)

    def report(self, k: int, m: int, waiting: Any) -> StepReport:
        ref = self._pending.pop((k, m))
        waiting([ref])
        report: StepReport = get(ref, k, m, self.actors.names[k])
        return report

    def parts(self, m: int, waiting: Any) -> list[Part | CheckpointError]:
        refs = self._parts.pop(m)
        waiting(list(refs.values()))
        return [_part(refs[k], k, m, self.actors.names[k]) for k in sorted(refs)]

    def in_flight_parts(self) -> list[Any]:
        return [ref for refs in self._parts.values() for ref in refs.values()]

    def abandon(self) -> None:
        self._outputs.clear()
        self._pending.clear()
        self._parts.clear()

    def reset(self) -> None:
        self.abandon()

    def close(self) -> None:
        self.abandon()


class DirectTransport(ObjectStoreTransport):
    """Ray Direct Transport between the stages (module docstring). The driver still makes one call per stage
    step, as with the object store, and one more for its report; a lost stage breaks the collective group:
    `reset` destroys it and has every stage replaced, and the next `begin` forms a new one."""

    name = "direct"

    def __init__(self, actors: StageActors) -> None:
        super().__init__(actors)
        self._group: Any = None  # the collective group over the current stage actors

    def begin(self, store: CheckpointStore | None) -> None:
        super().begin(store)
        if self._group is None and len(self.actors) > 1:
            from ray.experimental.collective import create_collective_group

            self._group = create_collective_group(list(self.actors.handles), backend=self._backend()[0])

    def _backend(self) -> tuple[str, str]:
        """(collective backend, tensor transport) for the stages' device."""
        return ("nccl", "nccl") if self.actors.gpus else ("torch_gloo", "gloo")

    def step(self, k: int, m: int, frames: np.ndarray | None) -> None:
        h = self.actors.handles[k]
        x = frames if k == 0 else self._outputs.pop((k - 1, m))
        if k + 1 < len(self.actors):
            self._outputs[(k, m)] = h.step_direct.options(tensor_transport=self._backend()[1]).remote(m, x)
            self._pending[(k, m)] = h.take_report.remote(m)
        else:
            _, self._pending[(k, m)] = h.step.options(num_returns=2).remote(m, x, False)

    def reset(self) -> None:
        """A stage was lost: the group is broken, and every stage actor is killed so that all are replaced.
        A survivor may still hold the old group, or wait on a transfer from the dead stage; and Ray itself
        kills both ends of a failed transfer, up to RAY_rdt_fetch_fail_timeout_milliseconds (60 s) later:
        a fresh set of actors is the one state a new group can be formed over."""
        import ray

        super().reset()
        for h in self.actors.handles:
            ray.kill(h, no_restart=True)
        self._destroy()  # after the kills: a survivor's part of it would wait for the transfer it is stuck in

    def close(self) -> None:
        super().close()
        self._destroy()

    def _destroy(self) -> None:
        group, self._group = self._group, None
        if group is None:
            return
        from ray.experimental.collective import destroy_collective_group

        try:
            destroy_collective_group(group)
        except Exception as e:  # noqa: BLE001 - a group with a dead member may fail to tear down; it is dropped
            logger.debug("destroy collective group: %s", e)


class CompiledGraphTransport:
    """A Ray Compiled Graph over the stage actors ([Note: compiled-graph barriers and recovery])."""

    name = "compiled-graph"

    def __init__(self, actors: StageActors) -> None:
        self.actors = actors
        self.store: CheckpointStore | None = None
        self._graph: Any = None  # the compiled graph, over the actors it was compiled for
        self._held: tuple[int, np.ndarray] | None = None  # stage 0's step, executed once its barrier is known
        self._runs: dict[int, list[Any]] = {}  # m -> each stage's result ref of m's step message
        self._snaps: dict[int, list[Any]] = {}  # m -> each stage's result ref of m's snapshot-only message
        self._riding: set[int] = set()  # micro-batches whose barrier travels in the graph already
        self._parts: dict[int, dict[int, Part | CheckpointError]] = {}  # m -> {k: stage k's part of barrier m}
        self.compiles = 0  # graphs compiled so far: one, plus one per recovery
        self._cap = 0  # executions in flight at most (set when compiled)

    def begin(self, store: CheckpointStore | None) -> None:
        self.store = store
        self.abandon()
        if self._graph is None:  # the first segment, or the actors were replaced since (reset)
            self._compile()

    def _compile(self) -> None:
        from ray.dag import InputNode, MultiOutputNode

        handles, n = list(self.actors.handles), len(self.actors)
        with InputNode() as msg:
            outs = []
            node: Any = msg
            for k, h in enumerate(handles):
                if k + 1 < n:
                    node, out = h.relay.bind(node)
                else:
                    out = h.relay_top.bind(node)
                outs.append(out)
            dag = MultiOutputNode(outs)
        # In flight at most: the schedule's admission window (depth + 1 per boundary, the top stage's own)
        # plus a snapshot-only message. Ray gives every channel that many buffers, so no stage ever blocks
        # on a full channel while the driver waits for an earlier result.
        self._cap = (self.actors.cfg.queue_depth + 1) * n + 2
        self._graph = dag.experimental_compile(_max_inflight_executions=self._cap, _submit_timeout=-1)
        self.compiles += 1
        logger.info("compiled graph over %d stage actors (%d executions in flight at most)", n, self._cap)

    # -- the schedule's actions -------------------------------------------------------------------------

    def step(self, k: int, m: int, frames: np.ndarray | None) -> None:
        if k:
            return  # the graph hands m on from stage k - 1 by itself
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
        self._snaps[m] = self._execute(Hop(m, False, self.store, None))

    def report(self, k: int, m: int, waiting: Any) -> StepReport:
        self._release()
        result = self._take(k, m, self._runs)
        assert result.report is not None
        return result.report

    def parts(self, m: int, waiting: Any) -> list[Part | CheckpointError]:
        self._release()
        for k in range(len(self.actors)):
            if k not in self._parts.get(m, {}):  # a snapshot-only message's result (a step's came with its report)
                self._take(k, m, self._snaps)
        self._riding.discard(m)
        got = self._parts.pop(m)
        assert sorted(got) == list(range(len(self.actors))), (m, sorted(got))
        return [got[k] for k in sorted(got)]

    def in_flight_parts(self) -> list[Any]:
        return []  # a compiled graph's results cannot be waited on with a timeout; nothing to drain

    def _release(self, barrier: bool = False) -> None:
        """Execute the held stage-0 step, with the barrier after it when `barrier`."""
        if self._held is None:
            return
        m, frames = self._held
        self._held = None
        if barrier:
            self._riding.add(m)
        self._runs[m] = self._execute(Hop(m, True, self.store if barrier else None, frames))

    def _execute(self, msg: Hop) -> list[Any]:
        from ray.exceptions import RayError

        try:
            refs = self._graph.execute(msg)
        except RayError as e:  # the graph was torn down under us: Ray's monitor saw a stage die
            k = self._stopped_stage()
            raise StageLost(k, msg.m, e, self.actors.names[k]) from e
        return refs if isinstance(refs, list) else [refs]

    def _stopped_stage(self) -> int:
        """The first stage whose graph loop has ended (it died, or the graph broke there); 0 if none has."""
        import ray

        loops = getattr(self._graph, "worker_task_refs", {})
        for k, h in enumerate(self.actors.handles):
            ref = loops.get(h)
            if ref is not None and ray.wait([ref], timeout=0)[0]:
                return k
        return 0

    def _take(self, k: int, m: int, source: dict[int, list[Any]]) -> HopResult:
        """Stage k's result of m's message (a compiled graph's result can be fetched once)."""
        refs = source[m]
        ref, refs[k] = refs[k], None
        if all(r is None for r in refs):
            del source[m]
        result: HopResult = get(ref, k, m, self.actors.names[k], fetch=_fetch)
        if result.part is not None:  # kept for the barrier's commit, which comes after every stage's report
            self._parts.setdefault(m, {})[k] = result.part
        return result

    # -- lifetime ---------------------------------------------------------------------------------------

    def abandon(self) -> None:
        self._held = None
        self._runs.clear()  # dropping a result ref releases its buffer in the graph
        self._snaps.clear()
        self._riding.clear()
        self._parts.clear()

    def reset(self) -> None:
        """Tear the graph down (a lost actor broke it, or its actors are being replaced); the next `begin`
        compiles a new one. A stage whose graph loop does not stop within TEARDOWN_S is killed, so that
        the replacement of dead actors (which follows) replaces it too."""
        self._teardown(kill=False)

    def close(self) -> None:
        """Before the actors are killed: tear the graph down, killing what does not stop in time."""
        self._teardown(kill=True)

    def _teardown(self, kill: bool) -> None:
        self.abandon()
        graph, self._graph = self._graph, None
        if graph is None:
            return
        import ray
        from ray.dag.context import DAGContext

        ctx = DAGContext.get_current()
        saved, ctx.teardown_timeout = ctx.teardown_timeout, TEARDOWN_S
        quiet = logging.getLogger("ray.dag.compiled_dag_node")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)  # a dead actor's loop cannot be cancelled: Ray logs a traceback per actor
        try:
            graph.teardown(kill_actors=kill)
        except Exception as e:  # noqa: BLE001 - a broken graph may fail to tear down; its actors are checked next
            logger.warning("compiled graph teardown: %s", e)
        finally:
            ctx.teardown_timeout = saved
            quiet.setLevel(level)
        if kill:
            return
        for actor, ref in getattr(graph, "worker_task_refs", {}).items():
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                logger.warning("a stage's compiled-graph loop did not stop within %gs: killing it", TEARDOWN_S)
                ray.kill(actor, no_restart=True)


def _fetch(ref: Any) -> Any:
    # A compiled graph's result without Ray's 10 s default: a stage step may take longer on a loaded machine.
    # A lost actor still ends the wait: Ray's graph monitor tears the graph down and the read fails.
    return ref.get(timeout=-1)


def _part(ref: Any, k: int, m: int, actor: str) -> Part | CheckpointError:
    """Stage k's part of the barrier after m, or why the store refused it (a lost stage still raises)."""
    try:
        part: Part = get(ref, k, m, actor)
        return part
    except CheckpointError as e:
        return e
