"""The driver of a training run: data -> engine -> run directory. No Ray here; the Ray engine plugs in."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from pipeline.config import TrainConfig
from pipeline.data import ClipSampler, load_videos
from pipeline.engines import run_in_process
from pipeline.progress import Progress
from pipeline.rundir import RunDir, default_run_dir

logger = logging.getLogger(__name__)


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Train as `cfg` says; returns the run directory (config, metrics.parquet, checkpoint.pt, loss.png)."""
    videos = load_videos(cfg.data, cfg.size, "train")
    sampler = ClipSampler(videos, cfg.clips, cfg.clip_len, cfg.seed)
    spec = cfg.learner_spec(videos.frame_shape)
    # Resolved here so that the config on disk and the engine (the Ray engine's run id) name the same run.
    cfg = dataclasses.replace(cfg, run_dir=cfg.run_dir or default_run_dir())
    run = RunDir(cfg.run_dir).create(cfg)
    logger.info("run %s: %s on %s (%d sequences x %d frames), %d layers, engine %s", run.path,
                cfg.objective, videos.name, videos.frames.shape[0], videos.frames.shape[1], cfg.n_layers,
                cfg.engine)
    rows: list[dict] = []
    bar = Progress(cfg.steps, f"train {cfg.engine}") if progress else None
    t0 = time.perf_counter()

    def on_step(m: int, layer_metrics: list[tuple[int, dict[str, float]]]) -> None:
        now = time.perf_counter() - t0
        for layer, metrics in layer_metrics:
            rows.append({"step": m, "layer": layer, "time": now, **metrics})
        if bar is not None:
            bar.update(m + 1, _status(layer_metrics))

    states = _engine(cfg)(cfg, spec, sampler, on_step)
    if bar is not None:
        bar.close()
    run.save_checkpoint(cfg, videos.frame_shape, states, cfg.steps)
    run.write_metrics(rows)
    run.plot_losses()
    logger.info("run %s: %d micro-batches in %.1fs", run.path, cfg.steps, time.perf_counter() - t0)
    return run.path


def _status(layer_metrics: list[tuple[int, dict[str, float]]]) -> str:
    """Per-layer loss; with the Ray engine also each stage's throughput and busy fraction."""
    text = " ".join(f"L{k + 1} {mt['loss']:.3f}" for k, mt in layer_metrics)
    stages = {int(mt["stage"]): mt for _, mt in layer_metrics if "stage" in mt}
    if stages:
        text += " | " + " ".join(f"S{s} {mt['mb_per_s']:.1f}/s {mt['busy']:.0%}"
                                 for s, mt in sorted(stages.items()))
    return text


def _engine(cfg: TrainConfig):
    if cfg.engine in ("sequential", "e2e"):
        return run_in_process
    if cfg.engine == "ray":
        from pipeline.ray_engine import run_ray  # imports Ray: only when asked for

        return run_ray
    raise ValueError(f"--engine {cfg.engine!r} is not available")
