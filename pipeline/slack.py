"""A stage with slack gives way: it steps at SCHED_IDLE, so that the bottleneck keeps its core.

In a pipeline every stage but the slowest waits for work part of the time. Where the stages fill a
machine's cores (one core each), everything else that runs there (Ray's daemons, the driver, the machine's
own processes) wakes on some stage's core and preempts that stage; when it is the bottleneck's core, the
whole pipeline waits (the bench's "waiting for a core", 0.3-4.7 ms per micro-batch of a 70 ms step on the
2-core machine). Linux places a waking thread on an idle core first, and counts a core that runs only
SCHED_IDLE threads as idle (select_idle_sibling, sched_idle_cpu); a waiting stage's core is idle anyway.
So a stage that was busy less than LOW of the time over its last STEPS steps, on a core through more than
OWN of each step, runs its next steps as SCHED_IDLE: wake-ups go to its core, and the bottleneck's is left
alone. The stage still has its core whenever nothing else wants it. It steps at its normal priority again
once it is busy more than HIGH of the time (it has become the bottleneck), once its steps spend more than
1 - SHARED of their time off a core (the median), and at once after a step that giving way held back so far.

Only the step runs at SCHED_IDLE: the thread is back at SCHED_OTHER, at the niceness it had, for whatever
else it does (snapshots, restores, Ray's own work), and the threads those start do not inherit the policy.
A stage with more than one thread does not give way (its OpenMP team would stay behind), nor does one whose
thread an operator set to another policy, nor one whose run places more stages on its machine than the
machine has cores for it (`fits`): time-sharing a core, a stage at SCHED_IDLE only moves the waiting to
another stage.

Measured: `python -m pipeline.bench.slack`, S = 2 stages of the bench's network on the 2-core machine,
pairs of runs with and without (PERFLOG.md, M14).

Going back needs CAP_SYS_NICE (root has it, a container's root not always) or an RLIMIT_NICE of 20 - nice.
Where a process lacks it `possible()` is false and its stages never give way: a thread that could not come
back would starve once it became the bottleneck on a busy machine.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import statistics
import threading
from collections import deque
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

LOW, HIGH = 0.8, 0.9  # busy fraction below which a stage gives way, above which it takes its priority back
# ... and the fraction of a step's time it ran on a core: above OWN it had a core to itself; below SHARED
# other threads (other tenants, or what giving way left it) held it back
OWN, SHARED = 0.9, 0.7
STEPS = 9  # steps the fractions are the medians over: one pause of the driver's (a barrier) does not count


@functools.cache  # once per process
def possible() -> bool:
    """Whether a thread of this process can go to SCHED_IDLE and back (tried in a thread of its own)."""
    if not hasattr(os, "SCHED_IDLE"):  # not Linux
        return False
    ok: list[bool] = []

    def attempt() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            ok.append(True)
        except OSError as e:
            logger.info("stages with slack keep their priority: %s (going back needs CAP_SYS_NICE)", e)

    thread = threading.Thread(target=attempt, name="sched-idle-probe")
    thread.start()
    thread.join()
    return bool(ok)


def cores() -> int:
    """The cores this process may run on: its affinity, within its cgroup's CPU quota where one is set (a
    container's limit, which the affinity does not show)."""
    n = len(os.sched_getaffinity(0))
    for path in ("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"):  # cgroup v2, v1
        try:
            quota = Path(path).read_text().split()
            period = quota[1] if len(quota) > 1 else Path(path).with_name("cpu.cfs_period_us").read_text()
            if quota[0] not in ("max", "-1"):
                n = min(n, max(1, math.ceil(int(quota[0]) / int(period))))
        except (OSError, ValueError, IndexError):
            continue
    return n


def fits(stages: int) -> bool:
    """Whether stages may give way in this process: it can take its priority back, and the `stages` its run
    places on this machine (one thread each) have a core each. S = 4 on 2 cores measured 0.98x with giving
    way, the main job's 3 stages on 2 cores 0.97x and 0.88x (PERFLOG.md, M14)."""
    return possible() and stages <= cores()


class GiveWay:
    """One stage's policy: `record` each step, and run each step inside `with give_way:` (module docstring)."""

    def __init__(self) -> None:
        self._busy: deque[float] = deque(maxlen=STEPS)  # each step's time / the time since the last step ended
        self._ran: deque[float] = deque(maxlen=STEPS)  # each step's time on a core / its time
        self._last_end: float | None = None
        self.idle = False  # the next steps run at SCHED_IDLE
        self.stepped_idle = False  # the current (or the last) step ran at SCHED_IDLE
        self._off = False  # a switch failed: the policy is left alone from then on

    def record(self, start: float, end: float, cpu: float) -> None:
        """A step ran from `start` to `end` (seconds), `cpu` seconds of it on a core: decide the next steps'."""
        last, self._last_end = self._last_end, end
        if last is None or end <= last or end <= start:
            return
        self._busy.append((end - start) / (end - last))
        self._ran.append(cpu / (end - start))
        if self.idle and self._ran[-1] < SHARED:  # giving way held this step back: not the next one
            self.idle = False
        elif len(self._busy) == STEPS:
            busy, ran = statistics.median(self._busy), statistics.median(self._ran)
            if busy > HIGH or ran < SHARED:
                self.idle = False
            elif busy < LOW and ran > OWN:
                self.idle = True

    def __enter__(self) -> None:
        self.stepped_idle = self.idle and not self._off and os.sched_getscheduler(0) == os.SCHED_OTHER
        if self.stepped_idle:  # (a thread an operator set to another policy is left as it is)
            self._set(os.SCHED_IDLE)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self.stepped_idle:
            self._set(os.SCHED_OTHER)

    def _set(self, policy: int) -> None:
        try:
            os.sched_setscheduler(0, policy, os.sched_param(0))
        except OSError as e:  # the privilege was taken away since `possible`: stay at the normal priority
            logger.warning("a stage with slack stops giving way: %s", e)
            self._off, self.idle = True, False
