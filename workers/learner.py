"""Where a layer learns: the learner's step, the only place in lamina that calls `backward()`.

A `Learner` owns one or more consecutive blocks, an optional projection head, a local objective and
its own optimizer. Its `step` is the whole of layer-local learning:

    x (detached, from the layer below)
      -> forward the blocks -> y                      one forward, reused for learning and for emitting
      -> pool -> head -> e (B, T, D) -> objective -> loss
      -> backward -> optimizer step                   gradients stay inside this learner
      -> emit normalise(y).detach()                   [Note: the detach boundary]

[Note: the detach boundary] The emitted tensor is cut from this learner's graph, so the next learner's
loss can never reach these parameters: no gradient crosses a layer. It is also the output of the same
forward the learner just learned from (computed with the weights *before* the step), which is what makes
a pipelined run perform exactly the computations of the sequential loop ([Note: channels] in
pipeline/schedule.py).

The end-to-end baseline is the same class holding *all* blocks: gradients then flow through every block,
and the objective sits on the top one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from workers.layers import BlockSpec, Head, build_blocks, normalise, output_shapes, pool_features, pooled_size
from workers.objectives import get_objective
from workers.replicas import ReplicaGroup

Into = Callable[[tuple[int, ...], torch.dtype], Tensor]  # (shape, dtype) -> a contiguous tensor to write into


@dataclass(frozen=True)
class LearnerSpec:
    """What every learner of a network shares; built from the run config by the driver."""

    blocks: tuple[BlockSpec, ...]  # the whole network, bottom to top
    in_shape: tuple[int, int, int]  # one frame: (C, H, W)
    objective: str  # name in workers.objectives.OBJECTIVES
    deltas: tuple[float, ...]  # per block tolerance delta_k
    lr: float  # Adam learning rate of every learner
    head: tuple[int, int] | None  # (hidden, out) of the per-layer projection head, or None: loss on pooled y
    loss_grid: tuple[int, ...]  # per block: pool conv maps to g x g before the head / loss
    seed: int  # initialisation seed; block k is initialised from (seed, k) wherever it is built
    norm: str = "rms"  # how outputs are scaled between blocks, a name in workers.layers.NORMS


class Learner:
    """Blocks `first..last-1` of the network with their own head, objective and optimizer."""

    def __init__(self, spec: LearnerSpec, first: int, last: int, device: str | torch.device = "cpu") -> None:
        if not 0 <= first < last <= len(spec.blocks):
            raise ValueError(f"learner block range [{first}, {last}) outside the {len(spec.blocks)} blocks")
        self.spec, self.first, self.last = spec, first, last
        self.device = torch.device(device)
        self.objective = get_objective(spec.objective)
        self.delta = spec.deltas[last - 1]
        self.grid = spec.loss_grid[last - 1]
        shapes = [spec.in_shape, *output_shapes(spec.blocks, spec.in_shape)]
        self.blocks = nn.ModuleList()
        for k in range(first, last):
            # Seeding per block keeps the init independent of how blocks are grouped into stages.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec.seed * 1009 + k)
                shape = shapes[k]
                in_shape = (shape[0], shape[1], shape[2]) if len(shape) == 3 else (shape[0], 1, 1)
                self.blocks.append(build_blocks((spec.blocks[k],), in_shape)[0])
        feat = pooled_size(shapes[last], self.grid)
        self.head: nn.Module | None = None
        if spec.head is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec.seed * 1009 + 500 + last - 1)
                self.head = Head(feat, *spec.head)
        self.blocks.to(self.device)
        params = list(self.blocks.parameters())
        if self.head is not None:
            self.head.to(self.device)
            params += list(self.head.parameters())
        self.params = params
        self.optimizer = torch.optim.Adam(params, lr=spec.lr)
        self.steps = 0  # optimizer steps taken
        self.group: ReplicaGroup | None = None  # set when this learner is one of a stage's replicas

    def forward(self, x: Tensor) -> list[Tensor]:
        """Outputs of every block for frames (N, ...), each normalised as the next block will see it."""
        outs = []
        for block in self.blocks:
            x = normalise(block(x), self.spec.norm)
            outs.append(x)
        return outs

    def step(self, x: Tensor, into: Into | None = None) -> tuple[Tensor, dict[str, float]]:
        """Learn from one micro-batch x (B, T, ...) and emit this learner's output (B, T, ...). In a replica
        group x is this replica's share of the micro-batch's clips, and so is the output. `into`, when
        given, supplies the memory the output is written into ([Note: emitting into a slot])."""
        assert not x.requires_grad, "a learner's input must arrive detached"
        b, t = x.shape[:2]
        y = self._top(x.flatten(0, 1))
        e = pool_features(y, self.grid)
        if self.head is not None:
            e = self.head(e)
        e = e.view(b, t, -1)
        if self.group is not None:  # [Note: replicas equal the loop] in workers/replicas.py
            e = self.group.gather(e)
        result = self.objective(e, self.delta)
        self.optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        if self.group is not None:
            self.group.reduce_grads(self.params)
        self.optimizer.step()
        self.steps += 1
        out = self._emit(y, into)  # [Note: the detach boundary]
        return out.view(b, t, *out.shape[1:]), result.metrics()

    def _emit(self, y: Tensor, into: Into | None) -> Tensor:
        """normalise(y), cut from the graph. [Note: emitting into a slot] A transport that owns the memory
        the next stage reads (a shared-memory slot, pipeline/engines/channel.py) passes `into`; the
        normalisation then writes its result there (on a GPU: one copy to the host memory), so handing
        the output on copies nothing. The values are the same bits either way: the same operations."""
        if into is None:
            return normalise(y, self.spec.norm).detach()
        buf = into(tuple(y.shape), y.dtype)
        with torch.no_grad():
            if buf.device == y.device:
                return normalise(y, self.spec.norm, out=buf)
            return buf.copy_(normalise(y, self.spec.norm))

    def _top(self, x: Tensor) -> Tensor:
        """Forward all blocks; intermediate outputs normalised, the top one raw (normalised on emit)."""
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else normalise(x, self.spec.norm))
        return x

    def modules(self) -> nn.ModuleDict:
        """Everything with parameters, for checkpoints and probes."""
        mods = nn.ModuleDict({"blocks": self.blocks})
        if self.head is not None:
            mods["head"] = self.head
        return mods

    def state_dict(self) -> dict:
        return {"modules": self.modules().state_dict(), "optimizer": self.optimizer.state_dict(),
                "steps": self.steps, "first": self.first, "last": self.last}

    def load_state_dict(self, state: dict) -> None:
        if (state["first"], state["last"]) != (self.first, self.last):
            raise ValueError(f"checkpoint holds blocks [{state['first']}, {state['last']}), "
                             f"this learner [{self.first}, {self.last})")
        self.modules().load_state_dict(state["modules"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = state["steps"]


class LearnerStack:
    """Learners run one after the other in one process: the whole sequential loop, one pipeline stage
    holding several consecutive layers (when layers outnumber devices), or the end-to-end baseline (one
    learner holding every block). Each learner keeps its own loss and optimizer.
    """

    def __init__(self, learners: list[Learner]) -> None:
        if not learners:
            raise ValueError("a learner stack needs at least one learner")
        self.learners = learners

    @classmethod
    def layer_local(cls, spec: LearnerSpec, first: int, last: int,
                    device: str | torch.device = "cpu") -> LearnerStack:
        """One single-block learner per block in [first, last)."""
        return cls([Learner(spec, k, k + 1, device) for k in range(first, last)])

    def step(self, x: Tensor, into: Into | None = None) -> tuple[Tensor, list[dict[str, float]]]:
        """Step every learner in turn; the last one's output goes `into` the memory given, if any."""
        metrics = []
        for i, learner in enumerate(self.learners):
            x, m = learner.step(x, into if i + 1 == len(self.learners) else None)
            metrics.append(m)
        return x, metrics
