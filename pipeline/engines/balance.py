"""Balance: which consecutive layers each stage holds, by each layer's measured step time.

A pipeline runs at the pace of its slowest stage, so S stages should split the layers into S runs whose
summed step times are as even as they can be (torchgpipe's balance-by-time). `--balance auto` measures each
layer's step (forward, local loss, backward, optimizer step, normalised output) alone, on the stage actors'
thread budget, for a few micro-batches of the run's shape, and `partition_by_cost` picks the contiguous
split that minimises the slowest stage. The number of stages stays what --layers-per-stage gives; only the
boundaries move. Which stage holds a layer changes nothing a layer computes (each keeps its own learner and
loss), so a balanced pipeline still equals the sequential loop bit for bit, and a checkpoint regroups into
any split (pipeline/engines/ray_engine.py `load`).

    costs (ms)   50  35  20   6        even split, S = 2:  [50 35] [20 6]   slowest 85, mean 55.5: 1.53
                                       balanced:           [50] [35 20 6]   slowest 61, mean 55.5: 1.10
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from workers.learner import LearnerSpec

Range = tuple[int, int]
BALANCES = ("even", "auto")


def stage_ranges(n_layers: int, per_stage: int, balance: str, spec: LearnerSpec | None = None, clips: int = 0,
                 clip_len: int = 0, threads: int = 1) -> list[Range]:
    """The stages' layer ranges: `even`, --layers-per-stage consecutive layers each (the last may hold fewer);
    `auto`, as many stages, with boundaries by each layer's measured step time (needs spec and the shape)."""
    from pipeline.stage import partition

    even = partition(n_layers, per_stage)
    if balance == "even" or len(even) in (1, n_layers):
        return even
    if balance != "auto" or spec is None:
        raise ValueError(f"balance must be one of {list(BALANCES)} (got {balance!r}; auto needs the network)")
    return partition_by_cost(measure_layers(spec, clips, clip_len, threads), len(even))


def replica_counts(text: str, stages: int, clips: int, costs: Sequence[float] = (), slots: int = 0) -> list[int]:
    """Each stage's replica count from `--replicas text`: one count for every stage, one per stage, or
    `auto`: the devices beyond one per stage (`slots` in all) go one at a time to the stage whose step time
    per replica (`costs`: each stage's measured step time) is largest, as long as the clips still split into
    equal shares. A pipeline runs at the pace of its slowest stage; a replica divides that stage's time."""
    from pipeline.errors import ConfigError

    if text != "auto":
        counts = [int(v) for v in text.split(",")]
        if len(counts) == 1:
            counts *= stages
        if len(counts) != stages or any(r < 1 or clips % r for r in counts):
            raise ConfigError(f"--replicas {text}: needs one count, or one per stage ({stages}), each >= 1 and "
                              f"dividing --clips {clips}")
        return counts
    counts = [1] * stages
    spare = slots - stages
    while spare > 0:
        grow = [(costs[k] / counts[k], k, r) for k in range(stages)
                for r in [next((r for r in range(counts[k] + 1, clips + 1) if clips % r == 0), 0)]
                if r and r - counts[k] <= spare]
        if not grow:
            break
        _, k, r = max(grow)
        spare -= r - counts[k]
        counts[k] = r
    return counts


def partition_by_cost(costs: Sequence[float], stages: int) -> list[Range]:
    """The split of layers [0, len(costs)) into `stages` non-empty consecutive ranges whose largest summed
    cost is smallest (ties: the earliest boundaries). Exact: dynamic programming over prefix sums, O(S n^2)."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"need 1 <= stages <= layers (got {stages} stages for {n} layers)")
    if any(c < 0 for c in costs):
        raise ValueError(f"costs must be >= 0 (got {list(costs)})")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][j]: the smallest slowest-stage cost of layers [0, j) in s stages; cut[s][j]: where the last starts
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for j in range(s, n + 1):
            for i in range(s - 1, j):
                cost = max(best[s - 1][i], prefix[j] - prefix[i])
                if cost < best[s][j]:
                    best[s][j], cut[s][j] = cost, i
    ranges, j = [], n
    for s in range(stages, 0, -1):
        i = cut[s][j]
        ranges.append((i, j))
        j = i
    return ranges[::-1]


def imbalance(costs: Sequence[float], ranges: Sequence[Range]) -> float:
    """Slowest stage / mean stage of `ranges` under `costs`: 1.0 is perfectly even."""
    per = [sum(costs[a:b]) for a, b in ranges]
    return max(per) / statistics.mean(per) if sum(per) > 0 else 1.0


def measure_layers(spec: LearnerSpec, clips: int, clip_len: int, threads: int = 1, warmup: int = 1,
                   steps: int = 3) -> list[float]:
    """Each layer's step time alone (median seconds), on `threads` torch threads, with inputs of the shape
    the layer sees in a run of `clips` x `clip_len` frames. Seconds per layer: a few steps each. Measured
    where this process runs: on its GPU when it sees one (synchronised), else on its cpu; the driver of a
    GPU cluster on a CPU-only head measures cpu times, whose proportions only approximate the GPUs'."""
    from workers.layers import normalise, output_shapes
    from workers.learner import LearnerStack

    shapes = [spec.in_shape, *output_shapes(spec.blocks, spec.in_shape)]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        out = []
        for k in range(len(spec.blocks)):
            stack = LearnerStack.layer_local(spec, k, k + 1, device)
            x = normalise(torch.randn(clips * clip_len, *shapes[k], generator=gen)).view(clips, clip_len, *shapes[k])
            x = x.to(device)
            times = []
            for i in range(warmup + steps):
                t = time.perf_counter()
                stack.step(x)
                if device == "cuda":
                    torch.cuda.synchronize()  # the step's kernels are queued: time them, not their launch
                if i >= warmup:
                    times.append(time.perf_counter() - t)
            out.append(statistics.median(times))
        return out
    finally:
        torch.set_num_threads(saved)
