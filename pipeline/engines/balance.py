"""Balance: which consecutive layers each stage holds, by each layer's measured step time and memory.

A pipeline runs at the pace of its slowest stage, so S stages should split the layers into S runs whose
summed step times are as even as they can be (torchgpipe's balance-by-time). `--balance auto` measures each
layer's step (forward, local loss, backward, optimizer step, normalised output) alone, on the stage actors'
thread budget, for a few micro-batches of the run's shape, and `partition_by_cost` picks the contiguous
split that minimises the slowest stage among those whose every stage fits in `--stage-memory-gb` (a GPU's
memory, by default where the driver sees one). The number of stages stays what --layers-per-stage gives;
only the boundaries move. Which stage holds a layer changes nothing a layer computes (each keeps its own
learner and loss), so a balanced pipeline still equals the sequential loop bit for bit, and a checkpoint
regroups into any split (pipeline/engines/ray_engine.py `load`).

    costs (ms)   50  35  20   6        even split, S = 2:  [50 35] [20 6]   slowest 85, mean 55.5: 1.53
                                       balanced:           [50] [35 20 6]   slowest 61, mean 55.5: 1.10
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pipeline.allocator import keep_freed_memory
from workers.learner import LearnerSpec, LearnerStack

logger = logging.getLogger(__name__)

Range = tuple[int, int]
BALANCES = ("even", "auto")
GB = 1e9


@dataclass(frozen=True)
class LayerCost:
    """One layer's measured step. `state_bytes`: what the layer holds from step to step (parameters,
    gradients, optimizer state); `work_bytes`: what a step holds on top while it runs (its input, the
    activations kept for backward, its output). A stage runs its layers one after the other, so it needs
    their states together and the largest working set of one: `stage_bytes`."""

    step_s: float
    state_bytes: int
    work_bytes: int


def stage_bytes(layers: Sequence[LayerCost]) -> int:
    """The memory a stage holding `layers` needs while it steps."""
    return sum(c.state_bytes for c in layers) + max((c.work_bytes for c in layers), default=0)


def stage_ranges(n_layers: int, per_stage: int, balance: str, spec: LearnerSpec | None = None, clips: int = 0,
                 clip_len: int = 0, threads: int = 1, memory_gb: float = 0.0) -> list[Range]:
    """The stages' layer ranges: `even`, --layers-per-stage consecutive layers each (the last may hold fewer);
    `auto`, as many stages, with boundaries by each layer's measured step time, every stage within
    `memory_gb` (0: no limit; needs spec and the shape)."""
    from pipeline.errors import ConfigError
    from pipeline.stage import partition

    even = partition(n_layers, per_stage)
    if balance == "even" or (len(even) in (1, n_layers) and not memory_gb):
        return even
    if balance != "auto" or spec is None:
        raise ValueError(f"balance must be one of {list(BALANCES)} (got {balance!r}; auto needs the network)")
    layers = measure_layers(spec, clips, clip_len, threads)
    cap = memory_gb * GB
    try:
        ranges = partition_by_cost([c.step_s for c in layers], len(even),
                                   (lambda a, b: stage_bytes(layers[a:b]) <= cap) if cap else None)
    except ValueError as e:
        need = ", ".join(f"layer {k + 1}: {(c.state_bytes + c.work_bytes) / GB:.3g}"
                         for k, c in enumerate(layers))
        raise ConfigError(f"--stage-memory-gb {memory_gb:g}: {e}. Each layer alone needs (GB) {need}. Use more "
                          f"stages (a lower --layers-per-stage), fewer --clips per micro-batch, or a larger "
                          f"--stage-memory-gb") from None
    logger.info("--balance auto: stages hold layers %s, step %s ms, memory %s MB (limit: %s)",
                [[k + 1 for k in range(a, b)] for a, b in ranges],
                [round(1e3 * sum(c.step_s for c in layers[a:b]), 1) for a, b in ranges],
                [round(stage_bytes(layers[a:b]) / 1e6, 1) for a, b in ranges],
                f"{memory_gb:g} GB" if cap else "none")
    return ranges


def device_memory_gb() -> float:
    """The memory of this process's GPU in GB, or 0 (no limit) where it sees none: `--stage-memory-gb`'s
    default. A driver on a CPU-only head sees none; give the stages' GPU memory there by hand."""
    return torch.cuda.get_device_properties(0).total_memory / GB if torch.cuda.is_available() else 0.0


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


