"""Steering a running training: requests (requests.py) and the gRPC control plane that sets them
(server.py; messages from proto/control.proto, generated into control_pb2.py); the bearer-token check and
token file every lamina gRPC endpoint shares (auth.py)."""

from pipeline.control.requests import RunControl

__all__ = ["RunControl"]
