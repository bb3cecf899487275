"""Cores of its own for each stage's stepping thread (`--pin-cpus`).

Ray reserves CPUs as counts, not as cores: every process on a node may run on every core, and the kernel
moves threads between them. A stage that steps all the time then waits whenever something else wakes on
its core: the other stage, the driver, Ray's daemons. On the bench's 2-core machine the bottleneck stage's
thread waited 3.4 % of the wall time for a core. Pinned, the other stage no longer lands there and most of
the rest moves into that stage's idle gaps: side by side, the pipeline ran a median 1.02x faster pinned, and
what still wakes on the pinned core is Ray's daemons and the machine's own (PERFLOG.md, M13).

So where a node's stages (and their replicas) fit in its cores, `plan` gives each a block of
`--cpus-per-stage` cores of its own, and the stage pins the thread that steps to it (`pin_thread`; the
OpenMP threads that thread starts inherit it). Nothing else is pinned: the stages' other threads, the
driver and Ray's daemons run wherever a core is free. A node whose stages do not fit is left alone (the
kernel balances better than a fixed, oversubscribed assignment).

`auto` pins on a Ray of one node (the run's own machine): a cluster's nodes may run other jobs' processes
that a run cannot see, so there `on` asks for it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

logger = logging.getLogger(__name__)


def available() -> tuple[int, ...]:
    """The cores this process may run on (its cpuset, not the machine's count); empty where the system
    cannot tell (not Linux): nothing is pinned there."""
    if not hasattr(os, "sched_getaffinity"):
        return ()
    return tuple(sorted(os.sched_getaffinity(0)))


def plan(processes: Sequence[tuple[str, int]], cores: dict[str, tuple[int, ...]]) -> list[tuple[int, ...] | None]:
    """Cores for each stepping process, given as (node, threads): on each node, consecutive blocks of
    `threads` of that node's `cores`, in the order given; None for every process of a node where they do
    not all fit."""
    need: dict[str, int] = {}
    for node, threads in processes:
        need[node] = need.get(node, 0) + threads
    taken: dict[str, int] = {}
    out: list[tuple[int, ...] | None] = []
    for node, threads in processes:
        here = cores.get(node, ())
        if need[node] > len(here):
            out.append(None)
            continue
        first = taken.get(node, 0)
        out.append(here[first:first + threads])
        taken[node] = first + threads
    for node, n in need.items():
        if n > len(cores.get(node, ())):
            logger.info("--pin-cpus: node %s not pinned: its stages need %d cores, %d available", node[:8], n,
                        len(cores.get(node, ())))
    return out


def pin_thread(cores: Sequence[int]) -> None:
    """Run the calling thread (and the threads it starts from now on) on `cores` only."""
    os.sched_setaffinity(0, cores)  # 0: the calling thread (Linux: affinity is per thread)
