"""The driver of a training run: data -> engine -> run directory. No Ray here; the Ray engine plugs in.

Stops and resumes: with `handle_signals` (the CLI), the first Ctrl-C or SIGTERM asks the engine to stop
handing out micro-batches, drain, write a final checkpoint and return (the CLI then exits 0 and prints how
to resume); a second Ctrl-C raises KeyboardInterrupt at once, leaving the last complete checkpoint as it
was. SIGUSR1 asks for a checkpoint, and so do the gRPC control plane's Checkpoint and Stop rpcs
(`lamina control --run-dir DIR checkpoint|stop|status`). `resume(RUN_DIR)` continues from the last complete checkpoint with the
run's own config; micro-batch m is a pure function of (seed, m), so the result is the uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from pipeline import control_pb2 as pb
from pipeline.checkpoint import Checkpoint, Checkpointing, CheckpointStore, RunControl
from pipeline.collapse import CollapseAlarm
from pipeline.config import TrainConfig
from pipeline.control import ControlHandlers, ControlServer
from pipeline.data import ClipSampler, load_videos
from pipeline.engines import run_in_process
from pipeline.progress import Progress
from pipeline.rundir import RunDir, default_run_dir

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a run ended."""

    path: Path  # the run directory
    stopped_at: int | None  # micro-batches applied when it was stopped early (checkpointed); None: finished


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Train as `cfg` says; returns the run directory (config, metrics.parquet, checkpoint.pt, loss.png)."""
    return train_run(cfg, progress).path


def resume(run_dir: str, progress: bool = True, handle_signals: bool = True,
           control: RunControl | None = None) -> Outcome:
    """Continue the run in `run_dir` from its last complete checkpoint, with the run's own config."""
    cfg = RunDir(run_dir).config()
    cfg = dataclasses.replace(cfg, run_dir=run_dir)
    ckpt = store_of(cfg).load_latest()
    if ckpt is None:
        logger.warning("%s has no complete checkpoint: starting it from the beginning", run_dir)
    else:
        logger.info("resuming %s at micro-batch %d", run_dir, ckpt.step)
    return train_run(cfg, progress, handle_signals, control, ckpt)


def store_of(cfg: TrainConfig) -> CheckpointStore:
    return CheckpointStore(cfg.checkpoint_uri or str(Path(cfg.run_dir) / "checkpoints"), cfg.keep_checkpoints)


def train_run(cfg: TrainConfig, progress: bool = True, handle_signals: bool = False,
              control: RunControl | None = None, checkpoint: Checkpoint | None = None) -> Outcome:
    """Train as `cfg` says (from `checkpoint` when resuming); checkpoints to `store_of(cfg)`."""
    videos = load_videos(cfg.data, cfg.size, "train")
    sampler = ClipSampler(videos, cfg.clips, cfg.clip_len, cfg.seed, cfg.stride)
    spec = cfg.learner_spec(videos.frame_shape)
    # Resolved here so that the config on disk and the engine (the Ray engine's run id) name the same run.
    cfg = dataclasses.replace(cfg, run_dir=cfg.run_dir or default_run_dir())
    run = RunDir(cfg.run_dir).create(cfg)
    logger.info("run %s: %s on %s (%d sequences x %d frames), %d layers, engine %s", run.path,
                cfg.objective, videos.name, videos.frames.shape[0], videos.frames.shape[1], cfg.n_layers,
                cfg.engine)
    start = checkpoint.step if checkpoint is not None else 0
    checkpointing = Checkpointing(store_of(cfg), cfg.checkpoint_every, control or RunControl(),
                                  checkpoint.ledgers if checkpoint is not None else None)
    # A resumed run keeps the metrics it wrote before (those of micro-batches the checkpoint covers).
    rows: list[dict] = run.previous_metrics(start) if checkpoint is not None else []
    bar = Progress(cfg.steps, f"train {cfg.engine}") if progress else None
    t0 = time.perf_counter()
    alarm = CollapseAlarm()
    latest: dict[int, dict[str, float]] = {}  # per layer, the last metrics: for the control plane's Status
    done = [start]

    def on_step(m: int, layer_metrics: list[tuple[int, dict[str, float]]]) -> None:
        now = time.perf_counter() - t0
        for layer, metrics in layer_metrics:
            rows.append({"step": m, "layer": layer, "time": now, **metrics})
            alarm.update(layer, metrics["spread"])
            latest[layer] = metrics
        done[0] = m + 1
        if bar is not None:
            bar.update(m + 1, " ".join(filter(None, (_status(layer_metrics), alarm.status()))))

    def status() -> pb.StatusReply:
        rate = (done[0] - start) / max(time.perf_counter() - t0, 1e-9)
        layers = [pb.LayerStatus(layer=k, loss=mt["loss"], spread=mt["spread"]) for k, mt in sorted(latest.items())]
        return pb.StatusReply(run_dir=str(run.path), engine=cfg.engine, steps_done=done[0], steps_total=cfg.steps,
                              microbatches_per_s=rate, layers=layers,
                              stopping=checkpointing.control.stop_requested)

    states = checkpoint.learners if checkpoint is not None else None
    if start >= cfg.steps:
        logger.info("run %s: already finished (%d micro-batches)", run.path, start)
    else:
        with _signals(checkpointing.control, handle_signals), \
                _control_plane(run.path, checkpointing.control, status, handle_signals):
            states = _engine(cfg)(cfg, spec, sampler, on_step, start, states, checkpointing)
    if bar is not None:
        bar.close()
    stopped = checkpointing.control.stopped_at
    assert states is not None
    if stopped is None:
        run.save_checkpoint(cfg, videos.frame_shape, states, cfg.steps)
    run.write_metrics(rows)
    run.plot_losses()
    logger.info("run %s: %s in %.1fs", run.path,
                f"stopped after {stopped} micro-batches" if stopped is not None else f"{cfg.steps} micro-batches",
                time.perf_counter() - t0)
    return Outcome(run.path, stopped)


@contextmanager
def _control_plane(run_dir: Path, control: RunControl, status: Callable[[], pb.StatusReply],
                   enabled: bool) -> Iterator[None]:
    """Serve the gRPC control plane (pipeline/control.py) on loopback while the engine runs."""
    if not enabled:
        yield
        return

    def checkpoint() -> tuple[bool, str]:
        control.request_checkpoint()
        return True, "a barrier checkpoint follows the next micro-batch"

    def stop() -> bool:
        if control.stop_requested:
            return False
        control.request_stop()
        return True

    server = ControlServer(run_dir, ControlHandlers(status, checkpoint, stop)).start()
    try:
        yield
    finally:
        server.stop()


@contextmanager
def _signals(control: RunControl, enabled: bool) -> Iterator[None]:
    """SIGINT / SIGTERM: a graceful stop, then (SIGINT again) KeyboardInterrupt; SIGUSR1: a checkpoint."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        if control.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logger.warning("%s: stopping after the micro-batches in flight and a checkpoint "
                       "(Ctrl-C again to exit at once)", signal.Signals(signum).name)
        control.request_stop()

    def checkpoint(signum: int, frame: FrameType | None) -> None:
        logger.info("SIGUSR1: checkpoint requested")
        control.request_checkpoint()

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGUSR1, checkpoint)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


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
