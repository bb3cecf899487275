"""The run configuration: one frozen dataclass shared by the CLI, the run directory and the engines.

Validation happens in `__post_init__`, and every error names the command-line flag it came from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from workers.layers import NORMS, parse_blocks
from workers.learner import LearnerSpec
from workers.objectives import OBJECTIVES

ENGINES = ("ray", "sequential", "e2e")
PLACEMENTS = ("pack", "spread")


def default_deltas(n: int) -> tuple[float, ...]:
    """No tolerance on any layer. `lamina study deltas` tested the seed's schedule (larger for earlier layers)
    against constant, increasing and none on COIL-20: the smaller layer 1's tolerance, the more it learns,
    and none is best at every layer, over two seeds."""
    return (0.0,) * n


def default_loss_grids(n: int) -> tuple[int, ...]:
    """Every layer's loss pools its maps to 2x2 (`lamina study settings`: the lower layers learn most from a
    2x2 grid, and the top layer is steadier with it than with global pooling over seeds)."""
    return (2,) * n


@dataclass(frozen=True)
class TrainConfig:
    data: str = "synthetic"  # data spec: synthetic[:OPTIONS] | moving-mnist:PATH | npz:PATH
    objective: str = "clip-nce"  # local objective, a name in workers.objectives.OBJECTIVES
    engine: str = "ray"  # ray (asynchronous pipeline) | sequential (layer-local loop) | e2e (backprop)
    steps: int = 3000  # micro-batches to train on (the learning-quality results need this many)
    layers: str = "conv:32,conv:64,conv:128"  # the network, bottom to top
    deltas: tuple[float, ...] = ()  # per-layer tolerance delta_k; empty: default_deltas (0)
    clips: int = 16  # B: clips per micro-batch (distinct sequences where possible)
    clip_len: int = 8  # T: frames per clip
    stride: int = 1  # frames between a clip's neighbouring frames (temporal distance of positives)
    size: int = 32  # frames are resized to size x size
    lr: float = 1e-3  # Adam learning rate of every layer
    head: tuple[int, int] | None = (256, 64)  # per-layer projection head (hidden, out); None: loss on y
    loss_grid: tuple[int, ...] = ()  # per layer, pool conv maps to g x g before head and loss (1: global);
    # one value: every layer; empty: default_loss_grids
    norm: str = "rms"  # between layers: rms (per frame) | channel (per location) | none
    seed: int = 0  # initialisation and data order
    run_dir: str = ""  # where config, metrics and checkpoint go; empty: runs/<time>
    # The Ray pipeline engine (pipeline/ray_engine.py):
    layers_per_stage: int = 1  # consecutive layers per stage actor
    queue_depth: int = 2  # bounded channel depth between stages
    placement: str = "pack"  # placement-group strategy: pack | spread
    cpus_per_stage: float = 1.0  # CPUs reserved per stage actor
    address: str | None = None  # Ray cluster to join; None: RAY_ADDRESS or a new local Ray
    # Barrier checkpoints (pipeline/checkpoint.py): what resume and stage-failure recovery restore.
    checkpoint_every: int = 100  # a checkpoint after every N micro-batches; 0: only on request and at the end
    keep_checkpoints: int = 3  # complete checkpoints kept (older ones are pruned)
    checkpoint_uri: str = ""  # local path or pyarrow.fs URI (s3://...); empty: RUN_DIR/checkpoints
    n_layers: int = field(init=False)  # derived from `layers`

    def __post_init__(self) -> None:
        blocks = parse_blocks(self.layers)
        object.__setattr__(self, "n_layers", len(blocks))
        if not self.deltas:
            object.__setattr__(self, "deltas", default_deltas(len(blocks)))
        if not self.loss_grid:
            object.__setattr__(self, "loss_grid", default_loss_grids(len(blocks)))
        elif len(self.loss_grid) == 1:
            object.__setattr__(self, "loss_grid", self.loss_grid * len(blocks))
        checks = [
            (self.objective in OBJECTIVES, f"--objective must be one of {sorted(OBJECTIVES)}", self.objective),
            (self.engine in ENGINES, f"--engine must be one of {list(ENGINES)}", self.engine),
            (self.steps >= 1, "--steps must be >= 1", self.steps),
            (len(self.deltas) == len(blocks), f"--deltas needs one value per layer ({len(blocks)})", self.deltas),
            (all(d >= 0 for d in self.deltas), "--deltas must be >= 0", self.deltas),
            (self.clips >= 2, "--clips must be >= 2", self.clips),
            (self.clip_len >= 2, "--clip-len must be >= 2", self.clip_len),
            (self.stride >= 1, "--stride must be >= 1", self.stride),
            (self.norm in NORMS, f"--norm must be one of {list(NORMS)}", self.norm),
            (self.size >= 4, "--size must be >= 4", self.size),
            (self.lr > 0, "--lr must be > 0", self.lr),
            (self.seed >= 0, "--seed must be >= 0", self.seed),
            (self.head is None or min(self.head) >= 1, "--head sizes must be >= 1", self.head),
            (len(self.loss_grid) == len(blocks), f"--loss-grid needs one value or one per layer ({len(blocks)})",
             self.loss_grid),
            (all(g >= 1 for g in self.loss_grid), "--loss-grid must be >= 1", self.loss_grid),
            (self.layers_per_stage >= 1, "--layers-per-stage must be >= 1", self.layers_per_stage),
            (self.queue_depth >= 1, "--queue-depth must be >= 1", self.queue_depth),
            (self.placement in PLACEMENTS, f"--placement must be one of {list(PLACEMENTS)}", self.placement),
            (self.cpus_per_stage > 0, "--cpus-per-stage must be > 0", self.cpus_per_stage),
            (self.checkpoint_every >= 0, "--checkpoint-every must be >= 0", self.checkpoint_every),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be >= 1", self.keep_checkpoints),
        ]
        for ok, message, value in checks:
            if not ok:
                raise ValueError(f"{message} (got {value!r})")

    def learner_spec(self, in_shape: tuple[int, int, int]) -> LearnerSpec:
        return LearnerSpec(parse_blocks(self.layers), in_shape, self.objective, self.deltas, self.lr,
                           self.head, self.loss_grid, self.seed, self.norm)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("n_layers")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d.pop("n_layers", None)
        d["deltas"] = tuple(d.get("deltas", ()))
        grid = d.get("loss_grid", ())
        d["loss_grid"] = (grid,) if isinstance(grid, int) else tuple(grid)  # runs written before per-layer grids
        if d.get("head") is not None:
            d["head"] = tuple(d["head"])
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        return cls(**d)
