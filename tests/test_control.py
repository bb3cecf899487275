"""The gRPC control plane: a real server on loopback, bearer-token authentication, the three rpcs."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import grpc
import pytest

from pipeline.control import control_pb2 as pb
from pipeline.control.server import CONTROL_FILE, ControlClient, ControlHandlers, ControlServer
from pipeline.errors import ConfigError


@pytest.fixture()
def served(tmp_path: Path):
    calls: list[str] = []

    def status() -> pb.StatusReply:
        calls.append("status")
        return pb.StatusReply(run_dir=str(tmp_path), engine="ray", steps_done=7, steps_total=10,
                              layers=[pb.LayerStatus(layer=0, loss=1.5, spread=0.9)])

    def checkpoint() -> tuple[bool, str]:
        calls.append("checkpoint")
        return True, "after micro-batch 8"

    def stop() -> bool:
        calls.append("stop")
        return calls.count("stop") == 1

    server = ControlServer(tmp_path, ControlHandlers(status, checkpoint, stop)).start()
    yield server, calls
    server.stop()


def test_rpcs_reach_the_driver(served, tmp_path: Path) -> None:
    server, calls = served
    assert server.address.startswith("127.0.0.1:")
    client = ControlClient(tmp_path)
    reply = client.status()
    assert (reply.steps_done, reply.steps_total, reply.layers[0].loss) == (7, 10, 1.5)
    assert client.checkpoint().detail == "after micro-batch 8"
    assert client.stop().accepted and not client.stop().accepted
    assert calls == ["status", "checkpoint", "stop", "stop"]
    client.close()


def test_token_file_is_private_and_removed_on_stop(served, tmp_path: Path) -> None:
    server, _ = served
    path = tmp_path / CONTROL_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["address"] == server.address
    server.stop()
    assert not path.exists()
    with pytest.raises(ConfigError, match="the run is not running"):
        ControlClient(tmp_path)


@pytest.mark.parametrize("token", [None, "Bearer wrong"])
def test_calls_without_the_token_are_refused(served, token: str | None) -> None:
    server, calls = served
    channel = grpc.insecure_channel(server.address)
    status = channel.unary_unary("/lamina.control.v1.Control/Stop",
                                 request_serializer=pb.StopRequest.SerializeToString,
                                 response_deserializer=pb.StopReply.FromString)
    metadata = None if token is None else (("authorization", token),)
    with pytest.raises(grpc.RpcError) as err:
        status(pb.StopRequest(), metadata=metadata, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert calls == []
    channel.close()


def test_watch_streams_status_until_the_run_ends(served, tmp_path: Path) -> None:
    server, calls = served
    client = ControlClient(tmp_path)
    updates = client.watch(interval_s=0.1)
    first, second = next(updates), next(updates)
    assert first.steps_done == second.steps_done == 7 and calls.count("status") >= 2
    server.stop()  # the run ends: the stream closes instead of hanging
    assert all(u.steps_done == 7 for u in updates)
    client.close()


def test_watch_without_the_token_is_refused(served) -> None:
    server, calls = served
    channel = grpc.insecure_channel(server.address)
    watch = channel.unary_stream("/lamina.control.v1.Control/Watch",
                                 request_serializer=pb.WatchRequest.SerializeToString,
                                 response_deserializer=pb.StatusReply.FromString)
    with pytest.raises(grpc.RpcError) as err:
        next(watch(pb.WatchRequest(), metadata=(("authorization", "Bearer wrong"),), timeout=5))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert calls == []
    channel.close()


def test_a_training_run_answers_status_checkpoint_and_stop(tmp_path: Path) -> None:
    """`lamina train` serves the control plane: Status sees progress, Checkpoint and Stop take effect."""
    import os
    import subprocess
    import sys
    import time

    import numpy as np

    from pipeline.checkpoints import CheckpointStore

    data = tmp_path / "seq.npz"
    rng = np.random.default_rng(0)
    np.savez(data, frames=rng.integers(0, 256, (6, 8, 8, 8), dtype=np.uint8), labels=np.arange(6))
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "pipeline.cli", "train", "--engine", "sequential", "--data", f"npz:{data}",
            "--layers", "conv:4", "--size", "8", "--clips", "4", "--clip-len", "3", "--steps", "100000",
            "--checkpoint-every", "0", "--run-dir", str(run_dir)]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(args, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / CONTROL_FILE).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        client = ControlClient(run_dir)
        while client.status().steps_done < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        status = client.status()
        assert status.engine == "sequential" and status.steps_total == 100000 and status.steps_done >= 5
        assert [layer.layer for layer in status.layers] == [0] and status.microbatches_per_s > 0
        assert client.checkpoint().accepted
        store = CheckpointStore(str(run_dir / "checkpoints"))
        while (store.latest_complete() or 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        requested = store.latest_complete()
        assert requested is not None and requested > 0
        # `lamina control watch` follows the run and ends by itself when the run does.
        watcher = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "control", "--run-dir", str(run_dir),
                                    "watch", "--json", "--interval", "0.1"], cwd=root, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        assert watcher.stdout is not None
        first = json.loads(watcher.stdout.readline())
        assert client.stop().accepted
        client.close()
        out, err = proc.communicate(timeout=60)
        rest, werr = watcher.communicate(timeout=30)
    finally:
        proc.kill()
    assert watcher.returncode == 0, werr[-2000:]
    watched = [int(first["steps_done"]), *(int(json.loads(line)["steps_done"]) for line in rest.splitlines())]
    assert watched == sorted(watched) and watched[0] >= requested
    assert proc.returncode == 0, err[-2000:]
    assert "stopped after" in out and not (run_dir / CONTROL_FILE).exists()
    assert (store.latest_complete() or 0) >= requested
