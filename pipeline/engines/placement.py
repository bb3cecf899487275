"""Placement: joining (or starting) a Ray, one placement-group bundle per stage, the named stage actors.

One bundle per stage, `{CPU: c, GPU: g}` with g = 1 where the cluster has GPUs (or --gpus-per-stage), PACK
by default, SPREAD on request. Each stage actor is named `lamina-<run id>-stage<k>` in
the `lamina` namespace, which is how the dashboard's Actors page and `ray list actors` show it; an actor
that replaces a lost one is named `...-stage<k>-r<generation>`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import secrets
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from typing_extensions import Self  # typing.Self from Python 3.11; typing_extensions comes with torch

from pipeline.config import TrainConfig
from pipeline.engines.actors import get, stage_actor_class
from pipeline.errors import PlacementError
from pipeline.stage import partition
from workers.learner import LearnerSpec

logger = logging.getLogger(__name__)

NAMESPACE = "lamina"  # Ray namespace of the stage actors: `ray list actors` / ray.get_actor(name, NAMESPACE)
PLACEMENT_TIMEOUT_S = 60.0  # how long to wait for the cluster to fit the stages before giving up
PING_TIMEOUT_S = 60.0  # how long a stage may take to answer whether it is alive (its queue drains first)


def connect(address: str | None, cpus: float = 1.0) -> None:
    """Join the Ray this process already has, the cluster at `address` / RAY_ADDRESS, or start one here.

    A local Ray gets at least `cpus` logical CPUs so that the stages' bundles fit, even when that is more
    than the machine's cores (the stages then time-share them; logged).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ctx = ray.init(address=address)
        logger.info("joined the Ray cluster at %s; dashboard %s", address, _url(ctx.dashboard_url))
        return
    cores = os.cpu_count() or 1
    num_cpus = max(cores, math.ceil(cpus))
    if num_cpus > cores:
        logger.warning("the stages reserve %g CPUs on a %d-core machine: they will time-share cores", cpus, cores)
    # address="local": a Ray of this run's own, even when another one runs on this machine.
    ctx = ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")
    logger.info("started a local Ray (%d CPUs); dashboard %s", num_cpus, _url(ctx.dashboard_url))


def _url(dashboard: str | None) -> str:
    if not dashboard:
        return "off"
    return dashboard if dashboard.startswith("http") else f"http://{dashboard}"


def make_run_id(run_dir: str) -> str:
    """Short id of a run: its directory's name (or the time) and 4 random hex digits, so that two runs on
    one cluster never collide on actor names."""
    base = os.path.basename(os.path.normpath(run_dir)) if run_dir else time.strftime("%Y%m%d-%H%M%S")
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '-', base)}-{secrets.token_hex(2)}"


class StageActors:
    """The placed, named stage actors of one run, bottom to top.

    Use as a context manager: entering places the actors, leaving kills them and frees the placement group,
    whatever happened in between.
    """

    def __init__(self, cfg: TrainConfig, spec: LearnerSpec) -> None:
        self.cfg, self.spec = cfg, spec
        self.ranges = partition(len(spec.blocks), cfg.layers_per_stage)
        self.run_id = make_run_id(cfg.run_dir)
        self.names = [f"lamina-{self.run_id}-stage{k}" for k in range(len(self.ranges))]
        self.handles: list[Any] = []  # ActorHandle of each stage
        self.info: list[dict[str, Any]] = []  # Stage.info() of each: node, device, layers, pid
        self.pg: PlacementGroup | None = None
        self.gpus = 0.0  # GPUs per stage (set by start)
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
        bundle = {"CPU": cfg.cpus_per_stage, **({"GPU": self.gpus} if self.gpus else {})}
        strategy = cfg.placement.upper()
        self.pg = placement_group([dict(bundle) for _ in range(n)], strategy=strategy, name=f"lamina-{self.run_id}")
        if not self.pg.wait(timeout_seconds=PLACEMENT_TIMEOUT_S):
            raise PlacementError(
                f"could not place {n} stage bundles {bundle} ({strategy}) within {PLACEMENT_TIMEOUT_S:g}s: "
                f"the cluster has {ray.cluster_resources()}, of which {ray.available_resources()} free. "
                f"Lower --cpus-per-stage, raise --layers-per-stage, or add nodes.")
        self.handles = [self._spawn(k) for k in range(n)]
        self.info = [get(a.info.remote(), k, None, self.names[k]) for k, a in enumerate(self.handles)]
        for i in self.info:
            logger.info("%s: layers %s on node %s (%s, %d thread(s))", i["name"], [k + 1 for k in i["layers"]],
                        i["node_id"][:8], i["device"], i["threads"])

    def _spawn(self, k: int) -> Any:
        """Start stage k's actor in its bundle."""
        assert self.pg is not None
        first, last = self.ranges[k]
        if self._generation:
            self.names[k] = f"lamina-{self.run_id}-stage{k}-r{self._generation}"
        return stage_actor_class().options(
            name=self.names[k], namespace=NAMESPACE, num_cpus=self.cfg.cpus_per_stage, num_gpus=self.gpus,
            # Ordered execution is what transparency rests on ([Note: channels] in pipeline/schedule.py): no
            # retries, one call at a time. No restarts either: a restarted actor would come back with its
            # initial state; the driver replaces it and restores a checkpoint instead ([Note: recovery]).
            max_restarts=0, max_task_retries=0, max_concurrency=1,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=k),
        ).remote(self.spec, first, last, k, self.run_id, self.names[k], max(1, int(self.cfg.cpus_per_stage)),
                 "cuda" if self.gpus else "cpu")

    def replace_dead(self) -> None:
        """Replace every stage actor that does not answer, in its own bundle."""
        dead = [k for k in range(len(self.handles)) if not self.alive(k)]
        if dead:
            self._generation += 1
        for k in dead:
            try:
                ray.kill(self.handles[k], no_restart=True)
            except RayError as e:
                logger.debug("kill: %s", e)
            self.handles[k] = self._spawn(k)
            self.info[k] = get(self.handles[k].info.remote(), k, None, self.names[k])
            logger.warning("stage %d replaced by %s (pid %d)", k, self.names[k], self.info[k]["pid"])

    def alive(self, k: int) -> bool:
        try:
            ray.get(self.handles[k].info.remote(), timeout=PING_TIMEOUT_S)
            return True
        except (RayError, GetTimeoutError):
            return False

    def close(self) -> None:
        """Kill every stage actor and free the placement group; safe to call twice."""
        for actor in self.handles:
            try:
                ray.kill(actor, no_restart=True)
            except RayError as e:  # already dead: nothing to free
                logger.debug("kill: %s", e)
        self.handles = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
