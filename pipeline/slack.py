"""A stage with slack gives way: its stepping thread runs at SCHED_IDLE, so that the bottleneck keeps its core.

In a pipeline every stage but the slowest waits for work part of the time. Where the stages fill a
machine's cores (one core each), everything else that runs there (Ray's daemons, the driver, the machine's
own processes) wakes on some stage's core and preempts that stage; when it is the bottleneck's core, the
whole pipeline waits (the bench's "waiting for a core", 0.3-4.7 ms per micro-batch of a 70 ms step on the
2-core machine). Linux places a waking thread on an idle core first, and counts a core that runs only
SCHED_IDLE threads as idle (select_idle_sibling, sched_idle_cpu). So a stage that was busy less than LOW of
the time over its last STEPS steps, on a core of its own while it stepped, runs its stepping thread as
SCHED_IDLE: wake-ups go to its core, and the bottleneck's is left alone. The stage still has its core
whenever nothing else wants it. It goes back to SCHED_OTHER, at the niceness it had, once it is busy more
than HIGH of the time (it has become the bottleneck) or once other threads hold it back for more than
1 - SHARED of its steps. Where a run places more stepping threads on a machine than it has cores, its
stages there never give way (`fits`).

Measured: `python -m pipeline.bench.slack`, S = 2 stages of the bench's network on the 2-core machine,
pairs of runs with and without (PERFLOG.md, M14).

Going back needs a privilege Linux gives to root, to CAP_SYS_NICE or to an RLIMIT_NICE of 20 - nice.
Where a process lacks it `possible()` is false and its stages never give way: a thread that could not come
back would starve once it became the bottleneck on a busy machine.
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
import threading
from collections import deque

logger = logging.getLogger(__name__)

LOW, HIGH = 0.8, 0.9  # busy fraction below which a stage gives way, above which it takes its priority back
# ... and the fraction of its steps' time it ran on a core: above OWN it had a core to itself; a stage that
# other threads hold back (other tenants, or what giving way left it) below SHARED keeps or takes back its
# priority
OWN, SHARED = 0.9, 0.7
STEPS = 9  # steps the busy fraction is the median over: one pause of the driver's (a barrier) does not count


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


def fits(threads: int) -> bool:
    """Whether stages may give way in this process: it can take its priority back, and `threads` (the
    stepping threads its run places on this machine) have a core each. More threads than cores time-share
    them, and a stage at SCHED_IDLE there only moves the waiting to another stage: S = 4 on 2 cores measured
    0.98x, the main job's 3 stages on 2 cores 0.97x and 0.88x (PERFLOG.md, M14)."""
    return possible() and threads <= len(os.sched_getaffinity(0))


class GiveWay:
    """One stage's policy, applied to the thread that steps it (module docstring)."""

    def __init__(self) -> None:
        self._busy: deque[float] = deque(maxlen=STEPS)  # each step's time / the time since the last step ended
        self._ran: deque[float] = deque(maxlen=STEPS)  # each step's time on a core / its time
        self._last_end: float | None = None
        self.idle = False  # the stepping thread's policy is SCHED_IDLE

    def step(self, start: float, end: float, cpu: float) -> None:
        """A step ran from `start` to `end` (seconds) in the calling thread, `cpu` seconds of it on a core: set
        that thread's policy."""
        if self._last_end is not None and end > self._last_end:
            self._busy.append((end - start) / (end - self._last_end))
            self._ran.append(cpu / (end - start))
        self._last_end = end
        if len(self._busy) < STEPS:
            return
        busy, ran = statistics.median(self._busy), statistics.median(self._ran)
        policy = os.sched_getscheduler(0)
        want = (os.SCHED_OTHER if busy > HIGH or ran < SHARED else os.SCHED_IDLE if busy < LOW and ran > OWN
                else policy)
        self.idle = want == os.SCHED_IDLE
        if want != policy:
            os.sched_setscheduler(0, want, os.sched_param(0))
            logger.debug("busy %.2f of the time, on a core %.2f of its steps: stepping at %s", busy, ran,
                         "SCHED_IDLE" if want == os.SCHED_IDLE else "SCHED_OTHER")
