"""Layers of a lamina network: pure torch, no Ray, no IO.

A network is a list of blocks. Every block maps a batch of frames (N, C, H, W) or vectors (N, D) to the
next representation; between blocks the output is length-normalised (see `normalise`). The spec string
`conv:32,conv:64,conv:128,mlp:256` builds three conv blocks and one MLP block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


class ConvBlock(nn.Module):
    """3x3 conv -> ReLU -> 2x2 average pool: halves the frame, the usual greedy-layer building block.

    The conv's weight is held channels-last, so the conv, the ReLU and the pool run on (N, H, W, C) data: on
    the cpu PyTorch's average pool, forward and backward, is several times faster on it than on the default
    layout, and a step of the bench's first stage takes 0.72x the time (PERFLOG, 2026-11-30 M18). The block
    takes either layout (the conv computes the same bits from both), so where a block's output travels
    through a transport in the default layout, the next block computes exactly what it would have
    computed in the same process."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.conv.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # (stubs lack it)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(torch.relu_(self.conv(x)))  # in place: the conv's backward does not need its output


class MLPBlock(nn.Module):
    """Flatten -> linear -> ReLU, for the top of a stack."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.linear(x.flatten(1)))


@dataclass(frozen=True)
class BlockSpec:
    kind: str  # "conv" or "mlp"
    width: int  # output channels (conv) or features (mlp)


def parse_blocks(spec: str) -> tuple[BlockSpec, ...]:
    """`"conv:32,conv:64"` -> BlockSpecs. Raises ValueError naming the bad item."""
    blocks = []
    for item in spec.split(","):
        kind, _, width = item.strip().partition(":")
        if kind not in ("conv", "mlp") or not width.isdigit() or int(width) < 1:
            raise ValueError(f"expected items like conv:32 or mlp:256 (got {item!r} in {spec!r})")
        blocks.append(BlockSpec(kind, int(width)))
    seen_mlp = False
    for b in blocks:
        if b.kind == "conv" and seen_mlp:
            raise ValueError(f"a conv block cannot follow an mlp block (got {spec!r})")
        seen_mlp |= b.kind == "mlp"
    return tuple(blocks)


def build_blocks(specs: tuple[BlockSpec, ...], in_shape: tuple[int, int, int]) -> list[nn.Module]:
    """Instantiate the blocks for frames of shape (C, H, W); the caller seeds torch beforehand."""
    c, h, w = in_shape
    blocks: list[nn.Module] = []
    for spec in specs:
        if spec.kind == "conv":
            blocks.append(ConvBlock(c, spec.width))
            c, h, w = spec.width, h // 2, w // 2
        else:
            blocks.append(MLPBlock(c * h * w, spec.width))
            c, h, w = spec.width, 1, 1
    return blocks


def output_shapes(specs: tuple[BlockSpec, ...], in_shape: tuple[int, int, int]) -> list[tuple[int, ...]]:
    """Per block, the shape of one frame's output: (C, H, W) for conv, (D,) for mlp. Raises ValueError when a
    conv block would get maps smaller than 2x2 (each one halves them)."""
    c, h, w = in_shape
    shapes: list[tuple[int, ...]] = []
    for k, spec in enumerate(specs):
        if spec.kind == "conv":
            if h < 2 or w < 2:
                raise ValueError(f"too many conv blocks for {in_shape[1]}x{in_shape[2]} frames: block {k + 1} "
                                 f"would get {h}x{w} maps (each conv block halves them)")
            c, h, w = spec.width, h // 2, w // 2
            shapes.append((c, h, w))
        else:
            c, h, w = spec.width, 1, 1
            shapes.append((c,))
    return shapes


NORMS = ("rms", "channel", "none")  # how a block's output is scaled before the next block sees it


def normalise(y: Tensor, kind: str = "rms", eps: float = 1e-6, out: Tensor | None = None) -> Tensor:
    """Scale each sample's activity before the next layer sees it.

    rms      unit root-mean-square per sample (length sqrt(numel)): the default. As in Forward-Forward, the
             next layer sees the *direction* of this layer's activity, not its length, so it cannot read
             off this layer's own objective; unit RMS (rather than unit length) keeps the scale of the next
             layer's input independent of its size.
    channel  unit RMS across channels at every location of a conv map (a local contrast normalisation:
             faint and bright parts of a frame weigh the same); vectors as rms.
    none     unchanged.

    `out`: a contiguous tensor of y's shape to write the result into (outside autograd): the same values,
    computed by the same last operation, in memory someone else gave (a channel's slot: workers/learner.py).
    """
    if kind not in NORMS:
        raise ValueError(f"normalisation must be one of {NORMS} (got {kind!r})")
    if kind == "none":
        return y if out is None else out.copy_(y)
    # Reduced in place of flattening: a conv block's channels-last output is not copied into another layout.
    dims = (1,) if kind == "channel" and y.dim() == 4 else tuple(range(1, y.dim()))
    return torch.div(y, y.pow(2).mean(dim=dims, keepdim=True).add(eps).sqrt(), out=out)


def pool_features(y: Tensor, grid: int) -> Tensor:
    """Average-pool conv maps (N, C, H, W) to a grid x grid map and flatten; vectors pass unchanged.

    grid=1 is global average pooling; grid=2 is what the probe reads (the 2x2 average-pooled features of the
    reference protocol) and what every layer's loss pools to by default.
    """
    if y.dim() == 4:
        return nn.functional.adaptive_avg_pool2d(y, grid).flatten(1)
    return y


class Head(nn.Module):
    """A small projection head trained with its layer and never passed on (Decoupled Greedy Learning).

    pool -> Linear(hidden) -> ReLU -> Linear(out). Costs two small matmuls per step.
    """

    def __init__(self, in_features: int, hidden: int, out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def pooled_size(shape: tuple[int, ...], grid: int) -> int:
    return shape[0] * grid * grid if len(shape) == 3 else shape[0]

