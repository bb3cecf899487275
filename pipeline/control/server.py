"""The driver's gRPC control plane (proto/control.proto): status (once, or watched), checkpoint on request,
graceful stop.

The server binds to loopback unless told otherwise, and every call must carry a bearer token: the driver
makes a fresh one per run and writes it, with the address, to RUN_DIR/control.json (mode 0600), so only
the run's owner can steer it. The handlers only read a status snapshot or set flags that the driver's loop
polls between micro-batches: no rpc ever touches a tensor or blocks the training loop.

    lamina control --run-dir DIR status | watch | checkpoint | stop
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from pipeline.control import control_pb2 as pb
from pipeline.control.auth import BearerAuth, write_private
from pipeline.control.requests import RunControl
from pipeline.errors import ConfigError

logger = logging.getLogger(__name__)

SERVICE = "lamina.control.v1.Control"
CONTROL_FILE = "control.json"
WATCHERS = 4  # Watch streams served at once


@dataclass
class ControlHandlers:
    """What the driver lets the control plane do; each callable must be cheap and thread-safe."""

    status: Callable[[], pb.StatusReply]
    checkpoint: Callable[[], tuple[bool, str]]  # -> (accepted, detail)
    stop: Callable[[], bool]  # -> accepted


def _method(fn: Callable[[Any], Any], request_type: Any, reply_type: Any) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        lambda request, context: fn(request), request_deserializer=request_type.FromString,
        response_serializer=reply_type.SerializeToString)


class ControlServer:
    """A gRPC server for one run; `start()` writes RUN_DIR/control.json, `stop()` removes it."""

    def __init__(self, run_dir: str | Path, handlers: ControlHandlers, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.token = secrets.token_urlsafe(32)
        self._stopping = threading.Event()  # ends every Watch stream when the run ends
        # A Watch holds a worker for as long as it streams: at most WATCHERS at once, and Status, Checkpoint
        # and Stop keep workers of their own.
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=WATCHERS + 2),
                                   interceptors=[BearerAuth(self.token)])
        watchers = threading.BoundedSemaphore(WATCHERS)
        checkpoint = handlers.checkpoint

        def do_checkpoint(_: pb.CheckpointRequest) -> pb.CheckpointReply:
            accepted, detail = checkpoint()
            return pb.CheckpointReply(accepted=accepted, detail=detail)

        def watch(request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[pb.StatusReply]:
            if not watchers.acquire(blocking=False):
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"at most {WATCHERS} Watch calls at once")
            try:
                interval = max(0.1, request.interval_s or 1.0)
                while context.is_active():
                    yield handlers.status()
                    if self._stopping.wait(interval):
                        return
            finally:
                watchers.release()

        self._server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
            "Status": _method(lambda _: handlers.status(), pb.StatusRequest, pb.StatusReply),
            "Checkpoint": _method(do_checkpoint, pb.CheckpointRequest, pb.CheckpointReply),
            "Stop": _method(lambda _: pb.StopReply(accepted=handlers.stop()), pb.StopRequest, pb.StopReply),
            "Watch": grpc.unary_stream_rpc_method_handler(watch, request_deserializer=pb.WatchRequest.FromString,
                                                          response_serializer=pb.StatusReply.SerializeToString),
        })])
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"control plane: cannot bind {host}:{port}")
        self.address = f"{host}:{self.port}"

    def start(self) -> ControlServer:
        self._server.start()
        path = self.run_dir / CONTROL_FILE
        write_private(path, json.dumps({"address": self.address, "token": self.token, "pid": os.getpid()}))
        logger.info("control plane on %s (token in %s)", self.address, path)
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.stop(grace=1.0).wait()
        (self.run_dir / CONTROL_FILE).unlink(missing_ok=True)


class ControlClient:
    """Calls a run's control plane, reading its address and token from RUN_DIR/control.json.

    A driver killed with SIGKILL leaves its control.json behind; the file names the driver's pid, so a
    stale one is recognised (the process is gone) instead of failing on a refused connection.
    """

    def __init__(self, run_dir: str | Path, timeout: float = 10.0) -> None:
        path = Path(run_dir) / CONTROL_FILE
        if not path.is_file():
            raise ConfigError(f"{run_dir}: the run is not running (no {CONTROL_FILE})")
        try:
            info = json.loads(path.read_text())
            address, token, pid = str(info["address"]), str(info["token"]), int(info.get("pid", 0))
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"{path}: not a control file ({e})") from None
        if pid and not _alive(pid):
            raise ConfigError(f"{run_dir}: the run is not running: its driver (pid {pid}) is gone and left "
                              f"{CONTROL_FILE} behind (killed?); `lamina train --resume {run_dir}` continues it")
        self._channel = grpc.insecure_channel(address)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self.timeout = timeout

    def _call(self, name: str, request: Any, reply_type: Any) -> Any:
        stub = self._channel.unary_unary(f"/{SERVICE}/{name}", request_serializer=type(request).SerializeToString,
                                         response_deserializer=reply_type.FromString)
        return stub(request, metadata=self._metadata, timeout=self.timeout)

    def status(self) -> pb.StatusReply:
        return self._call("Status", pb.StatusRequest(), pb.StatusReply)

    def checkpoint(self) -> pb.CheckpointReply:
        return self._call("Checkpoint", pb.CheckpointRequest(), pb.CheckpointReply)

    def stop(self) -> pb.StopReply:
        return self._call("Stop", pb.StopRequest(), pb.StopReply)

    def watch(self, interval_s: float = 1.0) -> Iterator[pb.StatusReply]:
        """StatusReply after StatusReply until the run ends (the stream then closes) or the caller stops."""
        stub = self._channel.unary_stream(f"/{SERVICE}/Watch", request_serializer=pb.WatchRequest.SerializeToString,
                                          response_deserializer=pb.StatusReply.FromString)
        return stub(pb.WatchRequest(interval_s=interval_s), metadata=self._metadata)

    def close(self) -> None:
        self._channel.close()


@contextmanager
def serving(run_dir: str | Path, control: RunControl, status: Callable[[], pb.StatusReply]) -> Iterator[None]:
    """Serve a run's control plane on loopback while the block runs: Checkpoint and Stop set `control`'s
    requests, Status answers from `status()`."""

    def checkpoint() -> tuple[bool, str]:
        control.request_checkpoint()
        return True, "a barrier checkpoint follows the next micro-batch handed out"

    def stop() -> bool:
        if control.stop_requested:
            return False
        control.request_stop()
        return True

    server = ControlServer(run_dir, ControlHandlers(status, checkpoint, stop)).start()
    try:
        yield
    finally:
        server.stop()


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this machine: the control plane binds to loopback)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, someone else's
        return True
    return True
