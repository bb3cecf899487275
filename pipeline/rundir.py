"""The run directory: everything a run leaves behind, and the one place that knows where each piece lives.

    RUN_DIR/config.json      the resolved TrainConfig
    RUN_DIR/metrics/         one row per (micro-batch, layer), Parquet parts written as the run goes
                             ([Note: metrics that survive] in pipeline/telemetry/metrics_log.py)
    RUN_DIR/checkpoints/     barrier checkpoints, or wherever --checkpoint-uri says
                             ([Note: the checkpoint store] in pipeline/checkpoints/store.py)
    RUN_DIR/loss.png         loss and feature spread of every layer (`lamina report` redraws it)
    RUN_DIR/probe.json       after `lamina probe`
    RUN_DIR/control.json     while it trains: the control plane's address and token (pipeline/control/server.py)

RUN_DIR is a path or a pyarrow.fs URI ([Note: shared storage] in pipeline/storage.py). At a URI the durable
parts (config.json, metrics/, checkpoints/ and loss.png) are written through pyarrow.fs and outlive the
cluster; a `file://` URI is a local directory declared shared. control.json is only ever for this machine
(the control plane listens on loopback): for a run directory in object storage it goes to a scratch
directory here, `path`, which the run logs.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline import storage
from pipeline.checkpoints import CheckpointStore
from pipeline.config import TrainConfig
from pipeline.errors import ConfigError
from pipeline.telemetry.collapse import COLLAPSE_SPREAD
from pipeline.telemetry.metrics_log import read_metrics

MAX_CONFIG = 1 << 20  # bytes: a config.json larger than this was not written by lamina


def default_run_dir() -> str:
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))


def checkpoint_location(cfg: TrainConfig, run_dir: str | None = None) -> str:
    """Where a run's checkpoint store is: --checkpoint-uri, else RUN_DIR/checkpoints (RUN_DIR: `run_dir`, by
    default the config's)."""
    return cfg.checkpoint_uri or storage.join(cfg.run_dir if run_dir is None else run_dir, "checkpoints")


class RunDir:
    """One run's directory at `location`, a path or a pyarrow.fs URI.

    `location` is as given (what messages and `--resume` show); `path` is the directory on this machine:
    the location itself for a path or a `file://` URI, a scratch directory for object storage.
    """

    def __init__(self, location: str | os.PathLike) -> None:
        self.location = os.fspath(location)
        try:
            self.fs, self.root = storage.open_location(self.location)
        except ValueError as e:
            raise ConfigError(f"--run-dir: {e}") from None
        self.remote = not isinstance(self.fs, pafs.LocalFileSystem)  # object storage: nothing of it is here
        if not storage.is_uri(self.location):
            self.path = Path(self.location)
        elif not self.remote:
            self.path = Path(self.root)
        else:
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.location.partition("?")[0])[-120:]
            self.path = Path(tempfile.gettempdir()) / "lamina-runs" / slug
        self.metrics = storage.join(self.location, "metrics")

    def __str__(self) -> str:
        return self.location

    def exists(self) -> bool:
        """Whether a run lives here already (its config.json is there)."""
        return self.fs.get_file_info(f"{self.root}/config.json").type == pafs.FileType.File

    def create(self, cfg: TrainConfig) -> RunDir:
        """Make the directory and write config.json (atomically: a reader never sees half of it)."""
        if self.fs.get_file_info(self.root).type == pafs.FileType.File:
            raise ConfigError(f"--run-dir {self.location} exists and is not a directory")
        self.fs.create_dir(self.root, recursive=True)
        self.write("config.json", (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
        if self.remote:
            self.path.mkdir(parents=True, exist_ok=True)  # for control.json
        return self

    def config(self) -> TrainConfig:
        where = storage.join(self.location, "config.json")
        if not self.exists():
            raise ConfigError(f"{self.location} is not a lamina run directory (no config.json)")
        try:
            with self.fs.open_input_stream(f"{self.root}/config.json") as f:
                text = f.read(MAX_CONFIG + 1)
            if len(text) > MAX_CONFIG:
                raise ValueError(f"larger than {MAX_CONFIG} bytes")
            settings = json.loads(text)
        except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise ConfigError(f"{where}: not readable JSON ({e})") from None
        return TrainConfig.from_dict(settings, where)

    def store(self, cfg: TrainConfig, in_shape: tuple[int, int, int] | None = None) -> CheckpointStore:
        """The run's checkpoint store; with `in_shape`, every checkpoint it completes records the config and
        frame shape, so that it can be probed or resumed on its own."""
        meta = {"config": cfg.to_dict(), "in_shape": list(in_shape)} if in_shape is not None else None
        return CheckpointStore(checkpoint_location(cfg, self.location), cfg.keep_checkpoints, meta)

    def write(self, name: str, data: bytes) -> None:
        """RUN_DIR/name, written under a temporary name and moved into place (here or at the URI)."""
        tmp = f"{self.root}/{name}.tmp-{secrets.token_hex(4)}"
        with self.fs.open_output_stream(tmp) as out:
            out.write(data)
        self.fs.move(tmp, f"{self.root}/{name}")

    def read_metrics(self) -> pa.Table:
        return read_metrics(self.metrics)

    def plot_losses(self) -> Path | str:
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
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        plt.close(fig)
        self.write("loss.png", png.getvalue())
        return storage.join(self.location, "loss.png") if storage.is_uri(self.location) else self.path / "loss.png"
