"""`lamina serve`: the Ray pipeline trained on a live ingest — a training run whose source is a gRPC server.

    lamina serve [training flags] [--listen 127.0.0.1:PORT] [--token-file F] [--tls-cert F --tls-key F]
                 [--when-full block|drop-oldest] [--buffer-clips N] [--memory-clips N] [--negative-gap F]

It is `lamina train` (same run directory, checkpoints, metrics, control plane, signals) with the live
source (source.py) instead of a data spec; `--steps` bounds the run, `lamina control stop` or SIGTERM ends
it after a final checkpoint. The token is read from `--token-file` or from $LAMINA_INGEST_TOKEN; with
neither, a fresh one is made. RUN_DIR/ingest.json (0600) says where the server listens (and the token it
made, if it made one).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import storage
from pipeline.config import TrainConfig
from pipeline.control import RunControl
from pipeline.control.auth import write_private
from pipeline.engines import prepare
from pipeline.errors import ConfigError
from pipeline.ingest.buffer import WHEN_FULL, ClipBuffer
from pipeline.ingest.server import IngestServer
from pipeline.ingest.source import LiveSource
from pipeline.ingest.stats import IngestStats
from pipeline.rundir import RunDir, default_run_dir

if TYPE_CHECKING:
    from pipeline.run import Outcome

logger = logging.getLogger(__name__)

TOKEN_ENV = "LAMINA_INGEST_TOKEN"
INGEST_FILE = "ingest.json"


@dataclass(frozen=True)
class ServeOptions:
    listen: str = "127.0.0.1:0"  # HOST:PORT the ingest binds (port 0: any free one; see RUN_DIR/ingest.json)
    token_file: str | None = None  # the bearer token's file; None: $LAMINA_INGEST_TOKEN, else a fresh token
    tls_cert: str | None = None  # PEM certificate chain: TLS with tls_key
    tls_key: str | None = None  # PEM private key
    when_full: str = "block"  # what a full buffer does to a producer: block (flow control) or drop-oldest
    buffer_clips: int = 64  # clips the buffer holds before it is full
    memory_clips: int = 256  # past clips kept as negatives ([Note: live micro-batches])
    negative_gap: int = 0  # frames between same-stream clips of one micro-batch (0: 4 x --clip-len)
    channels: int = 3  # 3: RGB, 1: grey; pushed frames are converted
    max_message_mb: float = 4.0  # a larger Push message ends its call with RESOURCE_EXHAUSTED
    max_calls: int = 64  # concurrent calls; more are refused with RESOURCE_EXHAUSTED
    linger: float = 0.5  # seconds a micro-batch waits for fresh clips of more streams

    def __post_init__(self) -> None:
        host, _, port = self.listen.rpartition(":")
        checks = [
            (bool(host) and port.isdigit() and int(port) < 65536, "--listen must be HOST:PORT", self.listen),
            (self.when_full in WHEN_FULL, f"--when-full must be one of {list(WHEN_FULL)}", self.when_full),
            (self.buffer_clips >= 1, "--buffer-clips must be >= 1", self.buffer_clips),
            (self.memory_clips >= 0, "--memory-clips must be >= 0", self.memory_clips),
            (self.negative_gap >= 0, "--negative-gap must be >= 0", self.negative_gap),
            (self.channels in (1, 3), "--channels must be 1 or 3", self.channels),
            (0 < self.max_message_mb <= 1024, "--max-message-mb must be in (0, 1024]", self.max_message_mb),
            (self.max_calls >= 1, "--max-calls must be >= 1", self.max_calls),
            ((self.tls_cert is None) == (self.tls_key is None), "--tls-cert and --tls-key go together",
             (self.tls_cert, self.tls_key)),
        ]
        for ok, message, value in checks:
            if not ok:
                raise ConfigError(f"{message} (got {value!r})")


def read_token(token_file: str | None, env: str = TOKEN_ENV) -> str | None:
    """The token from a file (its first line) or the environment; None when neither gives one."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip().splitlines()[0].strip() if Path(token_file).stat().st_size else ""
        except (OSError, IndexError) as e:
            raise ConfigError(f"--token-file {token_file}: cannot read it ({e})") from None
        if not token:
            raise ConfigError(f"--token-file {token_file} is empty")
        return token
    return os.environ.get(env) or None


def _read(path: str | None, flag: str) -> bytes:
    assert path is not None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{flag} {path}: {e}") from None


