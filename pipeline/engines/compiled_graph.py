"""The compiled-graph transport (`--transport compiled-graph`): a Ray Compiled Graph over the stage actors,
behind the seam of pipeline/engines/transport.py.

[Note: compiled-graph recovery]
Barriers travel inside the graph ([Note: in-band barriers] in pipeline/engines/inband.py).
A lost actor breaks the whole graph (its channels die with it): every result in flight fails, the graph
is torn down, the dead actor is replaced in its bundle (pipeline/engines/placement.py), every stage restores
the last complete checkpoint ([Note: recovery]) and the graph is compiled again over the new set of actors
before the replay. A survivor whose graph loop has not stopped CANCEL_S + TEARDOWN_S after the teardown began
is killed and replaced too.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from pipeline.engines.actors import get
from pipeline.engines.inband import InBandTransport
from pipeline.errors import StageLost
from pipeline.stage import Hop, HopResult

if TYPE_CHECKING:
    from pipeline.engines.placement import StageActors

logger = logging.getLogger(__name__)

TEARDOWN_S = 5  # how long Ray's teardown waits for each graph loop to stop (then the driver kills what has not)
CANCEL_S = 30  # how long Ray's teardown waits for each stage to take its cancellation


class CompiledGraphTransport(InBandTransport):
    """A Ray Compiled Graph over the stage actors ([Note: compiled-graph recovery])."""

    name = "compiled-graph"

    def __init__(self, actors: StageActors) -> None:
        super().__init__(actors)
        self._graph: Any = None  # the compiled graph, over the actors it was compiled for
        self._runs: dict[int, list[Any]] = {}  # m -> each stage's result ref of m's step message
        self._snaps: dict[int, list[Any]] = {}  # m -> each stage's result ref of m's snapshot-only message
        self._dropped: list[list[Any]] = []  # results forgotten while the graph was up (`_forget`)
        self.compiles = 0  # graphs compiled so far: one, plus one per recovery
        self._cap = 0  # executions in flight at most (set when compiled)
        # [Note: compiled graph on GPUs] Stages that each own a GPU hand their outputs on device to device:
        # Ray's accelerator channels (NCCL) between the stage actors, set up when the graph is compiled and
        # again with every recompile after a loss. Stages sharing one GPU (a fraction each: NCCL refuses two
        # ranks on one device) and cpu stages use shared-memory channels, the output as numpy in host memory.
        self.on_device = actors.gpus >= 1 and len(actors) > 1

    def _opened(self) -> bool:
        return self._graph is not None

    def _open(self) -> None:
        from ray.dag import InputNode, MultiOutputNode

        handles, n = list(self.actors.handles), len(self.actors)
        with InputNode() as msg:
            outs = []
            node: Any = msg
            for k, h in enumerate(handles):
                if k + 1 < n:
                    node, out = h.relay.bind(node, self.on_device)
                    if self.on_device:  # the output, a tensor on stage k's GPU, goes to stage k + 1's over NCCL
                        node = node.with_tensor_transport("accelerator")
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

    def _send(self, msg: Hop) -> None:
        (self._runs if msg.step else self._snaps)[msg.m] = self._execute(msg)

    def _result(self, k: int, m: int, step: bool) -> HopResult:
        return self._take(k, m, self._runs if step else self._snaps)

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
        return result

    # -- lifetime ---------------------------------------------------------------------------------------

    def _forget(self) -> None:
        # Dropping a result ref releases its buffer in the graph, which raises (and Ray prints, unraisable)
        # once a lost stage has closed the channels: while a graph is up, the refs in flight are kept until
        # it is torn down (a failed run's are forgotten before the recovery tears the graph down).
        if self._graph is not None:
            self._dropped += [*self._runs.values(), *self._snaps.values()]
        else:
            self._dropped.clear()
        self._runs.clear()
        self._snaps.clear()

    def reset(self) -> None:
        """Tear the graph down (a lost actor broke it, or its actors are being replaced); the next `begin`
        compiles a new one. A stage whose graph loop does not stop within CANCEL_S + TEARDOWN_S is killed,
        so that the replacement of dead actors (which follows) replaces it too."""
        self._teardown(kill=False)

    def close(self) -> None:
        """Before the actors are killed: tear the graph down, killing what does not stop in time."""
        self._teardown(kill=True)

    def _teardown(self, kill: bool) -> None:
        graph, self._graph = self._graph, None
        if graph is None:
            self.abandon()
            return
        import ray
        from ray.dag.context import DAGContext

        ctx = DAGContext.get_current()
        saved, ctx.teardown_timeout = ctx.teardown_timeout, TEARDOWN_S
        quiet = logging.getLogger("ray.dag.compiled_dag_node")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)  # a dead actor's loop cannot be cancelled: Ray logs a traceback per actor
        # Ray's teardown, left alone, waits for a loop that does not stop without end (after its timeout it
        # waits again, unbounded, unless it kills the actors): it runs in a thread of its own, and a loop
        # still running after CANCEL_S + TEARDOWN_S has its actor killed, which ends that wait.
        tearing = threading.Thread(target=_teardown_graph, args=(graph, kill), name="lamina-graph-teardown",
                                   daemon=True)
        try:
            tearing.start()
            tearing.join(CANCEL_S + TEARDOWN_S)
            loops = {} if kill else getattr(graph, "worker_task_refs", {})  # with `kill`, Ray kills them itself
            for actor, ref in loops.items():
                if not ray.wait([ref], timeout=0)[0]:
                    logger.warning("a stage's compiled-graph loop did not stop within %gs: killing it",
                                   CANCEL_S + TEARDOWN_S)
                    ray.kill(actor, no_restart=True)
            tearing.join(CANCEL_S + TEARDOWN_S)
            if tearing.is_alive():
                logger.warning("the compiled graph's teardown has not ended; going on without it")
        finally:
            ctx.teardown_timeout = saved
            quiet.setLevel(level)
        self.abandon()  # the graph is down: its results in flight, and those forgotten before, can go (`_forget`)


def _teardown_graph(graph: Any, kill: bool) -> None:
    try:
        graph.teardown(kill_actors=kill)
    except Exception as e:  # noqa: BLE001 - a broken graph may fail to tear down; its actors are checked after
        logger.warning("compiled graph teardown: %s", e)


def _fetch(ref: Any) -> Any:
    # A compiled graph's result without Ray's 10 s default: a stage step may take longer on a loaded machine.
    # A lost actor still ends the wait: Ray's graph monitor tears the graph down and the read fails.
    return ref.get(timeout=-1)
