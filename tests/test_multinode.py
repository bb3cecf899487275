"""Where it runs beyond one embedded Ray: a real 2-node cluster on this machine (two raylets, two object
stores, token authentication on) with the stages placed by SPREAD and PACK, and (slow) `ray job submit` of
`lamina train` to a head started with `ray start --head`.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from ray._private.authentication_test_utils import reset_auth_token_state  # Ray's own test helper
from ray.cluster_utils import Cluster
from support import (
    Recorder,
    ensure_auth_token,
    ray_head,
    sequential,
    setup,
    start_ray,
    state_differences,
    tiny_config,
    tiny_npz,
)

from pipeline.engines.placement import StageActors
from pipeline.engines.ray_engine import RayPipeline
from pipeline.errors import ConfigError

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[Cluster]:
    """A head and a second node, two CPUs each: two 1-CPU stages fit on either node, so where they go is
    the placement strategy's choice."""
    if ray.is_initialized():
        ray.shutdown()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "token")  # every node and this driver: token authentication on
        env.delenv("RAY_ADDRESS", raising=False)
        ensure_auth_token()
        # The Cluster's head runs in this process, whose Ray config was read before RAY_AUTH_MODE was set:
        # re-read it (as ray.init does for a new local Ray), or this process would not send the token.
        reset_auth_token_state()
        cluster = _start_two_nodes()
        try:
            ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()
    reset_auth_token_state()  # back to the environment as it was


def _start_two_nodes() -> Cluster:
    tries: list[Cluster] = []

    def start() -> Cluster:
        tries.append(Cluster())
        tries[-1].add_node(num_cpus=2)  # the head
        tries[-1].add_node(num_cpus=2)
        tries[-1].wait_for_nodes()
        return tries[-1]

    return start_ray(start, undo=lambda: tries[-1].shutdown())


def test_spread_runs_the_two_stages_on_different_nodes(two_nodes: Cluster, tmp_path: Path) -> None:
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    # The two nodes share this machine's disk: a file:// store declares it (a plain path would be refused).
    cfg = tiny_config(tiny_npz(tmp_path), layers="conv:8,conv:8", placement="spread", steps=6, transport="auto",
                      run_dir=str(tmp_path / "tworun"), checkpoint_uri=f"file://{tmp_path}/shared")
    spec, sampler = setup(cfg)
    calls = Recorder()
    # Shared memory does not span nodes: asked for, shm is refused once the bundles are placed ...
    with pytest.raises(ConfigError, match="shm needs the driver and every stage on one node; this placement spans 2"):
        StageActors(dataclasses.replace(cfg, transport="shm"), spec).__enter__()

    with StageActors(cfg, spec) as actors:
        assert actors.transport.name == "object-store"  # ... and auto takes the object store
        placed = [info["node_id"] for info in actors.info]  # each actor's ray.get_runtime_context().get_node_id()
        pipe = RayPipeline(actors)
        pipe.train(sampler, 0, cfg.steps, calls)
        states = pipe.states()

    assert len(set(placed)) == 2 and set(placed) == nodes, placed
    assert calls.steps == list(range(cfg.steps))
    # Activations crossed from one node's object store to the other's; the result is still the loop's.
    assert state_differences(states, sequential(cfg, sampler)) == []


def test_pack_keeps_the_two_stages_on_one_node(two_nodes: Cluster, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_npz(tmp_path), layers="conv:8,conv:8", placement="pack", run_dir=str(tmp_path / "packrun"),
                      checkpoint_uri=f"file://{tmp_path}/shared")
    spec, _ = setup(cfg)
    # PACK packs onto as few nodes as *currently* fit: wait until the previous test's actors have given
    # their CPUs back, or a busy node makes PACK (rightly) split the bundles.
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.1)

    with StageActors(cfg, spec) as actors:
        placed = [info["node_id"] for info in actors.info]

    assert len(set(placed)) == 1, placed


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ray_job_submit_runs_lamina_train_on_a_head_started_with_ray_start(tmp_path: Path) -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # the CLI refuses a token-auth head without it
    env.pop("RAY_ADDRESS", None)
    ensure_auth_token()
    temp_dir = tempfile.mkdtemp(prefix="lamray-", dir="/tmp")  # short: Ray's socket paths live under it
    run_dir = tmp_path / "jobrun"
    train = ["python", "-m", "pipeline.cli", "train", "--data", tiny_npz(tmp_path), "--layers", "conv:8,conv:8",
             "--size", "16", "--clips", "4", "--clip-len", "3", "--steps", "5", "--run-dir", str(run_dir)]

    with ray_head(temp_dir, num_cpus=2, env=env) as address:
        job = subprocess.run(["ray", "job", "submit", f"--address={address}", f"--working-dir={REPO}", "--",
                              *train], check=False, env=env, capture_output=True, text=True, timeout=300)

    out = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in out, out[-4000:]
    assert "joined the Ray cluster" in out  # the job's driver used the cluster, not a Ray of its own
    assert (run_dir / "checkpoints" / "step-000005" / "COMPLETE").is_file()
