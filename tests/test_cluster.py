"""Checkpoints every node reaches ([Note: shared storage] in pipeline/storage.py), and a run on a real Ray
cluster end to end: `ray start --head` and a second node with a temp dir of its own, `lamina train` submitted
with `ray job submit --working-dir .`, its checkpoints in a store declared shared by a `file://` URI, its
named stage actors and gauges read back through Ray's state API and Prometheus endpoints, then the run
stopped, probed and resumed from that store, bit for bit the sequential loop's result.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest
from support import (
    ensure_auth_token,
    free_ports,
    lamina_gauges,
    reports,
    sequential,
    setup,
    state_differences,
    stop_processes_of,
    tiny_npz,
)

from pipeline import storage
from pipeline.checkpoints import CheckpointStore
from pipeline.config import TrainConfig
from pipeline.control.server import CONTROL_FILE, ControlClient
from pipeline.engines.placement import refuse_node_local_store
from pipeline.errors import ConfigError
from pipeline.evaluation.probe import probe
from pipeline.run import resume, train
from pipeline.rundir import RunDir, checkpoint_location
from pipeline.telemetry.metrics_log import MetricsLog, read_metrics

REPO = Path(__file__).resolve().parents[1]


# -- which store every node reaches ---------------------------------------------------------------------------


def test_a_plain_path_store_is_refused_when_the_run_spans_nodes_naming_store_and_nodes() -> None:
    nodes = {"10.0.0.5 (1a2b3c4d)": ["the driver"], "10.0.0.6 (5e6f7a8b)": ["stage 0", "stage 1"]}
    with pytest.raises(ConfigError) as refused:
        refuse_node_local_store("/data/ckpt", "--checkpoint-uri", nodes)
    message = str(refused.value)
    assert message.startswith("--checkpoint-uri /data/ckpt is a path on one node's disk, but this run spans 2 nodes")
    assert "10.0.0.5 (1a2b3c4d): the driver; 10.0.0.6 (5e6f7a8b): stage 0, stage 1" in message
    assert "file:///PATH" in message and "s3://" in message  # how to fix it
    with pytest.raises(ConfigError, match=r"^the checkpoint store runs/x/checkpoints \(under --run-dir\)"):
        refuse_node_local_store("runs/x/checkpoints", "--run-dir", nodes)
    for shared in ("s3://bucket/ckpt", "gs://bucket/ckpt", "file:///mnt/nfs/ckpt"):
        refuse_node_local_store(shared, "--checkpoint-uri", nodes)  # declared reachable from every node
    refuse_node_local_store("/data/ckpt", "--checkpoint-uri", {"10.0.0.5 (1a2b3c4d)": ["the driver", "stage 0"]})


def test_locations_join_inside_a_uri_and_before_its_options() -> None:
    assert storage.join("s3://b/runs/x?region=eu-west-1", "checkpoints") == "s3://b/runs/x/checkpoints?region=eu-west-1"
    assert storage.join("runs/x", "metrics") == os.path.join("runs/x", "metrics")
    cfg = TrainConfig(run_dir="gs://b/runs/x")
    assert checkpoint_location(cfg) == "gs://b/runs/x/checkpoints"
    assert checkpoint_location(dataclasses.replace(cfg, checkpoint_uri="file:///mnt/c")) == "file:///mnt/c"
    with pytest.raises(ConfigError, match="--run-dir: 'nope://x' is neither a path nor a URI"):
        RunDir("nope://x")


def test_a_run_directory_at_a_file_uri_holds_the_whole_run_and_resumes(tmp_path: Path) -> None:
    data = tiny_npz(tmp_path, size=8)
    uri = f"file://{tmp_path}/shared/run"
    cfg = TrainConfig(data=data, layers="conv:4,conv:4", size=8, clips=4, clip_len=3, steps=6, engine="sequential",
                      checkpoint_every=3, run_dir=uri)
    outcome = train(cfg, progress=False)
    assert outcome.path == uri  # what `--resume` and `probe` are told: the URI, so the store stays shared
    on_disk = tmp_path / "shared" / "run"
    assert {p.name for p in on_disk.iterdir()} >= {"config.json", "metrics", "checkpoints", "loss.png"}
    run = RunDir(uri)
    assert run.config() == cfg and run.read_metrics().num_rows == 6 * 2
    store = run.store(cfg)
    assert store.uri == f"{uri}/checkpoints" and store.complete() == [0, 3, 6]
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg, progress=False)

    # As if it had been killed after checkpoint 3: resumed through the URI, it ends where it ended.
    finished = store.load(6).learners
    store.fs.delete_dir(store.dir(6))
    assert resume(uri, progress=False).stopped_at is None
    assert store.latest_complete() == 6 and state_differences(store.load(6).learners, finished) == []
    assert run.read_metrics().column("step").to_pylist() == [m for m in range(6) for _ in range(2)]


@pytest.fixture
def object_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`obj://PATH` opens as a filesystem that is not local (as s3:// and gs:// are), kept under tmp_path/bucket:
    the run directory's object-storage code paths, without a network."""
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    real = storage.open_location

    def open_location(location: str) -> tuple[pafs.FileSystem, str]:
        if location.startswith("obj://"):
            return pafs.SubTreeFileSystem(str(bucket), pafs.LocalFileSystem()), location.removeprefix("obj://")
        return real(location)

    monkeypatch.setattr(storage, "open_location", open_location)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))  # where RunDir puts control.json
    return bucket


