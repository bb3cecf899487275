"""Joining a Ray cluster, or starting one here, and failing fast when there is none.

`ray.init(address=...)` retries for minutes when nothing (or something else) answers at the address, and
does not notice Ctrl-C meanwhile. So the address is probed first, from Python, within --connect-timeout:
a TCP connect (refused at once when nothing listens), then one gRPC call that only a Ray GCS answers
(`NodeInfoGcsService/GetClusterId`: a GCS with token authentication refuses it as UNAUTHENTICATED, which is
still an answer; an HTTP server or a silent port gives none).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import grpc
import ray
from ray._private.services import canonicalize_bootstrap_address  # how ray.init itself resolves an address

from pipeline.errors import ConfigError, PlacementError

logger = logging.getLogger(__name__)

_GCS_PROBE = "/ray.rpc.NodeInfoGcsService/GetClusterId"
TOKEN_FILE = Path.home() / ".ray" / "auth_token"  # where Ray keeps the token of a local cluster


def connect(address: str | None, cpus: float = 1.0, timeout: float = 30.0, log: Path | None = None) -> None:
    """Join the Ray this process already has, the cluster at `address` / RAY_ADDRESS, or start one here.

    A local Ray gets at least `cpus` logical CPUs so that the stages' bundles fit, even when that is more
    than the machine's cores (the stages then time-share them; logged). With `log`, what Ray prints while
    it starts (its token banner, gRPC's fork notices, and the daemons it starts, for their lifetime) goes
    to that file instead of the terminal.
    """
    if ray.is_initialized():
        _check_same(address)
        return
    address = address or os.environ.get("RAY_ADDRESS")
    with _output_to(log):
        _connect(address, cpus, timeout)


def _check_same(address: str | None) -> None:
    """Refuse an --address that names another cluster than the one this process is connected to already
    (ray.init was called before: a notebook, a test, a program that imports lamina), rather than run there
    unasked. Told apart by the GCS port: the same cluster may be reached by another of its host's names."""
    if not address or address in ("auto", "local") or address.startswith("ray://"):
        return
    current = ray.get_runtime_context().gcs_address
    if address.rpartition(":")[2] != current.rpartition(":")[2]:
        raise ConfigError(f"--address {address}: this process is connected to the Ray cluster at {current} "
                          f"already (ray.init was called before); call ray.shutdown() first, or leave "
                          f"--address out to run on that cluster")


def _connect(address: str | None, cpus: float, timeout: float) -> None:
    try:
        if address:
            if address not in ("auto", "local") and not address.startswith("ray://"):
                probe(address, timeout)
            ctx = ray.init(address=address)
            logger.info("joined the Ray cluster at %s; dashboard %s", address, _url(ctx.dashboard_url))
            return
        cores = os.cpu_count() or 1
        num_cpus = max(cores, math.ceil(cpus))
        if num_cpus > cores:
            logger.warning("the stages reserve %g CPUs on a %d-core machine: they will time-share cores", cpus,
                           cores)
        # address="local": a Ray of this run's own, even when another one runs on this machine.
        ctx = ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")
        logger.info("started a local Ray (%d CPUs); dashboard %s (its API asks for the token in %s)", num_cpus,
                    _url(ctx.dashboard_url), TOKEN_FILE)
        _private(TOKEN_FILE)
    except (PlacementError, KeyboardInterrupt):
        raise
    except Exception as e:  # ray.init raises bare Exceptions too ("node timed out during startup", ...)
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise PlacementError(f"could not start or join {where}: {type(e).__name__}: {e}") from e


@contextmanager
def _output_to(path: Path | None) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C code and child processes too)
    to `path` while the block runs; lamina's own log records keep going to the terminal."""
    if path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    moved = _log_streams_to(terminal)
    try:
        with open(path, "ab") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        for handler, stream in moved:
            handler.setStream(stream)
        terminal.close()


def _log_streams_to(stream: TextIO) -> list[tuple[logging.StreamHandler, TextIO]]:
    """Point the root logger's stream handlers at `stream`; what they pointed at before."""
    moved = []
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            old = handler.setStream(stream)
            if old is not None:
                moved.append((handler, old))
    return moved


def probe(address: str, timeout: float) -> None:
    """Raise PlacementError, naming the address, unless a Ray GCS answers there within `timeout` seconds."""
    start = time.monotonic()
    try:
        target = canonicalize_bootstrap_address(address) or address
        host, _, port = target.rpartition(":")
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise PlacementError(f"no Ray cluster at {address}: {getattr(e, 'strerror', None) or e} "
                             f"(--address, RAY_ADDRESS)") from None
    channel = grpc.insecure_channel(target)
    try:
        left = max(0.1, timeout - (time.monotonic() - start))
        grpc.channel_ready_future(channel).result(timeout=left)
        channel.unary_unary(_GCS_PROBE)(b"", timeout=max(0.1, timeout - (time.monotonic() - start)))
    except grpc.FutureTimeoutError:
        raise PlacementError(f"{address} accepts connections but does not answer as a Ray cluster within "
                             f"{timeout:g}s (--connect-timeout)") from None
    except grpc.RpcError as e:
        if e.code() not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            raise PlacementError(f"{address} answers, but not as a Ray cluster ({e.code().name})") from None
    finally:
        channel.close()


def _private(path: Path) -> None:
    """Ray writes its token file readable by every user of the machine (0644); the token opens the cluster,
    so make it the owner's alone."""
    try:
        info = path.stat()
        if info.st_uid == os.getuid() and info.st_mode & 0o077:
            path.chmod(0o600)
            logger.info("%s was readable by other users: now 0600", path)
    except OSError:  # no token file (RAY_AUTH_TOKEN given), or not ours to change
        pass


def _url(dashboard: str | None) -> str:
    if not dashboard:
        return "off"
    return dashboard if dashboard.startswith("http") else f"http://{dashboard}"