class Ingest:
    """The live ingest of one run: buffer, server, source and stats, started and stopped together."""

    def __init__(self, cfg: TrainConfig, opts: ServeOptions, token: str, control: RunControl,
                 start: int = 0, record_assignments: bool = False) -> None:
        self.stats = IngestStats()
        gap = opts.negative_gap or 4 * cfg.clip_len
        self.buffer = ClipBuffer(cfg.clips, opts.buffer_clips, opts.when_full, opts.memory_clips, gap, opts.linger,
                                 cfg.seed)
        store = RunDir(cfg.run_dir).store(cfg)
        self.source = LiveSource(self.buffer, store, (opts.channels, cfg.size, cfg.size), self.stats,
                                 stopping=lambda: control.stop_requested, start=start,
                                 record_assignments=record_assignments)
        host, _, port = opts.listen.rpartition(":")
        tls = (_read(opts.tls_key, "--tls-key"), _read(opts.tls_cert, "--tls-cert")) if opts.tls_cert else None
        self.server = IngestServer(self.buffer, self.stats, token, clip_len=cfg.clip_len, size=cfg.size,
                                   channels=opts.channels, host=host, port=int(port), tls=tls,
                                   max_message_bytes=int(opts.max_message_mb * (1 << 20)), max_calls=opts.max_calls)

    def start(self, run_id: str) -> Ingest:
        self.server.start()
        self._gauges = self.stats.publish(run_id)
        return self

    def stop(self) -> None:
        self._gauges.set()
        self.server.stop()
        self.source.truncate()  # what the run's final checkpoint covers


def serve(cfg: TrainConfig, opts: ServeOptions, handle_signals: bool = True, resume_dir: str | None = None,
          given: dict[str, Any] | None = None) -> Outcome:
    """Train `cfg` on the live ingest until --steps micro-batches or a stop; the run's Outcome. With
    `resume_dir`, continue that serve run instead (its own config; `given`: the flags given, as for
    `lamina train --resume`): the micro-batches its log holds beyond the checkpoint are replayed first,
    then the ingest takes new frames ([Note: the ingest write-ahead log])."""
    from pipeline.run import resume, train

    if resume_dir is not None:
        cfg = dataclasses.replace(RunDir(resume_dir).config(), run_dir=resume_dir)
        if not cfg.data.startswith("live:"):
            raise ConfigError(f"--resume {resume_dir} is a run of --data {cfg.data}, not a lamina serve run: "
                              f"continue it with lamina train --resume")
        channels = dict(kv.partition("=")[::2] for kv in cfg.data[5:].split(",")).get("channels", "3")
        opts = dataclasses.replace(opts, channels=int(channels))  # the network's input, as the run trained it
    if cfg.engine != "ray":
        logger.info("lamina serve with --engine %s: the live ingest feeds it like the Ray pipeline", cfg.engine)
    if storage.is_uri(cfg.run_dir):
        raise ConfigError("lamina serve keeps RUN_DIR/ingest.json next to the run: give --run-dir as a path")
    if resume_dir is None:
        cfg = dataclasses.replace(cfg, run_dir=cfg.run_dir or default_run_dir(), data=f"live:channels={opts.channels}")
    token = read_token(opts.token_file)
    made = token is None
    token = token or secrets.token_urlsafe(32)
    if cfg.engine == "ray":  # Ray forks its daemons before any gRPC thread runs ([Note] in pipeline/engines)
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        prepare(cfg, Path(cfg.run_dir) / "ray-start.log")
    control = RunControl()
    ingest = Ingest(cfg, opts, token, control).start(Path(cfg.run_dir).name)
    info = {"address": ingest.server.address, "pid": os.getpid(), "tls": opts.tls_cert is not None}
    if made:
        info["token"] = token
    write_private(Path(cfg.run_dir) / INGEST_FILE, json.dumps(info))
    print(f"ingest listening on {ingest.server.address} (run {cfg.run_dir}; "
          f"{'token in ' + str(Path(cfg.run_dir) / INGEST_FILE) if made else 'token as given'})", flush=True)
    try:
        if resume_dir is not None:
            return resume(resume_dir, handle_signals=handle_signals, control=control, given=given,
                          source=ingest.source)
        return train(cfg, handle_signals=handle_signals, control=control, source=ingest.source)
    finally:
        ingest.stop()
        (Path(cfg.run_dir) / INGEST_FILE).unlink(missing_ok=True)