def test_a_run_directory_in_object_storage_keeps_config_metrics_and_plot_there(object_store: Path) -> None:
    run = RunDir("obj://runs/a")
    assert run.remote and not run.path.is_relative_to(object_store)  # the scratch directory for control.json
    cfg = TrainConfig(run_dir="obj://runs/a")
    run.create(cfg)
    assert run.exists() and run.config() == cfg and run.path.is_dir()
    log = MetricsLog(run.metrics, flush_s=1e9)
    for m in range(3):
        log.append(reports(m))
    log.flush()
    assert read_metrics("obj://runs/a/metrics").column("step").to_pylist() == [0, 0, 1, 1, 2, 2]
    assert run.plot_losses() == "obj://runs/a/loss.png"
    assert sorted(p.name for p in (object_store / "runs" / "a").iterdir()) == ["config.json", "loss.png", "metrics"]
    resumed = MetricsLog(run.metrics, restart=2, flush_s=1e9)
    resumed.append(reports(2, value=5.0))
    resumed.flush()
    assert run.read_metrics().column("loss").to_pylist() == [1.0] * 4 + [5.0] * 2


# -- a real cluster ------------------------------------------------------------------------------------------


@contextmanager
def two_nodes(env: dict[str, str]) -> Iterator[tuple[str, list[int]]]:
    """A head started with `ray start --head` and a second node started with `ray start --address`, each with
    a temp dir of its own, 2 CPUs each, token authentication on; yields the job API address and each node's
    Prometheus port. Stopped by process id, never with `ray stop` (which would stop every Ray here)."""
    head_tmp = tempfile.mkdtemp(prefix="lamh-", dir="/tmp")  # short: Ray's socket paths live under them
    node_tmp = tempfile.mkdtemp(prefix="lamn-", dir="/tmp")
    gcs, dashboard, client, agent, agent2, metrics, metrics2 = free_ports(7)
    try:
        for command in (
            ["ray", "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
             "--include-dashboard=true", f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
             f"--metrics-export-port={metrics}", "--num-cpus=2", f"--temp-dir={head_tmp}"],
            ["ray", "start", f"--address=127.0.0.1:{gcs}", f"--dashboard-agent-listen-port={agent2}",
             f"--metrics-export-port={metrics2}", "--num-cpus=2", f"--temp-dir={node_tmp}"],
        ):
            started = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=120)
            assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield f"http://127.0.0.1:{dashboard}", [metrics, metrics2]
    finally:
        stop_processes_of(node_tmp)
        stop_processes_of(head_tmp)


