"""Engines: what trains a network on a source, driving the schedule (pipeline/schedule.py).

    base.py        the contract (Engine, EngineResult) and what every driver loop shares
    local.py       in one process: the sequential layer-local loop, and end-to-end backprop
    ray_engine.py  the asynchronous pipeline: one Ray actor per stage
    placement.py   joining Ray, one placement-group bundle per stage, the named stage actors
    recovery.py    which failures are retried, how stages come back, when a run gives up
    actors.py      the one place a stage becomes a Ray actor, and Ray's errors become lamina's
"""

from __future__ import annotations

from pipeline.engines.base import Engine, EngineResult, OnStep


def engine_for(name: str) -> Engine:
    """The engine a config names; the Ray engine is imported (and with it Ray) only when asked for."""
    if name in ("sequential", "e2e"):
        from pipeline.engines.local import run_local

        return run_local
    if name == "ray":
        from pipeline.engines.ray_engine import run_ray

        return run_ray
    raise ValueError(f"no engine {name!r}")


__all__ = ["Engine", "EngineResult", "OnStep", "engine_for"]
