"""The run directory: everything a run leaves behind, and the one place that knows where each piece lives.

    RUN_DIR/config.json      the resolved TrainConfig
    RUN_DIR/metrics/         one row per (micro-batch, layer), Parquet parts written as the run goes
                             ([Note: metrics that survive] in pipeline/telemetry/metrics_log.py)
    RUN_DIR/checkpoints/     barrier checkpoints, or wherever --checkpoint-uri says
                             ([Note: the checkpoint store] in pipeline/checkpoints/store.py)
    RUN_DIR/loss.png         loss and feature spread of every layer (`lamina report` redraws it)
    RUN_DIR/probe.json       after `lamina probe`
    RUN_DIR/control.json     while it trains: the control plane's address and token (pipeline/control/server.py)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow as pa

from pipeline.checkpoints import CheckpointStore
from pipeline.config import TrainConfig
from pipeline.errors import ConfigError
from pipeline.telemetry.collapse import COLLAPSE_SPREAD
from pipeline.telemetry.metrics_log import read_metrics


def default_run_dir() -> str:
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))


class RunDir:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.metrics = self.path / "metrics"

    def create(self, cfg: TrainConfig) -> RunDir:
        """Make the directory and write config.json (atomically: a reader never sees half of it)."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--run-dir {self.path} exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / "config.json.tmp"
        tmp.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        os.replace(tmp, self.path / "config.json")
        return self

    def config(self) -> TrainConfig:
        f = self.path / "config.json"
        if not f.is_file():
            raise ConfigError(f"{self.path} is not a lamina run directory (no config.json)")
        try:
            settings = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ConfigError(f"{f}: not readable JSON ({e})") from None
        return TrainConfig.from_dict(settings, str(f))

    def store(self, cfg: TrainConfig, in_shape: tuple[int, int, int] | None = None) -> CheckpointStore:
        """The run's checkpoint store; with `in_shape`, every checkpoint it completes records the config and
        frame shape, so that it can be probed or resumed on its own."""
        meta = {"config": cfg.to_dict(), "in_shape": list(in_shape)} if in_shape is not None else None
        return CheckpointStore(cfg.checkpoint_uri or str(self.path / "checkpoints"), cfg.keep_checkpoints, meta)

    def read_metrics(self) -> pa.Table:
        return read_metrics(self.metrics)

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
        axes[1].axhline(COLLAPSE_SPREAD, ls=":", color="grey", label="collapse alarm")
        axes[0].set(title="local loss (smoothed)", xlabel="micro-batch", ylabel="loss")
        axes[1].set(title="feature spread (collapse -> 0)", xlabel="micro-batch", ylabel="spread")
        axes[0].legend()
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        out = self.path / "loss.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out
