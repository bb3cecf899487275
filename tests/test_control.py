"""The gRPC control plane: a real server on loopback, bearer-token authentication, the three rpcs."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import grpc
import pytest

from pipeline import control_pb2 as pb
from pipeline.control import CONTROL_FILE, ControlClient, ControlHandlers, ControlServer


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
    with pytest.raises(FileNotFoundError, match="no control plane"):
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
