"""Placement: one placement-group bundle per stage and the named stage actors in them.

One bundle per stage, `{CPU: c, GPU: g}` with g = 1 where the cluster has GPUs (or --gpus-per-stage), PACK
by default, SPREAD on request. Once the bundles are placed, and before any actor starts, a checkpoint store
that is a plain path is refused if the stages and the driver span more than one node ([Note: shared
storage] in pipeline/storage.py): each node would write to its own disk. Each stage actor is named
`lamina-<run id>-stage<k>` in the `lamina` namespace, which is how the dashboard's Actors page and
`ray list actors` show it; an actor that replaces a lost one is named `...-stage<k>-r<generation>`.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from typing_extensions import Self  # typing.Self from Python 3.11; typing_extensions comes with torch

from pipeline import storage
from pipeline.config import TrainConfig
from pipeline.engines.actors import NAMESPACE, PING_TIMEOUT_S, Replicas, get, stage_actor_class
from pipeline.engines.balance import device_memory_gb, measure_layers, replica_counts, stage_ranges
from pipeline.engines.transport import Transport, make_transport, resolve
from pipeline.errors import ConfigError, PlacementError, StageLost
from pipeline.rundir import checkpoint_location
from pipeline.stage import partition
from workers.learner import LearnerSpec
from workers.replicas import TIMEOUT_S

logger = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 60.0  # how long to wait for the cluster to fit the stages before giving up
REPLICA_TIMEOUT_S = TIMEOUT_S  # a replica group's collective waits this long for a lost replica before failing
STARTS = 4  # attempts to bring every stage actor up when some die while starting
START_TIMEOUT_S = 300.0  # how long a placed stage actor may take to answer first before it counts as lost


def make_run_id(run_dir: str) -> str:
    """Short id of a run: its directory's name (or the time) and 4 random hex digits, so that two runs on
    one cluster never collide on actor names."""
    base = os.path.basename(os.path.normpath(run_dir)) if run_dir else time.strftime("%Y%m%d-%H%M%S")
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '-', base)}-{secrets.token_hex(2)}"


def refuse_node_local_store(store: str, flag: str, nodes: dict[str, list[str]]) -> None:
    """ConfigError if checkpoint store `store` (set by `flag`) is a plain path and `nodes` (each node, named,
    with who runs there: the driver, stage k) are more than one: every node would write its checkpoint parts
    to its own disk, and the driver's commit of the first barrier would not find them."""
    if len(nodes) <= 1 or storage.is_shared(store):
        return
    where = "; ".join(f"{node}: {', '.join(who)}" for node, who in nodes.items())
    via = f"{flag} {store}" if flag == "--checkpoint-uri" else f"the checkpoint store {store} (under --run-dir)"
    raise ConfigError(
        f"{via} is a path on one node's disk, but this run spans {len(nodes)} nodes ({where}); each would "
        f"write checkpoints to its own disk and the first barrier would fail. Give a location every node "
        f"reaches: --checkpoint-uri (or --run-dir) s3://BUCKET/PATH, gs://..., hdfs://..., or file:///PATH for "
        f"a shared mount at PATH on every node (NFS, EFS, a shared volume)")


def cpus_needed(cfg: TrainConfig) -> float:
    """The CPUs the run's bundles reserve: one bundle per stage and per replica beyond the first (`auto`
    replicas take what is spare, so count one per stage)."""
    stages = len(partition(cfg.n_layers, cfg.layers_per_stage))
    counts = [1] * stages if cfg.replicas == "auto" else replica_counts(cfg.replicas, stages, cfg.clips)
    return sum(counts) * cfg.cpus_per_stage