def partition_by_cost(costs: Sequence[float], stages: int,
                      fits: Callable[[int, int], bool] | None = None) -> list[Range]:
    """The split of layers [0, len(costs)) into `stages` non-empty consecutive ranges whose largest summed
    cost is smallest (ties: the earliest boundaries), among the splits whose every range [a, b) `fits`
    (a ValueError when none does). Exact: dynamic programming over prefix sums, O(S n^2)."""
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
                if fits is not None and not fits(i, j):
                    continue
                cost = max(best[s - 1][i], prefix[j] - prefix[i])
                if cost < best[s][j]:
                    best[s][j], cut[s][j] = cost, i
    if best[stages][n] == inf:
        raise ValueError(f"no split of the {n} layers into {stages} stages fits")
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
                   steps: int = 3) -> list[LayerCost]:
    """Each layer's step alone (median seconds) and memory, on `threads` torch threads, with inputs of the
    shape the layer sees in a run of `clips` x `clip_len` frames. Seconds per layer: a few steps each.
    Measured where this process runs: on its GPU when it sees one (synchronised; memory from the CUDA
    allocator's peak), else on its cpu (memory counted from the tensors: `_held_bytes`); the driver of a GPU
    cluster on a CPU-only head measures cpu times, whose proportions only approximate the GPUs', and the
    tensors' bytes, without CUDA's workspaces."""
    from workers.layers import normalise, output_shapes

    keep_freed_memory()  # as the stages run (pipeline/allocator.py)
    shapes = [spec.in_shape, *output_shapes(spec.blocks, spec.in_shape)]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        cuda = torch.cuda.is_available()
        out = []
        for k in range(len(spec.blocks)):
            base = torch.cuda.memory_allocated() if cuda else 0
            stack = LearnerStack.layer_local(spec, k, k + 1, "cuda" if cuda else "cpu")
            x = normalise(torch.randn(clips * clip_len, *shapes[k], generator=gen)).view(clips, clip_len, *shapes[k])
            x = x.to("cuda" if cuda else "cpu")
            times, y = [], None
            for i in range(warmup + steps):
                if cuda and i == warmup + steps - 1:
                    torch.cuda.reset_peak_memory_stats()
                y = None  # the last step's output is freed before the next: a stage holds one at a time
                t = time.perf_counter()
                y, _ = stack.step(x)
                if cuda:
                    torch.cuda.synchronize()  # the step's kernels are queued: time them, not their launch
                if i >= warmup:
                    times.append(time.perf_counter() - t)
            if cuda:  # held after the step beside x and y: parameters, gradients, optimizer state
                assert y is not None
                state = torch.cuda.memory_allocated() - base - x.nbytes - y.nbytes
                work = torch.cuda.max_memory_allocated() - base - state
            else:
                y = None
                y, state, work = _held_bytes(stack, x)  # one more step, counting the tensors it holds
            out.append(LayerCost(statistics.median(times), state, work))
        return out
    finally:
        torch.set_num_threads(saved)


def _held_bytes(stack: LearnerStack, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Step `stack` on x, counting the tensors it holds: (output, state bytes, working bytes). State: the
    parameters, gradients and optimizer state after the step; working: x, the output, and every tensor
    autograd keeps for backward that is not state (each storage once)."""
    kept: list[torch.Tensor] = []  # held to the end, so that no two of them share an address

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = stack.step(x)
    state: dict[int, int] = {}
    for learner in stack.learners:
        tensors = [*learner.params, *(p.grad for p in learner.params if p.grad is not None),
                   *(v for st in learner.optimizer.state.values() for v in st.values() if torch.is_tensor(v))]
        for t in tensors:
            state[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    work = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (*kept, x, y)}
    work = {ptr: n for ptr, n in work.items() if ptr not in state}
    return y, sum(state.values()), sum(work.values())