def submit(jobs: ExitStack, address: str, env: dict[str, str], *command: str) -> subprocess.Popen:
    """`ray job submit --working-dir .` of `command`; it streams the job's output and exits 0 once the job
    succeeded. Killed when `jobs` closes, if it still runs (a failed test leaves no submitter waiting)."""
    proc = subprocess.Popen(["ray", "job", "submit", f"--address={address}", f"--working-dir={REPO}", "--", *command],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    jobs.callback(proc.kill)
    return proc


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def control(run_dir: Path, job: subprocess.Popen) -> Iterator[ControlClient]:
    """The run's control plane (loopback, on the head: here) once its driver serves it."""
    wait_for(f"{run_dir / CONTROL_FILE}", lambda: (run_dir / CONTROL_FILE).exists() or job.poll() is not None)
    assert job.poll() is None, job.communicate()[0][-3000:]
    client = ControlClient(run_dir)
    try:
        yield client
    finally:
        client.close()


def stop_at(client: ControlClient, steps: int) -> None:
    """Ask the run for a graceful stop (drain, final checkpoint, exit 0) once it did `steps` micro-batches."""
    wait_for(f"{steps} micro-batches", lambda: client.status().steps_done >= steps)
    assert client.stop().accepted


def scrape(port: int) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        return [line for line in page.read().decode().splitlines() if line.startswith("ray_lamina_")]


def test_ray_job_submit_on_two_nodes_checkpoints_to_a_shared_uri_probes_and_resumes(tmp_path: Path) -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "token",  # every ray command, node and driver: token auth on
           "RAY_metrics_report_interval_ms": "1000"}  # gauges reach the endpoints within a second, not ten
    env.pop("RAY_ADDRESS", None)
    ensure_auth_token()
    data = tiny_npz(tmp_path)
    shared = f"file://{tmp_path}/shared/checkpoints"  # a directory every node has: declared so by file://
    run_dir = tmp_path / "run"  # config and metrics: the driver's, on the head
    cfg = TrainConfig(data=data, layers="conv:8,conv:8", size=16, clips=4, clip_len=3, steps=100000,
                      placement="spread", checkpoint_every=10, checkpoint_uri=shared, run_dir=str(run_dir))
    flags = ["--data", data, "--layers", cfg.layers, "--size", "16", "--clips", "4", "--clip-len", "3",
             "--placement", "spread"]
    train_cmd = ["python", "-m", "pipeline.cli", "train", *flags, "--steps", str(cfg.steps)]
    store = CheckpointStore(shared)
    with two_nodes(env) as (address, metrics_ports), ExitStack() as jobs:
        # A store on one node's disk (RUN_DIR/checkpoints, a plain path) is refused before any micro-batch.
        local = submit(jobs, address, env, *train_cmd, "--run-dir", str(tmp_path / "local-run"))
        job = submit(jobs, address, env, *train_cmd, "--checkpoint-every", "10", "--checkpoint-uri", shared,
                     "--run-dir", str(run_dir))
        with control(run_dir, job) as client:
            wait_for("the first micro-batch", lambda: client.status().steps_done >= 1)
            # The named stage actors, alive, one on each node (SPREAD), through the state API.
            listed = subprocess.run(["ray", "list", "actors", f"--address={address}", "--format=json",
                                     "--detail", "--filter", "ray_namespace=lamina", "--filter", "state=ALIVE"],
                                    check=False, env=env, capture_output=True, text=True, timeout=60)
            actors = {a["name"]: a for a in json.loads(listed.stdout)}
            names = [re.fullmatch(r"lamina-(run-[0-9a-f]{4})-stage\d", name) for name in actors]
            (run_id,) = {m[1] for m in names if m}
            assert set(actors) == {f"lamina-{run_id}-stage0", f"lamina-{run_id}-stage1"}, actors
            assert len({a["node_id"] for a in actors.values()}) == 2
            # Every gauge lamina sets, on the nodes' Prometheus endpoints, tagged with this run.
            wanted = set(lamina_gauges())

            def seen() -> bool:
                lines = [line for port in metrics_ports for line in scrape(port) if f'run="{run_id}"' in line]
                return {line.split("{", 1)[0] for line in lines} >= wanted
            wait_for(f"{sorted(wanted)} on the metrics endpoints", seen, timeout=30)
            stop_at(client, 25)
        out = job.communicate(timeout=120)[0]
        assert job.returncode == 0 and "succeeded" in out, out[-4000:]
        stopped = int(re.findall(r"stopped after (\d+) micro-batches", out)[-1])
        assert store.latest_complete() == stopped >= 25  # the final barrier, committed through the shared store

        refused = local.communicate(timeout=120)[0]
        assert local.returncode != 0, refused[-3000:]
        assert re.search(r"lamina train: error: the checkpoint store \S+local-run/checkpoints \(under --run-dir\) "
                         r"is a path on one node's disk, but this run spans 2 nodes", refused), refused[-3000:]

        # Probed from the shared store: the newest complete checkpoint, the one the stop wrote.
        assert probe(str(run_dir), fraction=0.5)["steps"] == stopped

        # Resumed from it by a new job, and stopped again further on.
        resumed = submit(jobs, address, env, "python", "-m", "pipeline.cli", "train", "--resume", str(run_dir))
        with control(run_dir, resumed) as client:
            stop_at(client, stopped + 15)
        out = resumed.communicate(timeout=120)[0]
        assert resumed.returncode == 0 and f"resuming {run_dir} at micro-batch {stopped}" in out, out[-4000:]
    final = store.load_latest()
    assert final is not None and final.step > stopped
    assert all(ledger.exactly_once(final.step) for ledger in final.ledgers)
    # Two jobs, two nodes, two restarts of the stages from a shared store: the sequential loop's weights.
    reference = dataclasses.replace(cfg, steps=final.step)
    assert state_differences(final.learners, sequential(reference, setup(reference)[1])) == []
