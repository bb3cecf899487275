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
driver and Ray's daemons run wherever a core is free. A node whose stages do not fit is left alone: pinned,
more stages than cores could not be moved by the kernel to whichever core is free.

`auto` pins on a Ray of one node (the run's own machine): a cluster's nodes may run other jobs' processes
that a run cannot see, so there `on` asks for it. Two runs on one machine (two drivers, each with a local
Ray or on one Ray) would otherwise both pin their first stage to core 0: the driver plans its own node's
cores around those another live driver holds, as recorded in the node's `Registry`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

REGISTRY_DIR = Path(tempfile.gettempdir()) / f"lamina-cores-{os.getuid()}"  # where a node's `Registry` lives


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


class Registry:
    """This node's record of the cores lamina's runs pinned their stages to: a file per run, named by its
    driver's pid and the run's id and holding its cores (all it pinned: stage actors come and go within a
    run), removed when the run's actors are (`release`). A driver that is gone holds none, whatever it left:
    the next reader removes its files."""

    def __init__(self, where: str | Path | None = None) -> None:
        self.dir = Path(where or REGISTRY_DIR)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Read, plan and claim under this, so that two drivers starting at once do not take the same cores."""
        self.dir.mkdir(mode=0o700, exist_ok=True)
        with open(self.dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def held(self) -> set[int]:
        """The cores other live drivers' stages are pinned to."""
        out: set[int] = set()
        for f in self.dir.glob("[0-9]*-*"):
            pid = int(f.name.split("-", 1)[0])
            if pid == os.getpid():
                continue
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                f.unlink(missing_ok=True)
                continue
            except PermissionError:
                pass  # alive, another user's
            out |= _cores_in(f)
        return out

    def claim(self, run: str, cores: Iterable[int]) -> None:
        """Add `cores` to run `run`'s (a run of this driver)."""
        mine = self._file(run)
        held = _cores_in(mine) | set(cores)
        mine.write_text(",".join(map(str, sorted(held))))

    def release(self, run: str) -> None:
        """Run `run`'s stages are gone: its cores are free for others."""
        self._file(run).unlink(missing_ok=True)

    def _file(self, run: str) -> Path:
        return self.dir / f"{os.getpid()}-{run}"


def _cores_in(f: Path) -> set[int]:
    try:
        return {int(c) for c in f.read_text().split(",") if c}
    except (OSError, ValueError):  # gone meanwhile, or half written by a driver that died
        return set()
