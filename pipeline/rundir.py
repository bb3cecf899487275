"""The run directory: resolved config, per-step per-layer metrics (Parquet), checkpoint, loss plot.

    RUN_DIR/config.json      the resolved TrainConfig
    RUN_DIR/metrics.parquet  one row per (micro-batch, layer): loss, pos, neg, over, spread, time
    RUN_DIR/checkpoint.pt    every learner's state (weights, optimizer, steps) and the config, at the end
    RUN_DIR/checkpoints/     barrier checkpoints during the run (pipeline/checkpoint.py): resume, recovery
    RUN_DIR/loss.png         the loss curve of every layer
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config import TrainConfig

METRIC_NAMES = ("loss", "pos", "neg", "over", "spread")


def default_run_dir() -> str:
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))


def _atomic_write(path: Path, write) -> None:
    """Write to a temporary sibling, then rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def create(self, cfg: TrainConfig) -> RunDir:
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.path / "config.json",
                      lambda p: p.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n"))
        return self

    def config(self) -> TrainConfig:
        f = self.path / "config.json"
        if not f.is_file():
            raise FileNotFoundError(f"{self.path} is not a lamina run directory (no config.json)")
        return TrainConfig.from_dict(json.loads(f.read_text()))

    def save_checkpoint(self, cfg: TrainConfig, in_shape: tuple[int, int, int], learners: list[dict],
                        step: int) -> None:
        state = {"config": cfg.to_dict(), "in_shape": in_shape, "learners": learners, "step": step}
        _atomic_write(self.path / "checkpoint.pt", lambda p: torch.save(state, p))

    def load_checkpoint(self) -> dict:
        f = self.path / "checkpoint.pt"
        if not f.is_file():
            raise FileNotFoundError(f"{self.path}: no checkpoint.pt (did the run finish?)")
        return torch.load(f, map_location="cpu", weights_only=False)

    def write_metrics(self, rows: list[dict]) -> Path:
        f = self.path / "metrics.parquet"
        table = pa.Table.from_pylist(rows, schema=pa.schema(
            [("step", pa.int64()), ("layer", pa.int32()), ("time", pa.float64())]
            + [(name, pa.float64()) for name in METRIC_NAMES]))
        _atomic_write(f, lambda p: pq.write_table(table, p))
        return f

    def previous_metrics(self, before: int) -> list[dict]:
        """Rows of metrics.parquet for micro-batches below `before` (what a resumed run keeps); [] if none.
        A run stopped hard (no metrics written) loses its rows, not its weights."""
        if not (self.path / "metrics.parquet").is_file():
            return []
        return [r for r in self.read_metrics().to_pylist() if r["step"] < before]

    def read_metrics(self) -> pa.Table:
        return pq.read_table(self.path / "metrics.parquet")

    def plot_losses(self) -> Path:
        """loss.png: per layer, the local loss (smoothed) and the feature spread against micro-batches."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        table = self.read_metrics().to_pydict()
        steps, layers = np.array(table["step"]), np.array(table["layer"])
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for k in sorted(set(layers.tolist())):
            sel = layers == k
            for ax, name in zip(axes, ("loss", "spread"), strict=True):
                y = np.array(table[name])[sel]
                w = max(1, len(y) // 50)
                smooth = np.convolve(y, np.ones(w) / w, mode="valid")
                ax.plot(steps[sel][w - 1:], smooth, label=f"layer {k + 1}")
        axes[0].set(title="local loss", xlabel="micro-batch")
        axes[1].set(title="feature spread (collapse -> 0)", xlabel="micro-batch")
        axes[0].legend()
        fig.tight_layout()
        out = self.path / "loss.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out
