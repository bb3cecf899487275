"""The schedule as data: the driver's ordered actions for micro-batches [start, stop) through S stages.

Pure Python: no Ray, no torch. Every engine drives the same `Schedule` (the Ray engine over stage actors,
the in-process engines over one stage, the GPU check through the Ray engine), so the admission window,
the barriers and the drain are written once and tested here in milliseconds.

    kSm   Step(k, m)      hand micro-batch m to stage k (input: the source for k = 0, else stage k-1's output of m)
    kBm   Snapshot(k, m)  stage k writes its state as it is after m: queued right behind kSm on the same stage
    kWm   Wait(k, m)      the driver waits until stage k has finished m and takes its report
    Cm    Commit(m)       every stage's snapshot of m is written: checkpoint m + 1 is complete

[Note: channels]
The driver never touches an activation: Step(k, m) chains stage k-1's output of m into stage k's call, and
a stage runs one caller's calls in submission order, so every stage sees m, m+1, ... in order, as the
sequential loop does. The bounded channel between stage k and k+1 is an admission window of depth D: stage
k is handed micro-batch j only once stage k+1 has finished j - D - 1 (the top stage: once it has itself).
At most D outputs of stage k then wait for stage k+1, and a fast stage idles instead of filling memory:
backpressure.

The actions come in clocks. At clock c the driver first waits for stage k to finish c - k (k >= 1; stage
0's report of c - 1 is taken just before stage 1's of c - 1, which implies it), then hands stage k the
micro-batch those waits admitted, c + D - k (the top stage: c + D - S + 2, right behind stage S-2):

    S = 2, D = 2:   0S0 1S0 | 0S1 1S1 | 0S2 1S2 | 0W0 1W0 0S3 1S3 | 0W1 1W1 0S4 1S4 | ...

Every wait that admits a step comes before it, and the waits of one clock finish together when the stages
keep pace, so a fixed order of waits costs no throughput: a stage below the bottleneck is ahead of it, a
stage above it is starved by it either way. `simulate` runs a schedule against step durations; with stage
1 twice as slow as stage 0 and D = 2 it gives (one column per time unit):

    time ->    1   2   3   4   5   6   7   8   9
    stage 0    m0  m1  m2  m3  .   m4  .   m5  .     after m3 it waits: m2 and m3 (D of them) are queued
    stage 1        m0  m0  m1  m1  m2  m2  m3  m3    stage 1 sets the pace, never starved

With D = 1 the fast stage still overlaps the slow one; a larger D absorbs jitter and the driver's latency
in noticing a finished step, at the cost of D activations per boundary held in the object store. D = 0 is
the lock step of the in-process engine (one stage only): micro-batch m + 1 is handed out only after m's report was taken.

[Note: barrier checkpoints]
A checkpoint is a barrier after micro-batch m (as Flink does after Chandy-Lamport). Snapshot(k, m) is
emitted right behind Step(k, m), so stage k writes its state exactly as it is after m, while stage k - 1
already learns from m + 1: nobody stops. Commit(m) comes one clock after the top stage's Wait(S-1, m).

    stage 0   0S5 0B5 0S6 ...
    stage 1       1S5 1B5 1S6 ...
    stage 2           2S5 2B5 ...         C5 once every 2B5 is written: checkpoint 6 is complete

Barriers fall after every `every`-th micro-batch, after the micro-batch stage 0 is handed next when one is
requested, and after the last one; `initial` adds one before the first (the state the run starts from:
what a failure before the first periodic barrier restores). A stop request lowers the end to what stage 0
was handed: the others finish that much, a barrier follows the last of it, and the run ends.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Step:
    stage: int
    m: int

    def __str__(self) -> str:
        return f"{self.stage}S{self.m}"


@dataclass(frozen=True)
class Snapshot:
    stage: int
    m: int

    def __str__(self) -> str:
        return f"{self.stage}B{self.m}"


@dataclass(frozen=True)
class Wait:
    stage: int
    m: int

    def __str__(self) -> str:
        return f"{self.stage}W{self.m}"


@dataclass(frozen=True)
class Commit:
    m: int

    def __str__(self) -> str:
        return f"C{self.m}"


Action = Step | Snapshot | Wait | Commit


@dataclass
class Schedule:
    """The actions for micro-batches [start, stop) through `stages` stages with channel depth `depth`.

    Iterate it once; `request_checkpoint` and `request_stop` may be called between actions and change the
    actions that follow. `checkpoints` off: no barriers at all (a run without a store).
    """

    stages: int  # S, bottom to top
    depth: int  # D: outputs of stage k that may wait for stage k+1 ([Note: channels]); 0: lock step
    start: int  # first micro-batch
    stop: int  # one past the last micro-batch
    every: int = 0  # a barrier after every `every` micro-batches; 0: only on request and at the end
    checkpoints: bool = False  # take barriers at all
    initial: bool = False  # a barrier before the first micro-batch (after start - 1)
    stopped_at: int | None = field(default=None, init=False)  # set by request_stop: where the run ends

    def __post_init__(self) -> None:
        lock_step_ok = self.depth >= 1 or self.stages == 1  # D = 0 would wait for a step before handing it out
        if self.stages < 1 or self.depth < 0 or not lock_step_ok or self.every < 0 or not 0 <= self.start <= self.stop:
            raise ConfigError(f"schedule needs stages >= 1, depth >= 0 (>= 1 with several stages), every >= 0 "
                              f"and 0 <= start <= stop (got "
                              f"stages={self.stages}, depth={self.depth}, every={self.every}, "
                              f"start={self.start}, stop={self.stop})")
        self._limit = self.stop  # micro-batches below this are handed out
        self._handed = [self.start] * self.stages  # next micro-batch each stage gets
        self._barriers: set[int] = set()
        self._requested = False
        self._pending: deque[Action] = deque()  # snapshots a stop request owes stages that are done

    def request_checkpoint(self) -> None:
        """A barrier after the next micro-batch stage 0 is handed (cheap; safe between any two actions)."""
        self._requested = True

    def request_stop(self) -> bool:
        """Hand out nothing more: stage 0 stops where it is, the others finish what it was handed, a barrier
        follows. False when everything is handed out already (the run is ending anyway)."""
        if self._handed[0] >= self._limit:
            return False
        self._limit = self.stopped_at = self._handed[0]
        last = self._limit - 1
        if self.checkpoints and last >= self.start and last not in self._barriers:
            self._barriers.add(last)
            # Stages already handed `last` get their snapshot now (nothing else will be queued behind it);
            # the others get it behind their step, as usual.
            self._pending.extend(Snapshot(k, last) for k in range(self.stages) if self._handed[k] > last)
        return True

    @property
    def handed(self) -> tuple[int, ...]:
        """Per stage, the next micro-batch it will be handed (the ones below it are submitted)."""
        return tuple(self._handed)

    def __iter__(self) -> Iterator[Action]:
        s, d = self.stages, self.depth
        if self.initial and self.checkpoints and self.start < self.stop:
            self._barriers.add(self.start - 1)
            yield from (Snapshot(k, self.start - 1) for k in range(s))
            yield Commit(self.start - 1)
        c = self.start - d - 1  # no clock before this one hands out `start` (the first stage-0 step: c + d)
        while True:
            yield from self._take_pending()
            if c >= self._limit + s and not self._pending:  # the last Commit falls at clock limit - 1 + S
                return
            if c - s in self._barriers and self.start <= c - s < self._limit:
                yield Commit(c - s)
            waits = [(0, c - 1)] + [(k, c - k) for k in range(1, s)] if s > 1 else [(0, c)]
            for k, m in waits:
                if self.start <= m < self._limit:
                    yield from self._take_pending()
                    yield Wait(k, m)
            for k in range(s):
                j = c + d - k if k < s - 1 else c + d - s + 2
                if self.start <= j < self._limit:
                    assert j == self._handed[k], (k, j, self._handed)  # each stage gets m, m+1, ... in order
                    yield from self._take_pending()
                    yield from self._hand(k, j)
            c += 1

    def _hand(self, k: int, j: int) -> Iterator[Action]:
        if k == 0 and self.checkpoints and self._barrier_due(j):
            self._barriers.add(j)
        self._handed[k] = j + 1
        snapshot = j in self._barriers  # decided now: a stop requested while Step is out adds its own
        yield Step(k, j)
        if snapshot:
            yield Snapshot(k, j)

    def _barrier_due(self, m: int) -> bool:
        if self._requested:
            self._requested = False
            return True
        return m == self.stop - 1 or (self.every > 0 and (m + 1) % self.every == 0)

    def _take_pending(self) -> Iterator[Action]:
        while self._pending:
            yield self._pending.popleft()


def render(actions: Iterable[Action], per_line: int = 0) -> str:
    """Actions as `0S3 1S3 0W1 ...`; `per_line` > 0 breaks the line after that many."""
    words = [str(a) for a in actions]
    if per_line <= 0:
        return " ".join(words)
    return "\n".join(" ".join(words[i:i + per_line]) for i in range(0, len(words), per_line))


# -- simulation: what a schedule does to stages with given step times -------------------------------------


def simulate(schedule: Schedule, durations: Sequence[float]) -> dict[int, list[tuple[int, float, float]]]:
    """Run `schedule` against stages whose steps take `durations[k]` time units (snapshots and the driver
    take none): per stage, (m, start, end) of every step. A stage runs its calls in submission order, a
    step starts once its input exists, and the driver blocks at every Wait and Commit until it is done."""
    if len(durations) != schedule.stages:
        raise ValueError(f"need one duration per stage ({schedule.stages}), got {list(durations)}")
    now = 0.0  # the driver's clock
    free = [0.0] * schedule.stages  # when stage k has run everything submitted to it so far
    end: dict[tuple[int, int], float] = {}  # (k, m) -> when stage k finished step m
    snap: dict[tuple[int, int], float] = {}  # (k, m) -> when stage k wrote snapshot m
    runs: dict[int, list[tuple[int, float, float]]] = {k: [] for k in range(schedule.stages)}
    for a in schedule:
        if isinstance(a, Step):
            ready = max(now, free[a.stage], end.get((a.stage - 1, a.m), 0.0) if a.stage else 0.0)
            free[a.stage] = end[(a.stage, a.m)] = ready + durations[a.stage]
            runs[a.stage].append((a.m, ready, free[a.stage]))
        elif isinstance(a, Snapshot):
            free[a.stage] = snap[(a.stage, a.m)] = max(now, free[a.stage])
        elif isinstance(a, Wait):
            now = max(now, end[(a.stage, a.m)])
        else:
            now = max([now] + [t for (k, m), t in snap.items() if m == a.m])
    return runs


def timeline(runs: dict[int, list[tuple[int, float, float]]], cols: int = 0) -> str:
    """The ASCII timeline of [Note: channels]: one column per time unit (the first `cols`, else all), `mN`
    while a stage steps N, `.` while it idles after its first step."""
    cols = cols or round(max(e for steps in runs.values() for _, _, e in steps))
    lines = ["time ->   " + "".join(f"{t + 1:>4}" for t in range(cols))]
    for k, steps in runs.items():
        cells = [""] * cols
        for m, s, e in steps:
            for t in range(round(s), min(round(e), cols)):
                cells[t] = f"m{m}"
        first = min(round(s) for _, s, _ in steps) if steps else cols
        lines.append(f"stage {k}   " + "".join(f"{c or ('.' if t >= first else ''):>4}"
                                             for t, c in enumerate(cells)).rstrip())
    return "\n".join(lines)
