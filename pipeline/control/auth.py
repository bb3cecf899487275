"""What every lamina gRPC endpoint shares: a bearer token checked before any handler runs, and the private
file that hands the token (with the address) to the run's owner."""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc


class BearerAuth(grpc.ServerInterceptor):
    """Refuses every call whose `authorization` metadata is not `Bearer <token>`, compared in constant time,
    with a handler of the call's own kind (a streaming call is refused before a single message is read)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        def deny(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny = {(False, False): grpc.unary_unary_rpc_method_handler(deny),
                      (True, False): grpc.stream_unary_rpc_method_handler(deny),
                      (False, True): grpc.unary_stream_rpc_method_handler(deny),
                      (True, True): grpc.stream_stream_rpc_method_handler(deny)}

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        handler = continuation(details)
        if hmac.compare_digest(str(sent).encode(), self._expected) or handler is None:
            return handler
        return self._deny[(handler.request_streaming, handler.response_streaming)]


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by its owner only (0600 from creation), atomically: a reader never
    sees it half written."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
