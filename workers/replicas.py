"""Replicas: one stage's layers run as R data-parallel copies, each on its own device, as one learner.

Each replica takes its share of the micro-batch's clips (R equal, contiguous shares), and the R together
apply the update the sequential loop applies to the whole micro-batch:

    shard r of x (B/R clips) -> blocks -> y_r, e_r                      each replica, its own share
    e = all_gather(e_1 .. e_R)  (B clips)  -> objective -> loss        every replica: the whole batch's loss
    loss.backward()              gradients reach this replica's weights through e_r only
    all_reduce(grads, SUM)       = the whole batch's gradient, on every replica -> the same Adam step
    y = all_gather(y_1 .. y_R)   the stage's output for the whole micro-batch (replica 0 emits it)

[Note: replicas equal the loop] The objectives couple the clips of a micro-batch (negatives are other clips,
variance and covariance are over the batch), so averaging per-shard losses would not be the loop's loss.
Instead every replica computes the loss of the whole gathered batch; the gather passes back to each replica
only the gradient of its own share, so the per-replica gradients sum to the gradient of the whole batch, and
an all-reduce SUM gives every replica that same gradient. The weights stay identical on every replica
(every rank receives the same reduced tensor) and equal the sequential loop's to float tolerance: only the
kernels' blocking over a smaller batch and the order of the gradient sum differ.

Compute, not Ray: the group is a torch.distributed process group (gloo on the cpu, NCCL on GPUs), one per
replica process, formed by whoever placed the replicas (pipeline/engines/actors.py).
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

TIMEOUT_S = 60.0  # how long a replica waits for the others in a collective before the group counts as broken


class ReplicaLost(RuntimeError):
    """A collective of the group failed or timed out: a replica of it is gone (or stuck)."""


def share(x: Any, rank: int, size: int) -> Any:
    """Replica `rank`'s clips of micro-batch x (B, ...; numpy or torch): the rank-th of `size` equal
    contiguous shares, a view."""
    if x.shape[0] % size:
        raise ValueError(f"{x.shape[0]} clips do not split into {size} equal replica shares")
    n = x.shape[0] // size
    return x[rank * n:(rank + 1) * n]


def free_port(host: str) -> int:
    """A port free on `host` now, for the group's rendezvous (the first replica listens on it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class ReplicaGroup:
    """This process's place in a stage's replica group: rank `rank` of `size`."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size

    @classmethod
    def join(cls, address: str, rank: int, size: int, device: torch.device,
             timeout_s: float = TIMEOUT_S) -> ReplicaGroup:
        """Form (or re-form) the group: every replica calls this with the same `address` ("host:port", rank
        0 listens there); it returns once all `size` have joined. A group this process was in is left first."""
        leave()
        host = address.rsplit(":", 1)[0]
        if host in ("127.0.0.1", "localhost"):
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # every replica on this node: gloo's own sockets on loopback too
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{address}", rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        return cls(rank, size)

    def gather(self, e: Tensor) -> Tensor:
        """Every replica's share concatenated in rank order (B, ...); the gradient flows back to this share only."""
        out: Tensor = _Gather.apply(e, self)
        return out

    def gather_output(self, y: Tensor) -> Tensor:
        """The stage's output for the whole micro-batch, from every replica's share (no gradient)."""
        return self._all_gather(y.detach().contiguous())

    def reduce_grads(self, params: Sequence[Tensor]) -> None:
        """Sum the gradients over the group, in place: one flat all-reduce for all of them."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._call(dist.all_reduce, flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def _all_gather(self, t: Tensor) -> Tensor:
        parts = [torch.empty_like(t) for _ in range(self.size)]
        self._call(dist.all_gather, parts, t)
        return torch.cat(parts)

    def _call(self, collective: Any, *args: Any, **kwargs: Any) -> None:
        try:
            collective(*args, **kwargs)
        except RuntimeError as e:  # gloo / NCCL: a peer closed its connection, or the timeout passed
            raise ReplicaLost(f"replica {self.rank} of {self.size}: {collective.__name__} failed: {e}") from e


class _Gather(torch.autograd.Function):
    """all_gather forward; backward: this replica's slice of the gradient of the (identical) whole-batch loss."""

    @staticmethod
    def forward(ctx: Any, e: Tensor, group: ReplicaGroup) -> Tensor:  # type: ignore[override]
        ctx.rank, ctx.rows = group.rank, e.shape[0]
        return group._all_gather(e.contiguous())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def leave() -> None:
    """Leave this process's replica group, if it is in one (a broken one too)."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except RuntimeError:  # a group whose peers are gone may fail to shut down cleanly; it is dropped anyway
            pass
