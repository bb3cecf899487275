"""The run configuration: one frozen dataclass, and the one place every training flag is described.

Each field is written once, with its type, default and help (`flag(...)`): pipeline/flags.py builds the
`lamina train` arguments and the README's flag table from these fields, and a test fails when the README
differs. Validation happens in `__post_init__`; every error is a ConfigError naming the flag and the value.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import ConfigError
from workers.layers import NORMS, output_shapes, parse_blocks
from workers.learner import LearnerSpec
from workers.objectives import OBJECTIVES

ENGINES = ("ray", "sequential", "e2e")
PLACEMENTS = ("pack", "spread")
TRANSPORTS = ("auto", "object-store", "direct", "compiled-graph", "shm")  # pipeline/engines/transport.py
BALANCES = ("even", "auto")  # pipeline/engines/balance.py


def flag(default: Any, help: str, *, parse: Any = None, choices: tuple[str, ...] | None = None,
         metavar: str | None = None, shown: str | None = None, section: str = "") -> Any:
    """A config field that is also a `lamina train` flag. `parse`: turns the command-line text into the
    value (default: the field's type); `shown`: how the default reads in help and README when the value
    itself would not say it; `section`: the README sub-heading the flag is listed under."""
    return field(default=default, metadata={"help": help, "parse": parse, "choices": choices, "metavar": metavar,
                                            "shown": shown, "section": section})


def _numbers(kind: type) -> Any:
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(","))
        except ValueError:
            raise ValueError(f"expected comma-separated {'integers' if kind is int else 'numbers'} "
                             f"(got {text!r})") from None
    parse.__name__ = f"{kind.__name__}s"
    return parse


def _head(text: str) -> tuple[int, int] | None:
    if text == "none":
        return None
    sizes = _numbers(int)(text)
    if len(sizes) != 2:
        raise ValueError(f"expected HIDDEN,OUT or none (got {text!r})")
    return (sizes[0], sizes[1])


def _auto_float(text: str) -> float | None:
    return None if text == "auto" else float(text)


@dataclass(frozen=True)
class TrainConfig:
    data: str = flag("synthetic", "synthetic[:OPTS] (built-in procedural videos), moving-mnist:PATH (an MNIST "
                     ".npz), npz:PATH (a sequence or turntable archive), video:PATH (video files, decoded on the "
                     "fly) or parquet:DIR (a dataset lamina prepare wrote, at a path or a pyarrow.fs URI)", metavar="SPEC")
    objective: str = flag("clip-nce", "local objective of every layer: hinge, hinge-neg, slow-var, nce or clip-nce",
                          choices=tuple(sorted(OBJECTIVES)))
    engine: str = flag("ray", "ray (the asynchronous pipeline), sequential (layer-local loop in one process) or "
                       "e2e (end-to-end backprop baseline)", choices=ENGINES)
    steps: int = flag(3000, "micro-batches to train on")
    layers: str = flag("conv:32,conv:64,conv:128", "the network, bottom to top, e.g. conv:32,conv:64,mlp:256",
                       metavar="SPEC")
    deltas: tuple[float, ...] = flag((), "tolerance delta_k per layer: positive pairs closer than delta_k are "
                                     "left alone", parse=_numbers(float), metavar="D1,D2,...",
                                     shown="0 on every layer")
    clips: int = flag(16, "B: clips per micro-batch, from distinct sequences")
    clip_len: int = flag(8, "T: frames per clip")
    stride: int = flag(1, "frames between a clip's neighbouring frames (the temporal distance of positives)")
    size: int = flag(32, "frames are resized to SIZE x SIZE")
    memory_budget: float | None = flag(None, "GiB the data held in memory may take (synthetic, moving-mnist, npz); "
                                       "larger data is refused before loading", parse=_auto_float,
                                       metavar="GIB|auto", shown="half of this machine's memory")
    lr: float = flag(1e-3, "Adam learning rate of every layer")
    head: tuple[int, int] | None = flag((256, 64), "per-layer projection head HIDDEN,OUT, trained with its layer, "
                                        "never passed on; none: the loss on the pooled maps", parse=_head,
                                        metavar="HIDDEN,OUT|none")
    loss_grid: tuple[int, ...] = flag((), "per layer, the grid its conv maps are average-pooled to before its "
                                      "head and loss (1: global); one value for every layer",
                                      parse=_numbers(int), metavar="G1,G2,...", shown="2 on every layer")
    norm: str = flag("rms", "how a layer's output is scaled before the next layer: rms (per frame), channel "
                     "(per location) or none", choices=NORMS)
    seed: int = flag(0, "initialisation and data order")
    run_dir: str = flag("", "where config, metrics and checkpoints go: a path, or a pyarrow.fs URI (s3://..., "
                        "file:///SHARED/PATH) that outlives the machine", metavar="DIR", shown="runs/<time>")
    layers_per_stage: int = flag(1, "consecutive layers per stage actor (when layers outnumber devices)",
                                 section="ray")
    queue_depth: int = flag(2, "bounded channel depth between stages, in micro-batches", section="ray")
    balance: str = flag("even", "which layers each stage holds: even (--layers-per-stage each) or auto (as many "
                        "stages, split by each layer's step time within --stage-memory-gb, measured before the "
                        "run starts)",
                        choices=BALANCES, section="ray")
    stage_memory_gb: float = flag(0.0, "with --balance auto: the most memory one stage may need, in GB (each "
                                  "layer's parameters, gradients, optimizer state and a step's activations, "
                                  "measured); the split respects it or the run stops before it starts",
                                  shown="the GPU's memory where the driver sees one, else no limit", section="ray")
    transport: str = flag("object-store", "how activations travel between stages: object-store (a Ray call "
                          "per step, output references chained), direct (Ray Direct Transport: tensors sent stage to stage over a "
                          "collective group, gloo on the cpu, NCCL between GPUs), compiled-graph (a Ray Compiled Graph: "
                          "shared-memory channels, NCCL between GPUs, no call per step), shm (lamina's shared-memory channels between the stages of "
                          "one node: outputs made in the next stage's slot, no copy and no call per step) or auto (the one measured best for the "
                          "stages' device)", choices=TRANSPORTS, section="ray")
    replicas: str = flag("1", "data-parallel replicas per stage, each on its own device (CPU bundle or GPU), "
                         "splitting the micro-batch's clips and summing gradients with an all-reduce: one count "
                         "for every stage, one per stage, or auto (the cluster's spare devices to the slowest "
                         "stages by measured step time)", metavar="R|R1,R2,...|auto", section="ray")
    yield_slack: str = flag("on", "on: a stage busy less than 80% of the time steps at SCHED_IDLE priority, so that "
                            "other processes wake on its core rather than the bottleneck's (stages of one thread, where "
                            "the run's stages on its machine have a core each and its process may go back: "
                            "CAP_SYS_NICE; pipeline/slack.py); off: every stage at normal priority",
                            choices=("on", "off"), section="ray")
    placement: str = flag("pack", "placement-group strategy: pack, or spread (one stage per node)",
                          choices=PLACEMENTS, section="ray")
    cpus_per_stage: float = flag(1.0, "CPUs reserved per stage (its torch threads)", section="ray")
    gpus_per_stage: float | None = flag(None, "GPUs reserved per stage; a fraction shares one GPU between stages",
                                        parse=_auto_float, metavar="N|auto", shown="auto: 1 when the cluster has GPUs, else 0",
                                        section="ray")
    address: str | None = flag(None, "Ray cluster to join (a program connected to one already runs there and refuses another)", metavar="HOST:PORT",
                               shown="RAY_ADDRESS, else a new local Ray", section="ray")
    connect_timeout: float = flag(30.0, "seconds the Ray cluster at --address has to answer before the run "
                                  "gives up", metavar="S", section="ray")
    checkpoint_every: int = flag(100, "barrier checkpoint every N micro-batches (0: only on request, on stop "
                                 "and at the end)", metavar="N", section="checkpoints")
    keep_checkpoints: int = flag(3, "complete checkpoints kept (older ones are pruned)", section="checkpoints")
    tolerable_checkpoint_failures: int = flag(3, "barrier checkpoints in a row that may fail to be written "
                                              "(each is reported) before the run stops", metavar="N",
                                              section="checkpoints")
    # A plain path is one node's disk; a URI is taken to reach every node ([Note: shared storage] in
    # pipeline/storage.py), which a run on several nodes needs.
    checkpoint_uri: str = flag("", "where checkpoints go: a path (this node's disk), or a pyarrow.fs URI every "
                               "node reaches (s3://..., gs://..., file:///SHARED/MOUNT)", metavar="URI",
                               shown="RUN_DIR/checkpoints", section="checkpoints")
    n_layers: int = field(init=False)  # derived from `layers`

    def __post_init__(self) -> None:
        try:
            blocks = parse_blocks(self.layers)
        except ValueError as e:
            raise ConfigError(f"--layers: {e}") from None
        n = len(blocks)
        object.__setattr__(self, "n_layers", n)
        if not self.deltas:
            # No tolerance: `lamina study deltas` tested the seed's schedule (larger for earlier layers) against
            # constant, increasing and none on COIL-20; none was best at every layer, over two seeds.
            object.__setattr__(self, "deltas", (0.0,) * n)
        if not self.loss_grid:
            # 2x2 on every layer (`lamina study settings`): the lower layers learn most from it, and the top
            # layer is steadier with it than with global pooling over seeds.
            object.__setattr__(self, "loss_grid", (2,) * n)
        elif len(self.loss_grid) == 1:
            object.__setattr__(self, "loss_grid", self.loss_grid * n)
        finite = (self.lr, *self.deltas, self.cpus_per_stage, self.gpus_per_stage or 0.0, self.connect_timeout,
                  self.memory_budget or 0.0)
        checks = [
            (all(math.isfinite(x) for x in finite),
             ("--lr, --deltas, --cpus-per-stage, --gpus-per-stage, --connect-timeout and --memory-budget must "
              "be finite"), finite),
            (self.memory_budget is None or self.memory_budget > 0, "--memory-budget must be > 0",
             self.memory_budget),
            (self.objective in OBJECTIVES, f"--objective must be one of {sorted(OBJECTIVES)}", self.objective),
            (self.engine in ENGINES, f"--engine must be one of {list(ENGINES)}", self.engine),
            (self.steps >= 1, "--steps must be >= 1", self.steps),
            (len(self.deltas) == n, f"--deltas needs one value per layer ({n})", self.deltas),
            (all(d >= 0 for d in self.deltas), "--deltas must be >= 0", self.deltas),
            (self.clips >= 2, "--clips must be >= 2", self.clips),
            (self.clip_len >= 2, "--clip-len must be >= 2", self.clip_len),
            (self.stride >= 1, "--stride must be >= 1", self.stride),
            (self.norm in NORMS, f"--norm must be one of {list(NORMS)}", self.norm),
            (self.size >= 4, "--size must be >= 4", self.size),
            (self.lr > 0, "--lr must be > 0", self.lr),
            (self.seed >= 0, "--seed must be >= 0", self.seed),
            (self.head is None or (len(self.head) == 2 and min(self.head) >= 1), "--head must be HIDDEN,OUT with sizes >= 1",
             self.head),
            (len(self.loss_grid) == n, f"--loss-grid needs one value or one per layer ({n})", self.loss_grid),
            (all(g >= 1 for g in self.loss_grid), "--loss-grid must be >= 1", self.loss_grid),
            (self.layers_per_stage >= 1, "--layers-per-stage must be >= 1", self.layers_per_stage),
            (self.queue_depth >= 1, "--queue-depth must be >= 1", self.queue_depth),
            (self.placement in PLACEMENTS, f"--placement must be one of {list(PLACEMENTS)}", self.placement),
            (self.balance in BALANCES, f"--balance must be one of {list(BALANCES)}", self.balance),
            (self.stage_memory_gb >= 0, "--stage-memory-gb must be >= 0", self.stage_memory_gb),
            (not self.stage_memory_gb or self.balance == "auto", "--stage-memory-gb needs --balance auto",
             self.stage_memory_gb),
            (self.transport in TRANSPORTS, f"--transport must be one of {list(TRANSPORTS)}", self.transport),
            (self.replicas == "auto" or _replica_counts_ok(self.replicas, self.clips),
             f"--replicas must be auto or counts >= 1 that divide --clips {self.clips}", self.replicas),
            (self.cpus_per_stage > 0, "--cpus-per-stage must be > 0", self.cpus_per_stage),
            (self.gpus_per_stage is None or self.gpus_per_stage >= 0, "--gpus-per-stage must be >= 0",
             self.gpus_per_stage),
            (self.connect_timeout > 0, "--connect-timeout must be > 0", self.connect_timeout),
            (self.checkpoint_every >= 0, "--checkpoint-every must be >= 0", self.checkpoint_every),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be >= 1", self.keep_checkpoints),
            (self.tolerable_checkpoint_failures >= 0, "--tolerable-checkpoint-failures must be >= 0",
             self.tolerable_checkpoint_failures),
        ]
        for ok, message, value in checks:
            if not ok:
                raise ConfigError(f"{message} (got {value!r})")

    def learner_spec(self, in_shape: tuple[int, int, int]) -> LearnerSpec:
        """What every learner shares, for frames of `in_shape`; refuses a network the frames cannot feed."""
        blocks = parse_blocks(self.layers)
        try:
            output_shapes(blocks, in_shape)
        except ValueError as e:
            raise ConfigError(f"--layers {self.layers} with --size {in_shape[1]}: {e}") from None
        return LearnerSpec(blocks, in_shape, self.objective, self.deltas, self.lr, self.head, self.loss_grid,
                           self.seed, self.norm)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("n_layers")
        return d

    @classmethod
    def from_dict(cls, d: Any, source: str = "config") -> TrainConfig:
        """A config as `to_dict` wrote it (config.json, a checkpoint's record); every problem is a ConfigError
        naming `source` and the key."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object of settings (got {type(d).__name__})")
        d = {k: v for k, v in d.items() if k != "n_layers"}
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ConfigError(f"{source}: unknown settings {unknown}")
        if isinstance(d.get("loss_grid"), int):  # runs written before per-layer grids
            d["loss_grid"] = [d["loss_grid"]]
        for key, value in d.items():
            kind = str(fields[key].type)
            d[key] = _typed(value, kind, f"{source}: '{key}'")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def _replica_counts_ok(text: str, clips: int) -> bool:
    try:
        counts = _numbers(int)(text)
    except ValueError:
        return False
    return all(r >= 1 and clips % r == 0 for r in counts)


def _typed(value: Any, kind: str, where: str) -> Any:
    """`value` (from JSON) as the field type `kind` names, or a ConfigError."""
    if value is None and "None" in kind:
        return None
    base = kind.replace(" | None", "")
    if base.startswith("tuple[") and isinstance(value, list | tuple):
        item: type = float if "float" in base else int
        if all(_number(v, item) for v in value):
            return tuple(item(v) for v in value)
    elif base == "int" and _number(value, int):
        return value
    elif base == "float" and _number(value, float):
        return float(value)
    elif base == "str" and isinstance(value, str):
        return value
    raise ConfigError(f"{where} must be {kind} (got {value!r:.60})")


def _number(value: Any, kind: type) -> bool:
    """An int (or, for float, an int or a float) that is not a bool and fits a float (JSON has no limit)."""
    allowed = (int, float) if kind is float else (int,)
    return isinstance(value, allowed) and not isinstance(value, bool) and abs(value) < 1e300