class StageActors:
    """The placed, named stage actors of one run, bottom to top.

    Use as a context manager: entering places the actors, leaving kills them and frees the placement group,
    whatever happened in between.
    """

    def __init__(self, cfg: TrainConfig, spec: LearnerSpec) -> None:
        self.cfg, self.spec = cfg, spec
        self.ranges = stage_ranges(len(spec.blocks), cfg.layers_per_stage, cfg.balance, spec, cfg.clips,
                                   cfg.clip_len, max(1, int(cfg.cpus_per_stage)),
                                   cfg.stage_memory_gb or (device_memory_gb() if cfg.balance == "auto" else 0))
        self.run_id = make_run_id(cfg.run_dir)
        self.names = [f"lamina-{self.run_id}-stage{k}" for k in range(len(self.ranges))]
        self.handles: list[Any] = []  # ActorHandle of each stage
        self.info: list[dict[str, Any]] = []  # Stage.info() of each: node, device, layers, pid
        self.pg: PlacementGroup | None = None
        self.gpus = 0.0  # GPUs per stage (set by start)
        self.replicas = [1] * len(self.ranges)  # each stage's replica count (set by start)
        self.transport: Transport = make_transport(resolve(cfg.transport, "cpu"), self)  # set again by start
        self._generation = 0  # bumped per replacement round: replacement actors get fresh names

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.ranges)

    def start(self) -> None:
        """Reserve one bundle per stage, start the stage actors in them, wait until all are up."""
        cfg, n = self.cfg, len(self.ranges)
        if cfg.gpus_per_stage is not None:
            self.gpus = cfg.gpus_per_stage
        else:
            self.gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        self.replicas = self._replica_counts()
        bundle = {"CPU": cfg.cpus_per_stage, **({"GPU": self.gpus} if self.gpus else {})}
        strategy = cfg.placement.upper()
        total = sum(self.replicas)  # the stages' own bundles 0 .. n-1, then their other replicas'
        self.pg = placement_group([dict(bundle) for _ in range(total)], strategy=strategy, name=f"lamina-{self.run_id}")
        if not self.pg.wait(timeout_seconds=PLACEMENT_TIMEOUT_S):
            raise PlacementError(
                f"could not place {total} bundles {bundle} ({n} stages"
                f"{f', replicas {self.replicas}' if total > n else ''}; {strategy}) "
                f"within {PLACEMENT_TIMEOUT_S:g}s: the cluster has {ray.cluster_resources()}, of which "
                f"{ray.available_resources()} free. Lower --cpus-per-stage or --replicas, raise "
                f"--layers-per-stage, or add nodes.")
        nodes = self._roles()
        self._check_store(nodes)
        self.transport = make_transport(resolve(cfg.transport, "cuda" if self.gpus else "cpu", len(nodes)), self)
        self.handles = [self._spawn(k) for k in range(n)]
        self.info = [{} for _ in range(n)]
        for attempt in range(STARTS):
            try:  # an actor that dies while starting (killed, its node lost) is replaced
                if attempt:
                    self.replace_dead()
                self.info = [get(a.info.remote(), k, None, self.names[k], _first_answer)
                             for k, a in enumerate(self.handles)]
                break
            except StageLost as e:
                if attempt + 1 == STARTS:
                    raise
                logger.warning("%s while starting; replacing it", e)
        for i in self.info:
            logger.info("%s: layers %s on node %s (%s, %d thread(s)%s)", i["name"], [k + 1 for k in i["layers"]],
                        i["node_id"][:8], i["device"], i["threads"],
                        f", {i['replicas']} replicas" if i["replicas"] > 1 else "")

    def _replica_counts(self) -> list[int]:
        """Each stage's replica count (--replicas); `auto` measures the stages' step times and counts the
        cluster's devices: its GPUs, or its CPUs in --cpus-per-stage bundles."""
        cfg, n = self.cfg, len(self.ranges)
        if cfg.replicas != "auto":
            return replica_counts(cfg.replicas, n, cfg.clips)
        resources = ray.cluster_resources()
        slots = int(resources.get("GPU", 0) // self.gpus) if self.gpus else int(resources.get("CPU", 0) // cfg.cpus_per_stage)
        costs = [c.step_s for c in measure_layers(self.spec, cfg.clips, cfg.clip_len, max(1, int(cfg.cpus_per_stage)))]
        counts = replica_counts("auto", n, cfg.clips, [sum(costs[a:b]) for a, b in self.ranges], slots)
        logger.info("--replicas auto: %s over %d devices (stage step times %s ms)", counts, slots,
                    [round(1000 * sum(costs[a:b]), 1) for a, b in self.ranges])
        return counts

    def _followers(self, k: int) -> Replicas | None:
        """Where stage k's replicas beyond the first go: the bundles after the stages' own."""
        if self.replicas[k] == 1:
            return None
        assert self.pg is not None
        first = len(self.ranges) + sum(r - 1 for r in self.replicas[:k])
        return Replicas(self.pg, tuple(range(first, first + self.replicas[k] - 1)), self.cfg.cpus_per_stage,
                        self.gpus, REPLICA_TIMEOUT_S)

    def _roles(self) -> dict[str, list[str]]:
        """Each node of the placed bundles and the driver, with who runs there ("the driver", "stage k", ...)."""
        assert self.pg is not None
        bundles = placement_group_table(self.pg)["bundles_to_node_id"]
        roles: dict[str, list[str]] = {ray.get_runtime_context().get_node_id(): ["the driver"]}
        for k in range(len(self.ranges)):
            roles.setdefault(bundles[k], []).append(f"stage {k}")
            followers = self._followers(k)
            for r, b in enumerate(followers.bundles if followers else (), 1):
                roles.setdefault(bundles[b], []).append(f"stage {k} replica {r}")
        return roles

    def _check_store(self, roles: dict[str, list[str]]) -> None:
        """Refuse a node-local checkpoint store when the placed bundles and the driver span several nodes."""
        ips = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
        flag = "--checkpoint-uri" if self.cfg.checkpoint_uri else "--run-dir"
        refuse_node_local_store(checkpoint_location(self.cfg), flag,
                                {f"{ips.get(node, '?')} ({node[:8]})": who for node, who in roles.items()})

    def _spawn(self, k: int) -> Any:
        """Start stage k's actor in its bundle."""
        assert self.pg is not None
        first, last = self.ranges[k]
        if self._generation:
            self.names[k] = f"lamina-{self.run_id}-stage{k}-r{self._generation}"
        return stage_actor_class(self.transport.name).options(
            name=self.names[k], namespace=NAMESPACE, num_cpus=self.cfg.cpus_per_stage, num_gpus=self.gpus,
            # Ordered execution is what transparency rests on ([Note: channels] in pipeline/schedule.py): no
            # retries, one call at a time. No restarts either: a restarted actor would come back with its
            # initial state; the driver replaces it and restores a checkpoint instead ([Note: recovery]).
            max_restarts=0, max_task_retries=0, max_concurrency=1,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=k),
        ).remote(self.spec, first, last, k, self.run_id, self.names[k], max(1, int(self.cfg.cpus_per_stage)),
                 "cuda" if self.gpus else "cpu", self.cfg.yield_slack == "on", self._followers(k))

    def replace_dead(self) -> None:
        """Replace every stage actor that does not answer, in its own bundle. The transport is reset first: a
        compiled graph over the old set of actors is torn down, and compiled again over the new one. The
        stages are asked and their replacements started all at once, then waited for: a recovery that
        replaces every stage (Direct Transport's) takes one actor start, not one per stage."""
        self.transport.reset()
        dead = self._dead()
        if dead:
            self._generation += 1
        for k in dead:
            try:
                ray.kill(self.handles[k], no_restart=True)
            except RayError as e:
                logger.debug("kill: %s", e)
            self.handles[k] = self._spawn(k)
        answers = {k: self.handles[k].info.remote() for k in dead}
        for k in dead:
            self.info[k] = get(answers[k], k, None, self.names[k], _first_answer)
            logger.warning("stage %d replaced by %s (pid %d)", k, self.names[k], self.info[k]["pid"])

    def _dead(self) -> list[int]:
        """The stages whose actor does not answer within PING_TIMEOUT_S (all asked at once)."""
        answers = [h.info.remote() for h in self.handles]
        deadline = time.monotonic() + PING_TIMEOUT_S
        dead = []
        for k, ref in enumerate(answers):
            try:
                ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except (RayError, GetTimeoutError):
                dead.append(k)
        return dead

    def close(self) -> None:
        """Kill every stage actor and free the placement group; safe to call twice."""
        self.transport.close()
        for actor in self.handles:
            try:
                ray.kill(actor, no_restart=True)
            except RayError as e:  # already dead: nothing to free
                logger.debug("kill: %s", e)
        self.handles = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None


def _first_answer(ref: Any) -> Any:
    """A new stage actor's first answer; one that never starts (its bundle's node gone and no room
    elsewhere) is a lost stage after START_TIMEOUT_S, to be replaced or reported, not a driver that waits
    forever."""
    return ray.get(ref, timeout=START_TIMEOUT_S)
