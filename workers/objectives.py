"""Local temporal objectives: pure torch functions of one layer's embeddings of a micro-batch.

Every objective takes `e` of shape (B, T, D) — B clips of T consecutive frames, one embedding per frame
— and the layer's tolerance `delta`, and returns a `LocalLoss`: the scalar to minimise plus the parts
every objective reports on one common scale, so that runs with different objectives can be compared.

[Note: the common scale] The reported distances are squared Euclidean distances between *unit-length*
embeddings u = e / ||e||, so they lie in [0, 4]:
  pos    mean ||u[b, t] - u[b, t+1]||^2 over consecutive frames of a clip,
  neg    mean ||u[b, t] - u[b', t]||^2 between different clips at the same time (b' = b + 1 mod B),
  over   fraction of consecutive pairs with pos distance > delta (the seed's soft constraint violated),
  spread sqrt(D) * mean over units of the std of u across the micro-batch: about 1 for features spread
         evenly over the sphere, 0 when every frame maps to the same point (collapse).
The hinge-style objectives apply delta on this same scale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LocalLoss:
    loss: Tensor  # the scalar this layer minimises
    pos: float  # mean squared distance between consecutive frames of a clip (unit embeddings)
    neg: float  # mean squared distance between different clips (unit embeddings)
    over: float  # fraction of consecutive pairs farther apart than delta
    spread: float  # feature spread, ~1 healthy, -> 0 on collapse

    def metrics(self) -> dict[str, float]:
        return {"loss": float(self.loss.detach()), "pos": self.pos, "neg": self.neg, "over": self.over,
                "spread": self.spread}


NEG_MARGIN = 1.0  # hinge-neg: different clips are pushed at least this far apart (unit-sphere scale)
NCE_TEMPERATURE = 0.1  # nce / clip-nce: softmax temperature on cosine similarities


def _pair_distances(u: Tensor) -> tuple[Tensor, Tensor]:
    """Squared distances of consecutive frames (B, T-1) and of neighbouring clips (B, T)."""
    pos = (u[:, 1:] - u[:, :-1]).pow(2).sum(-1)
    neg = (u - u.roll(1, dims=0)).pow(2).sum(-1)
    return pos, neg


def _report(loss: Tensor, u: Tensor, pos: Tensor, neg: Tensor, delta: float) -> LocalLoss:
    with torch.no_grad():
        flat = u.flatten(0, 1)
        spread = flat.std(dim=0).mean() * flat.shape[1] ** 0.5 if flat.shape[0] > 1 else flat.new_zeros(())
        return LocalLoss(loss, float(pos.mean()), float(neg.mean()), float((pos > delta).float().mean()),
                         float(spread))


def _check(e: Tensor) -> None:
    if e.dim() != 3 or e.shape[1] < 2:
        raise ValueError(f"objectives take embeddings (B, T>=2, D) (got shape {tuple(e.shape)})")


def hinge(e: Tensor, delta: float) -> LocalLoss:
    """The seed's soft approximation: relu(||u_t - u_{t+1}||^2 - delta). No counter-force: can collapse."""
    _check(e)
    u = F.normalize(e, dim=-1)
    pos, neg = _pair_distances(u)
    return _report(F.relu(pos - delta).mean(), u, pos, neg, delta)


def hinge_neg(e: Tensor, delta: float) -> LocalLoss:
    """hinge + Forward-Forward-style negatives: frames of different clips pushed beyond NEG_MARGIN."""
    _check(e)
    u = F.normalize(e, dim=-1)
    pos, neg = _pair_distances(u)
    loss = F.relu(pos - delta).mean() + F.relu(NEG_MARGIN - neg).mean()
    return _report(loss, u, pos, neg, delta)


def slow_var(e: Tensor, delta: float) -> LocalLoss:
    """Slowness + per-unit variance + decorrelation (the LPL / VICReg / SFA family), on raw embeddings.

    slowness  relu(mean_d (e_t - e_{t+1})^2 - delta)  per consecutive pair,
    variance  relu(1 - std_d) per unit over the micro-batch (keeps every unit alive),
    decorr    sum of squared off-diagonal covariances / D (keeps units from copying each other).
    """
    _check(e)
    u = F.normalize(e, dim=-1)
    pos, neg = _pair_distances(u)
    slow = F.relu((e[:, 1:] - e[:, :-1]).pow(2).mean(-1) - delta).mean()
    flat = e.flatten(0, 1)
    flat = flat - flat.mean(dim=0)
    var = F.relu(1 - flat.var(dim=0).add(1e-4).sqrt()).mean()
    cov = flat.T @ flat / max(flat.shape[0] - 1, 1)
    off = cov - torch.diag(torch.diagonal(cov))
    decorr = off.pow(2).sum() / flat.shape[1]
    return _report(slow + var + decorr, u, pos, neg, delta)


def nce(e: Tensor, delta: float) -> LocalLoss:
    """Temporal InfoNCE: frame t of a clip must pick frame t+1 of the same clip among all clips' t+1."""
    _check(e)
    u = F.normalize(e, dim=-1)
    pos, neg = _pair_distances(u)
    a, b = u[:, :-1].transpose(0, 1), u[:, 1:].transpose(0, 1)  # (T-1, B, D)
    logits = a @ b.transpose(1, 2) / NCE_TEMPERATURE  # (T-1, B, B): row i, column j = clip i vs clip j
    target = torch.arange(e.shape[0], device=e.device).expand(e.shape[1] - 1, -1)
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
    return _report(loss, u, pos, neg, delta)


def clip_nce(e: Tensor, delta: float) -> LocalLoss:
    """Clip-contrastive InfoNCE: every other frame of a frame's own clip is a positive, every frame of
    another clip a negative (supervised-contrastive form, the clip as the label).

    delta is the tolerance: a positive pair closer than delta (squared distance of unit embeddings, i.e.
    cosine >= 1 - delta/2) counts as a perfect match, so it is no longer pulled together — a layer is
    allowed to vary that much between frames of one clip.
    """
    _check(e)
    b, t, _ = e.shape
    u = F.normalize(e, dim=-1)
    pos, neg = _pair_distances(u)
    flat = u.flatten(0, 1)
    sim = flat @ flat.T  # (BT, BT) cosine similarities
    clip = torch.arange(b, device=e.device).repeat_interleave(t)
    same = clip[:, None] == clip[None, :]
    eye = torch.eye(b * t, dtype=torch.bool, device=e.device)
    sim = torch.where(same & ~eye, sim.clamp(max=1 - delta / 2), sim)
    logits = (sim / NCE_TEMPERATURE).masked_fill(eye, float("-inf"))
    log_prob = logits - logits.logsumexp(dim=1, keepdim=True)
    positives = same & ~eye
    loss = -(log_prob.masked_fill(~positives, 0).sum(1) / positives.sum(1)).mean()
    return _report(loss, u, pos, neg, delta)


Objective = Callable[[Tensor, float], LocalLoss]

OBJECTIVES: dict[str, Objective] = {
    "hinge": hinge,
    "hinge-neg": hinge_neg,
    "slow-var": slow_var,
    "nce": nce,
    "clip-nce": clip_nce,
}


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)} (got {name!r})") from None
