"""Requests to a running engine: a checkpoint now, or a graceful stop.

Set from a signal handler (SIGINT, SIGTERM, SIGUSR1), from the gRPC control plane's threads or from a test;
read by the engine between two actions of its schedule (pipeline/schedule.py). Plain flags: setting one is
safe anywhere, a signal handler included. Where the run ended is the engine's answer (EngineResult), not a
flag here.
"""

from __future__ import annotations


class RunControl:
    def __init__(self) -> None:
        self.checkpoint_requested = False  # take a barrier checkpoint as soon as possible
        self.stop_requested = False  # hand out nothing more, drain, write a final checkpoint

    def request_checkpoint(self) -> None:
        self.checkpoint_requested = True

    def request_stop(self) -> None:
        self.stop_requested = True

    def take_checkpoint_request(self) -> bool:
        """True once per request (the engine consumes it)."""
        requested, self.checkpoint_requested = self.checkpoint_requested, False
        return requested
