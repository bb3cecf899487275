"""Replicated stages: R data-parallel replicas of a stage learn what the sequential loop learns on the same
micro-batches (to float tolerance, every objective), stay identical to each other, run in a real Ray
pipeline and come back when one is killed; the replica counts --replicas gives, auto included.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import torch.multiprocessing as mp
from support import Recorder, sequential, setup, tiny_config, tiny_npz
from support import small_config as small

from pipeline.checkpoints import CheckpointStore
from pipeline.engines import placement
from pipeline.engines.balance import replica_counts
from pipeline.engines.placement import NAMESPACE, StageActors
from pipeline.engines.ray_engine import RayPipeline
from pipeline.errors import ConfigError
from pipeline.stage import Stage
from workers.layers import parse_blocks
from workers.learner import LearnerSpec
from workers.objectives import OBJECTIVES
from workers.replicas import ReplicaGroup, free_port, share

pytestmark = pytest.mark.timeout(240)

TOLERANCE = 1e-4  # weights after a few Adam steps (lr 1e-3): a tenth of one step; gradients, not steps, differ
GRAD_TOLERANCE = 1e-4  # of a tensor's largest gradient at the first step: a float32 sum in another order
# ... and at later steps, which take gradients at weights already apart: an element whose first gradient was
# rounding noise took an lr-sized Adam step (Adam scales every element to about lr) in its own direction in
# each run. Measured up to 1.5e-4 (slow-var), against at most 1e-5 at the first step.
LATER_GRAD_TOLERANCE = 1e-3
NOISE = 1e-6  # a parameter whose gradient stays below this gets rounding noise only


def _spec(objective: str) -> LearnerSpec:
    return LearnerSpec(blocks=tuple(parse_blocks("conv:8,conv:8")), in_shape=(1, 16, 16), objective=objective,
                       deltas=(0.5, 0.3), lr=1e-3, head=(32, 16), loss_grid=(2, 2), seed=0)


def _batches() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((4, 3, 1, 16, 16)).astype(np.float32) for _ in range(3)]


def _run(stage: Stage, batches: list[np.ndarray]) -> tuple[list[np.ndarray | None], list[list[np.ndarray]], list[np.ndarray]]:
    """Step `stage` on each batch: what it emitted, the gradient it stepped with at each step, its weights."""
    emitted, grads = [], []
    for m, x in enumerate(batches):
        emitted.append(stage.step(m, x)[0])
        grads.append([p.grad.numpy().copy() for lrn in stage.stack.learners for p in lrn.params])
    weights = [p.detach().numpy().copy() for lrn in stage.stack.learners for p in lrn.params]
    return emitted, grads, weights


def _replica(rank: int, size: int, address: str, results: mp.Queue) -> None:
    """One replica process: a two-layer stage stepping its share of each micro-batch, for every objective."""
    torch.set_num_threads(1)
    group = ReplicaGroup.join(address, rank, size, torch.device("cpu"))
    out = {}
    for objective in sorted(OBJECTIVES):
        stage = Stage(_spec(objective), 0, 2)
        stage.set_group(group)
        out[objective] = _run(stage, [share(x, rank, size) for x in _batches()])
    results.put((rank, out))


def test_two_replicas_learn_what_the_loop_learns_with_every_objective() -> None:
    torch.set_num_threads(1)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    address = f"127.0.0.1:{free_port('127.0.0.1')}"
    procs = [ctx.Process(target=_replica, args=(r, 2, address, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]

    for objective in sorted(OBJECTIVES):
        emitted, grads, weights = _run(Stage(_spec(objective), 0, 2), _batches())
        (out0, grads0, weights0), (_, _, weights1) = got[0][objective], got[1][objective]
        for a, b in zip(out0, emitted, strict=True):  # the gathered output is the whole micro-batch's
            np.testing.assert_allclose(a, b, atol=TOLERANCE, err_msg=objective)
        for step, (ours, want) in enumerate(zip(grads0, grads, strict=True)):  # the whole batch's gradient
            for i, (g, w) in enumerate(zip(ours, want, strict=True)):
                tol = GRAD_TOLERANCE if step == 0 else LATER_GRAD_TOLERANCE
                np.testing.assert_allclose(g, w, rtol=0, atol=tol * np.abs(w).max() + NOISE / 100,
                                           err_msg=f"{objective} step {step} param {i}")
        for i, (w0, w) in enumerate(zip(weights0, weights, strict=True)):
            # A weight the loss is (nearly) blind to (slow-var to the head's output bias: a shift of every
            # embedding) gets only rounding noise as gradient, which Adam scales up to lr-sized steps:
            # different noise, different steps. Its gradient was compared above; its value is not.
            felt = np.max([np.abs(g[i]) for g in grads], axis=0) > NOISE
            np.testing.assert_allclose(w0[felt], w[felt], atol=TOLERANCE, err_msg=f"{objective} param {i}")
        # The replicas apply the same reduced gradient: bit for bit the same weights.
        assert all(np.array_equal(a, b) for a, b in zip(weights0, weights1, strict=True)), objective


def test_replica_counts_per_stage_and_auto() -> None:
    assert replica_counts("1", 3, 4) == [1, 1, 1]
    assert replica_counts("2", 2, 4) == [2, 2]
    assert replica_counts("1,2,1", 3, 4) == [1, 2, 1]
    # auto: the spare devices to the stage with the largest step time per replica, while the clips split evenly
    assert replica_counts("auto", 3, 8, [1.0, 5.0, 2.0], slots=3) == [1, 1, 1]
    assert replica_counts("auto", 3, 8, [1.0, 5.0, 2.0], slots=5) == [1, 2, 2]  # 3 replicas would not split 8 clips
    assert replica_counts("auto", 3, 8, [1.0, 5.0, 2.0], slots=8) == [2, 4, 2]
    assert replica_counts("auto", 2, 6, [1.0, 9.0], slots=4) == [1, 3]  # the slowest stage takes both
    with pytest.raises(ConfigError, match="one per stage"):
        replica_counts("1,2", 3, 4)
    with pytest.raises(ConfigError, match="dividing --clips 4"):
        replica_counts("3", 2, 4)
    with pytest.raises(ConfigError, match="--replicas"):
        tiny_config("npz:x", replicas="3")  # 4 clips do not split 3 ways


def _follower(actors: StageActors, k: int) -> ray.actor.ActorHandle:
    return ray.get_actor(f"{actors.names[k]}-replica1", namespace=NAMESPACE)


@pytest.mark.parametrize("transport", ["object-store", "compiled-graph", "shm"])
def test_a_replicated_stage_in_the_ray_pipeline_equals_the_loop(ray_local: str, tmp_path: Path, transport: str) -> None:
    cfg = tiny_config(tiny_npz(tmp_path), layers="conv:8,conv:8", replicas="1,2", steps=6, transport=transport,
                      run_dir=str(tmp_path / "run"))
    spec, sampler = setup(cfg)
    with StageActors(cfg, spec) as actors:
        assert actors.replicas == [1, 2]
        pipe = RayPipeline(actors)
        calls = Recorder()
        pipe.train(sampler, 0, cfg.steps, calls)
        states = pipe.states()
        replica = ray.get(_follower(actors, 1).states.remote())

    assert calls.steps == list(range(cfg.steps))
    for ours, want in zip(states, sequential(cfg, sampler), strict=True):
        for name, w in want["modules"].items():
            torch.testing.assert_close(ours["modules"][name], w, atol=TOLERANCE, rtol=0)
    assert all(torch.equal(replica[0]["modules"][n], states[1]["modules"][n]) for n in replica[0]["modules"])


@pytest.mark.parametrize("transport", ["object-store", pytest.param("compiled-graph", marks=pytest.mark.slow), "shm"])
def test_a_killed_replica_is_replaced_and_the_run_ends_as_an_uninterrupted_one(
        ray_local: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, transport: str) -> None:
    monkeypatch.setattr(placement, "REPLICA_TIMEOUT_S", 10.0)  # a lost peer is usually seen at once (its socket closes)
    data = tiny_npz(tmp_path, size=8)

    def run(name: str, kill_after: int | None) -> tuple[list[dict], int]:
        cfg = small(data, tmp_path, layers="conv:4,conv:4", replicas="2,1", steps=10, transport=transport,
                    run_dir=str(tmp_path / name))
        spec, sampler = setup(cfg)
        store = CheckpointStore(str(tmp_path / name / "ck"), keep=cfg.keep_checkpoints)
        with StageActors(cfg, spec) as actors:
            def on_step(m: int) -> None:
                if m == kill_after:
                    os.kill(ray.get(_follower(actors, 0).info.remote())["pid"], signal.SIGKILL)
            pipe = RayPipeline(actors, store)
            pipe.train(sampler, 0, cfg.steps, Recorder(on_step))
            assert pipe.recovery is not None
            return pipe.states(), pipe.recovery.count

    killed, recoveries = run("killed", kill_after=4)
    whole, none = run("whole", kill_after=None)
    assert (recoveries, none) == (1, 0)
    for a, b in zip(killed, whole, strict=True):
        for name in a["modules"]:
            torch.testing.assert_close(a["modules"][name], b["modules"][name], atol=TOLERANCE, rtol=0)
