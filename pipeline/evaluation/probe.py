"""Honest evaluation: linear probe and 1-nearest-neighbour on frozen features, next to random init.

For every layer, features are the layer's (normalised) output average-pooled to 2x2 (the reference
protocol). A probe fits on a labelled split and is tested on the rest:
  --probe-views 0,18,36,54   label those frame indices of every sequence (the 4-view turntable protocol)
  --probe-fraction 0.5       label every frame of that fraction of the sequences, test on the others
The same network at its random initialisation (the learners rebuilt from the run's seed, never trained)
is always probed alongside: a learned layer is only worth having above its random-init twin.

The weights are the run's newest complete barrier checkpoint ([Note: the checkpoint store] in
pipeline/checkpoints/store.py), read and verified like a resume reads them: a finished, stopped, failed or
killed run is probed alike, and the report says after how many micro-batches.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.checkpoints import Checkpoint
from pipeline.config import TrainConfig
from pipeline.errors import CheckpointError, ConfigError
from pipeline.rundir import RunDir
from pipeline.sources import Videos, load_videos
from pipeline.telemetry.progress import Progress
from workers.layers import pool_features
from workers.learner import Learner

logger = logging.getLogger(__name__)

PROBE_GRID = 2  # features are average-pooled to 2x2 per channel


@dataclass(frozen=True)
class Split:
    train: Tensor  # (N, L) bool: labelled frames
    test: Tensor  # (N, L) bool: frames the probe is scored on
    name: str  # how it was made, for the record


def make_split(videos: Videos, views: tuple[int, ...] | None, fraction: float | None, seed: int = 0) -> Split:
    n, length = videos.labels.shape
    if (views is None) == (fraction is None):
        raise ConfigError("give exactly one of --probe-views and --probe-fraction")
    train = torch.zeros(n, length, dtype=torch.bool)
    if views is not None:
        bad = [v for v in views if not 0 <= v < length]
        if bad or not views:
            raise ConfigError(f"--probe-views must be frame indices in [0, {length}) (got {list(views)})")
        if len(set(views)) == length:
            raise ConfigError(f"--probe-views {','.join(map(str, views))} label every frame of {videos.name}: "
                              f"nothing is left to test on")
        train[:, list(views)] = True
        name = f"views {','.join(map(str, views))}"
    else:
        assert fraction is not None
        if not 0 < fraction < 1:
            raise ConfigError(f"--probe-fraction must be in (0, 1) (got {fraction})")
        k = max(1, min(n - 1, round(fraction * n)))
        if n < 2:
            raise ConfigError(f"--probe-fraction needs at least 2 sequences ({videos.name} has {n})")
        chosen = torch.from_numpy(np.random.default_rng(seed).permutation(n)[:k])
        train[chosen] = True
        name = f"fraction {fraction} of sequences ({k}/{n})"
    _check_classes(videos, train, name)
    return Split(train, ~train, name)


def _check_classes(videos: Videos, train: Tensor, name: str) -> None:
    """A probe can only name classes it was shown: refuse a split whose test frames' labels are none of them
    (one sequence per label split by sequences, say), and warn of test frames whose label it never labelled."""
    unseen = ~torch.isin(videos.labels[~train], videos.labels[train].unique())
    if unseen.all():
        raise ConfigError(f"the probe's split of {videos.name} ({name}) labels none of the classes it tests on "
                          f"(are there sequences of every label on both sides?): give --probe-views I,J,... to "
                          f"label those frames of every sequence")
    if unseen.any():
        logger.warning("%d of the probe's %d test frames have a label the split (%s) never labelled: they count "
                       "as misses", int(unseen.sum()), unseen.numel(), name)


def load_run(run_dir: str | Path) -> tuple[TrainConfig, tuple[int, int, int], Checkpoint]:
    """The config, frame shape and newest complete checkpoint of a run (finished or not)."""
    run = RunDir(run_dir)
    cfg = run.config()
    store = run.store(cfg)
    checkpoint = store.load_latest()
    if checkpoint is None:
        raise CheckpointError(f"{run_dir}: no complete checkpoint in {store.uri} (did the run reach its first "
                              f"barrier?)")
    meta = checkpoint.meta
    shape = meta.get("in_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(v) is int and v > 0 for v in shape)):
        raise CheckpointError(f"{store.dir(checkpoint.step)}: COMPLETE records no frame shape (got {shape!r:.40})")
    return TrainConfig.from_dict(meta.get("config"), f"{store.dir(checkpoint.step)}/COMPLETE"), \
        (shape[0], shape[1], shape[2]), checkpoint


def build_learners(cfg: TrainConfig, in_shape: tuple[int, int, int], states: list[dict],
                   trained: bool) -> list[Learner]:
    """The run's learners, with the checkpoint's weights (trained) or as initialised (random twin)."""
    spec = cfg.learner_spec(in_shape)
    learners = []
    for state in states:
        try:
            learner = Learner(spec, state["first"], state["last"])
            if trained:
                learner.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"the checkpoint's learner states do not fit the run's network ({e})") from e
        learners.append(learner)
    return learners


@torch.no_grad()
def layer_features(learners: list[Learner], frames: Tensor, chunk: int = 512) -> list[Tensor]:
    """Per layer, pooled features of frames (M, C, H, W) -> list of (M, F)."""
    per_layer: list[list[Tensor]] = []
    for i in range(0, frames.shape[0], chunk):
        x = frames[i:i + chunk]
        outs: list[Tensor] = []
        for learner in learners:
            ys = learner.forward(x)
            outs += ys
            x = ys[-1]
        if not per_layer:
            per_layer = [[] for _ in outs]
        for k, y in enumerate(outs):
            per_layer[k].append(pool_features(y, PROBE_GRID))
    return [torch.cat(parts) for parts in per_layer]


def linear_probe(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, iters: int = 200) -> float:
    """Multinomial logistic regression on standardised features, L2 as in C=1, fitted with L-BFGS."""
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    xtr, xte = (x_train - mean) / std, (x_test - mean) / std
    classes = int(max(y_train.max(), y_test.max())) + 1
    w = torch.zeros(xtr.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iters, line_search_fn="strong_wolfe")
    lam = 1.0 / (2 * xtr.shape[0])

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, y_train) + lam * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float(((xte @ w + b).argmax(1) == y_test).float().mean())


def knn_probe(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor) -> float:
    """1-nearest neighbour by cosine similarity."""
    a, b = F.normalize(x_train, dim=1), F.normalize(x_test, dim=1)
    nearest = (b @ a.T).argmax(1)
    return float((y_train[nearest] == y_test).float().mean())


def probe(run_dir: str | Path, data: str | None = None, views: tuple[int, ...] | None = None,
          fraction: float | None = None, progress: bool = False) -> dict:
    """Probe every layer of a run's newest checkpoint and of its random-init twin; writes RUN_DIR/probe.json.
    `progress`: a progress line on stderr (the CLI's), one unit per network's features and per fitted probe."""
    cfg, in_shape, checkpoint = load_run(run_dir)
    logger.info("probing %s at micro-batch %d: loading the probe data", run_dir, checkpoint.step)
    videos = load_videos(data or cfg.data, cfg.size, "probe", cfg.memory_budget)
    if videos.frame_shape != in_shape:
        raise ConfigError(f"--data {videos.name}: frames {videos.frame_shape} do not match the run's {in_shape}")
    split = make_split(videos, views, fraction, cfg.seed)
    frames = videos.frames.flatten(0, 1)
    labels = videos.labels.flatten()
    tr, te = split.train.flatten(), split.test.flatten()
    results: dict[str, list[float]] = {}
    bar = Progress(2 * (1 + cfg.n_layers), f"probe {frames.shape[0]} frames", unit="step").__enter__() if progress else None
    done = 0
    try:
        for name, trained in (("", True), ("_random", False)):
            what = "learned" if trained else "random init"
            feats = layer_features(build_learners(cfg, in_shape, checkpoint.learners, trained), frames)
            done += 1
            if bar is not None:
                bar.update(done, f"{what}: features")
            results["linear" + name], results["knn" + name] = [], []
            for k, f in enumerate(feats):
                results["linear" + name].append(linear_probe(f[tr], labels[tr], f[te], labels[te]))
                results["knn" + name].append(knn_probe(f[tr], labels[tr], f[te], labels[te]))
                done += 1
                if bar is not None:
                    bar.update(done, f"{what}: layer {k + 1} fitted")
    finally:
        if bar is not None:
            bar.close()
    layers = [{"layer": k + 1, **{key: vals[k] for key, vals in results.items()}}
              for k in range(len(results["linear"]))]
    report = {"data": videos.name, "split": split.name, "train_frames": int(tr.sum()),
              "test_frames": int(te.sum()), "objective": cfg.objective, "engine": cfg.engine,
              "steps": checkpoint.step, "layers": layers}
    RunDir(run_dir).write("probe.json", (json.dumps(report, indent=2) + "\n").encode())
    return report


def format_table(report: dict) -> str:
    lines = [(f"probe on {report['data']} ({report['split']}; {report['train_frames']} labelled, "
             f"{report['test_frames']} test frames) — {report['objective']}, {report['engine']}, "
             f"after {report['steps']} micro-batches"),
             f"{'layer':>5} | {'linear':>7} {'random':>7} {'gain':>6} | {'1-NN':>7} {'random':>7} {'gain':>6}"]
    for r in report["layers"]:
        lines.append(f"{r['layer']:>5} | {100 * r['linear']:6.1f}% {100 * r['linear_random']:6.1f}% "
                     f"{100 * (r['linear'] - r['linear_random']):+6.1f} | {100 * r['knn']:6.1f}% "
                     f"{100 * r['knn_random']:6.1f}% {100 * (r['knn'] - r['knn_random']):+6.1f}")
    return "\n".join(lines)
