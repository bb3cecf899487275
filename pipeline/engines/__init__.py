"""Engines: what trains a network on a source, driving the schedule (pipeline/schedule.py).

    base.py        the contract (Engine, EngineResult) and what every driver loop shares
    local.py       in one process: the sequential layer-local loop, and end-to-end backprop
    ray_engine.py  the asynchronous pipeline: one Ray actor per stage
    cluster.py     joining a Ray cluster (failing fast when there is none), or starting one here
    placement.py   one placement-group bundle per stage (and replica), the named stage actors
    transport.py   how activations travel stage to stage: object-store references, Ray Direct Transport,
                   a compiled graph (compiled_graph.py) or lamina's shared-memory channels (shm.py over
                   channel.py); the last two carry barriers in their message stream (inband.py)
    recovery.py    which failures are retried, how stages come back, when a run gives up
    actors.py      the one place a stage becomes a Ray actor, and Ray's errors become lamina's
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import TrainConfig
from pipeline.engines.base import Engine, EngineResult, OnStep


def prepare(cfg: TrainConfig, log: Path | None = None) -> None:
    """What an engine needs done before a run installs its signal handlers and starts its gRPC server: the
    Ray engine joins or starts Ray here, because Ray sets signal handlers of its own and forks daemons
    (a fork while gRPC threads run can abort the child: the dashboard was seen dying so). `log`: where
    Ray's start-up output goes instead of the terminal."""
    if cfg.engine == "ray":
        from pipeline.engines.cluster import connect
        from pipeline.engines.placement import cpus_needed

        connect(cfg.address, cpus_needed(cfg), cfg.connect_timeout, log)


def engine_for(name: str) -> Engine:
    """The engine a config names; the Ray engine is imported (and with it Ray) only when asked for."""
    if name in ("sequential", "e2e"):
        from pipeline.engines.local import run_local

        return run_local
    if name == "ray":
        from pipeline.engines.ray_engine import run_ray

        return run_ray
    raise ValueError(f"no engine {name!r}")


__all__ = ["Engine", "EngineResult", "OnStep", "engine_for", "prepare"]
