"""--balance auto: the split of layers into stages by measured step time within --stage-memory-gb, and a
balanced pipeline that still equals the sequential loop bit for bit."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest
from support import Recorder, sequential, setup, state_differences, tiny_config, tiny_npz

from pipeline.config import TrainConfig
from pipeline.engines.balance import (
    GB,
    imbalance,
    measure_layers,
    partition_by_cost,
    stage_bytes,
    stage_ranges,
)
from pipeline.engines.ray_engine import run_ray
from pipeline.errors import ConfigError
from workers.learner import Learner

pytestmark = pytest.mark.timeout(180)


def brute_force(costs: list[float], stages: int, fits: Any = None) -> float:
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = list(itertools.pairwise([0, *cuts, n]))
        if fits is None or all(fits(a, b) for a, b in bounds):
            best = min(best, max(sum(costs[a:b]) for a, b in bounds))
    return best


@pytest.mark.parametrize("costs, stages", [([50, 35, 20, 6], 2), ([1, 1, 1, 1, 1, 1], 3), ([9, 1, 1, 1, 9], 3),
                                           ([3, 8, 2, 7, 1, 4, 6], 4), ([5], 1), ([0, 0, 4], 2)])
def test_the_split_minimises_the_slowest_stage(costs: list[float], stages: int) -> None:
    ranges = partition_by_cost(costs, stages)
    assert len(ranges) == stages and ranges[0][0] == 0 and ranges[-1][1] == len(costs)
    assert all(a < b for a, b in ranges) and all(r[1] == s[0] for r, s in itertools.pairwise(ranges))
    assert max(sum(costs[a:b]) for a, b in ranges) == brute_force(costs, stages)


@pytest.mark.parametrize("stages", [2, 3])
def test_the_split_is_the_fastest_of_those_that_fit(stages: int) -> None:
    costs, sizes = [3, 8, 2, 7, 1, 4, 6], [5, 1, 4, 4, 2, 6, 3]
    for cap in (9, 14, 16):
        fits = lambda a, b, cap=cap: sum(sizes[a:b]) <= cap
        if brute_force(costs, stages, fits) == float("inf"):
            with pytest.raises(ValueError, match="fits"):
                partition_by_cost(costs, stages, fits)
            continue
        ranges = partition_by_cost(costs, stages, fits)
        assert all(fits(a, b) for a, b in ranges)
        assert max(sum(costs[a:b]) for a, b in ranges) == brute_force(costs, stages, fits)
    assert brute_force(costs, 2, lambda a, b: sum(sizes[a:b]) <= 14) > brute_force(costs, 2)  # a cap that binds


def test_the_docstring_example() -> None:
    costs = [50, 35, 20, 6]
    assert partition_by_cost(costs, 2) == [(0, 1), (1, 4)]
    assert imbalance(costs, [(0, 2), (2, 4)]) == pytest.approx(85 / 55.5)
    assert imbalance(costs, [(0, 1), (1, 4)]) == pytest.approx(61 / 55.5)


def test_bad_requests_are_refused() -> None:
    with pytest.raises(ValueError, match="stages"):
        partition_by_cost([1, 2], 3)
    with pytest.raises(ValueError, match=">= 0"):
        partition_by_cost([1, -2], 2)
    with pytest.raises(ConfigError, match="--balance"):
        TrainConfig(balance="magic")
    with pytest.raises(ConfigError, match="--stage-memory-gb needs --balance auto"):
        TrainConfig(stage_memory_gb=4)
    with pytest.raises(ConfigError, match="--stage-memory-gb must be >= 0"):
        TrainConfig(balance="auto", stage_memory_gb=-1)


def test_even_is_todays_split_and_auto_keeps_the_stage_count(tmp_path_factory: pytest.TempPathFactory) -> None:
    cfg = tiny_config(tiny_npz(tmp_path_factory.mktemp("d")), layers="conv:4,conv:16,conv:4,mlp:8")
    spec, _ = setup(cfg)
    assert stage_ranges(4, 2, "even") == [(0, 2), (2, 4)]
    assert stage_ranges(4, 1, "auto", spec, 4, 3) == [(0, 1), (1, 2), (2, 3), (3, 4)]  # nothing to move
    layers = measure_layers(spec, 4, 3, steps=2)
    assert len(layers) == 4 and all(c.step_s > 0 for c in layers)
    ranges = stage_ranges(4, 2, "auto", spec, 4, 3)
    assert len(ranges) == 2 and ranges[0][0] == 0 and ranges[-1][1] == 4


def test_a_balanced_pipeline_equals_the_sequential_loop_bit_for_bit(ray_local: str,
                                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    # A heavy first layer, and a memory limit only the split [1] [2, 3, 4] keeps to (the test above): the
    # run's stages hold those layers, whatever the timing measurement says, and the result is the loop's.
    data = tiny_npz(tmp_path_factory.mktemp("d32"), size=32)
    cfg = tiny_config(data, layers="conv:32,conv:4,conv:4,mlp:8", size=32, steps=6, layers_per_stage=2,
                      balance="auto")
    spec, sampler = setup(cfg)
    cap = (stage_bytes(measure_layers(spec, cfg.clips, cfg.clip_len, steps=1)[0:1]) + 1000) / GB
    cfg = dataclasses.replace(cfg, stage_memory_gb=cap)
    calls = Recorder()
    piped = run_ray(cfg, spec, sampler, calls).states
    held = {r.stage: [layer.layer for layer in r.layers] for _, reports in calls.calls for r in reports}
    assert held == {0: [0], 1: [1, 2, 3]}, held
    assert state_differences(piped, sequential(cfg, sampler)) == []


def test_a_layer_s_memory_is_its_state_and_one_step_s_tensors(tmp_path_factory: pytest.TempPathFactory) -> None:
    cfg = tiny_config(tiny_npz(tmp_path_factory.mktemp("d32"), size=32), layers="conv:32,conv:4,conv:4,mlp:8", size=32)
    spec, _ = setup(cfg)
    small, large = measure_layers(spec, 4, 3, steps=1), measure_layers(spec, 8, 3, steps=1)
    for k, (c, c2) in enumerate(zip(small, large, strict=True)):
        learner = Learner(spec, k, k + 1)
        # Adam: each parameter, its gradient and two moments, in float32, and a 4-byte step count per tensor
        assert c.state_bytes == 4 * 4 * sum(p.numel() for p in learner.params) + 4 * len(learner.params)
        assert c2.state_bytes == c.state_bytes  # the state does not grow with the micro-batch
        assert 1.9 < c2.work_bytes / c.work_bytes < 2.5  # the working set does, about with the frames
    # layer 1 (32 channels at 32 x 32) holds the largest activations; its output alone is 12 frames of them
    assert small[0].work_bytes == max(c.work_bytes for c in small) > 12 * 32 * 32 * 32 * 4
    assert stage_bytes(small[1:4]) == sum(c.state_bytes for c in small[1:4]) + small[1].work_bytes


def test_the_memory_limit_decides_the_split(tmp_path_factory: pytest.TempPathFactory) -> None:
    cfg = tiny_config(tiny_npz(tmp_path_factory.mktemp("d32"), size=32), layers="conv:32,conv:4,conv:4,mlp:8", size=32)
    spec, _ = setup(cfg)
    layers = measure_layers(spec, 4, 3, steps=1)
    # Layer 1 alone fits, layer 1 with layer 2 does not: of the three splits into 2 stages, one remains.
    cap = (stage_bytes(layers[0:1]) + 1000) / GB
    assert stage_bytes(layers[0:2]) > cap * GB and stage_bytes(layers[1:4]) <= cap * GB
    assert stage_ranges(4, 2, "auto", spec, 4, 3, memory_gb=cap) == [(0, 1), (1, 4)]
    with pytest.raises(ConfigError, match=r"--stage-memory-gb .*layer 1: .*--layers-per-stage"):
        stage_ranges(4, 2, "auto", spec, 4, 3, memory_gb=stage_bytes(layers[0:1]) / 2 / GB)
    with pytest.raises(ConfigError, match="no split of the 4 layers into 1 stages fits"):
        stage_ranges(4, 4, "auto", spec, 4, 3, memory_gb=cap)  # one stage: even the only split is too big
