"""A training run: source -> engine -> run directory. No Ray here; the Ray engine plugs in.

The run keeps its record as it goes: metrics are appended to RUN_DIR/metrics/ every few seconds and
checkpoints are barriers in the store, so a run that fails, is stopped or is killed keeps both, and
`probe`, `report` and `--resume` work on it like on a finished one.

Stops and resumes: with `handle_signals` (the CLI), the first Ctrl-C or SIGTERM asks the engine to stop
handing out micro-batches, drain, write a final checkpoint and return (the CLI then exits 0 and prints how
to resume); a second Ctrl-C raises KeyboardInterrupt at once, leaving the last complete checkpoint as it
was. SIGUSR1 asks for a checkpoint; the gRPC control plane's Checkpoint and Stop rpcs ask for a checkpoint
and a graceful stop (`lamina control --run-dir DIR checkpoint|stop|status`). `resume(RUN_DIR)` continues from the last complete
checkpoint with the run's own config; the source replays micro-batch m exactly, so the result is the
uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import FrameType
from typing import Any

from pipeline import storage
from pipeline.checkpoints import Checkpoint
from pipeline.config import TrainConfig
from pipeline.control import RunControl
from pipeline.control import control_pb2 as pb
from pipeline.control.server import serving
from pipeline.engines import EngineResult, engine_for, prepare
from pipeline.engines.base import BarrierHealth
from pipeline.errors import CheckpointError, ConfigError
from pipeline.flags import option
from pipeline.rundir import RunDir, default_run_dir
from pipeline.sources import Source, open_source
from pipeline.stage import StepReport
from pipeline.telemetry.collapse import CollapseAlarm
from pipeline.telemetry.metrics_log import MetricsLog
from pipeline.telemetry.progress import Progress

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a run ended."""

    path: Path | str  # the run directory: its path, or the URI it lives at
    stopped_at: int | None  # micro-batches applied when it was stopped early (checkpointed); None: finished


def train(cfg: TrainConfig, progress: bool = True, handle_signals: bool = False,
          control: RunControl | None = None, source: Source | None = None) -> Outcome:
    """Train as `cfg` says, in a new run directory (an existing run is continued with `resume`). `source`:
    micro-batches from elsewhere than `cfg.data` (`lamina serve`'s live ingest, pipeline/ingest/)."""
    # Paths as the run will find them again: a resume from another working directory must too.
    uri = cfg.checkpoint_uri
    cfg = dataclasses.replace(cfg, run_dir=cfg.run_dir or default_run_dir(), data=_anchored(cfg.data),
                              checkpoint_uri=uri if not uri or "://" in uri else os.path.abspath(uri))
    store = RunDir(cfg.run_dir).store(cfg)
    if RunDir(cfg.run_dir).exists():
        if RunDir(cfg.run_dir).read_metrics().num_rows or store.steps():
            raise ConfigError(f"--run-dir {cfg.run_dir} already holds a run: continue it with "
                              f"`lamina train --resume {cfg.run_dir}`, or choose another --run-dir")
        logger.warning("%s holds the config of a run that never trained (refused, or stopped before its "
                       "first micro-batch): starting afresh", cfg.run_dir)
    if store.steps():  # another run's checkpoints: a recovery would restore them, pruning would delete them
        raise ConfigError(f"--checkpoint-uri {store.uri} already holds checkpoints (of another run?): give this "
                          f"run a store of its own")
    return _run(cfg, None, progress, handle_signals, control, source)


def resume(run_dir: str, progress: bool = True, handle_signals: bool = False,
           control: RunControl | None = None, given: dict[str, Any] | None = None,
           source: Source | None = None) -> Outcome:
    """Continue the run in `run_dir` from its last complete checkpoint, with the run's own config.

    `given`: settings the user gave with the resume (field name -> value). `steps` changes the run's length;
    any other setting must equal the run's, since the checkpoint was trained with it.
    """
    cfg = dataclasses.replace(RunDir(run_dir).config(), run_dir=run_dir)
    given = {k: v for k, v in (given or {}).items() if k != "run_dir"}
    asked = dataclasses.replace(cfg, **given)  # normalised as the run's own was (one --loss-grid for all...)
    differ = [f"{option(k)} {getattr(asked, k)!r} (the run has {getattr(cfg, k)!r})" for k in given
              if k != "steps" and getattr(asked, k) != getattr(cfg, k)]
    if differ:
        raise ConfigError(f"--resume continues {run_dir} with its own settings; only --steps may change, and "
                          f"these differ: {'; '.join(differ)}")
    steps = asked.steps
    cfg = dataclasses.replace(cfg, steps=steps)
    store = RunDir(run_dir).store(cfg)
    checkpoint = store.load_latest()
    if checkpoint is None and store.marked():
        raise CheckpointError(f"{run_dir}: none of its {len(store.marked())} checkpoints in {store.uri} can be "
                              f"used (each was refused, see above); start a new run with another --run-dir")
    if checkpoint is None:
        logger.warning("%s has no checkpoint yet: starting it from the beginning", run_dir)
    elif checkpoint.step > steps:
        raise ConfigError(f"--steps {steps}: {run_dir} has already applied {checkpoint.step} micro-batches")
    else:
        logger.info("resuming %s at micro-batch %d of %d", run_dir, checkpoint.step, steps)
    return _run(cfg, checkpoint, progress, handle_signals, control, source)


def _run(cfg: TrainConfig, checkpoint: Checkpoint | None, progress: bool, handle_signals: bool,
         control: RunControl | None, source: Source | None = None) -> Outcome:
    if source is None:
        source = open_source(cfg.data, cfg.size, cfg.clips, cfg.clip_len, cfg.seed, cfg.stride, cfg.memory_budget)
    spec = cfg.learner_spec(source.frame_shape)
    start = checkpoint.step if checkpoint is not None else 0
    if start < cfg.steps:  # before our signal handlers and gRPC server (Ray installs and forks its own)
        prepare(cfg, _start_log(cfg))
    run = RunDir(cfg.run_dir).create(cfg)
    store = run.store(cfg, source.frame_shape)
    logger.info("run %s: %s on %s, %d layers, engine %s", run, cfg.objective, source.name, cfg.n_layers,
                cfg.engine)
    control = control or RunControl()
    health = BarrierHealth(cfg.tolerable_checkpoint_failures)
    log = MetricsLog(run.metrics, restart=start)
    bar = Progress(cfg.steps, f"train {cfg.engine}", start=start) if progress else None
    alarm = CollapseAlarm()
    latest: list[StepReport] = []  # the last micro-batch's reports: the control plane's Status
    done = [start]
    t0 = time.perf_counter()

    def on_step(m: int, reports: list[StepReport]) -> None:
        log.append(reports)
        for report in reports:
            for layer in report.layers:
                alarm.update(layer.layer, layer.spread)
        latest[:] = reports
        done[0] = m + 1
        if bar is not None:
            bar.update(m + 1, " ".join(filter(None, (_status(reports), alarm.status()))))

    def status() -> pb.StatusReply:
        rate = (done[0] - start) / max(time.perf_counter() - t0, 1e-9)
        layers = [pb.LayerStatus(layer=lr.layer, loss=lr.loss, spread=lr.spread) for r in latest for lr in r.layers]
        try:
            last = store.latest_complete()
        except OSError:
            last = None
        stages = [pb.StageStatus(stage=r.stage, layers=[lr.layer for lr in r.layers], micro_batch=r.micro_batch,
                                 microbatches_per_s=r.rate, busy=r.busy) for r in latest]
        return pb.StatusReply(run_dir=run.location, engine=cfg.engine, steps_done=done[0], steps_total=cfg.steps,
                              microbatches_per_s=rate, layers=layers, stopping=control.stop_requested,
                              checkpoint_failures=health.failed, last_checkpoint=-1 if last is None else last,
                              stages=stages)

    result: EngineResult | None = None
    if bar is not None:
        bar.__enter__()  # from here on, log records print above the progress line
    try:
        if start >= cfg.steps:
            logger.info("run %s: already finished (%d micro-batches)", run, start)
        else:
            with _signals(control, handle_signals), (serving(run.path, control, status) if handle_signals
                                                     else nullcontext()):
                result = engine_for(cfg.engine)(cfg, spec, source, on_step, resume=checkpoint, store=store,
                                                control=control, health=health)
    finally:  # a failed or interrupted run keeps its record too
        log.flush()
        if bar is not None:
            bar.close()
        if run.read_metrics().num_rows:
            run.plot_losses()
    stopped = result.stopped_at if result is not None else None
    recovered = f", {result.recoveries} lost stage(s) recovered" if result is not None and result.recoveries else ""
    logger.info("run %s: %s in %.1fs%s", run, f"stopped after {stopped} micro-batches" if stopped is not None
                else f"{cfg.steps} micro-batches", time.perf_counter() - t0, recovered)
    return Outcome(run.location if storage.is_uri(run.location) else run.path, stopped)


def _start_log(cfg: TrainConfig) -> Path | None:
    """Where Ray's start-up output goes: RUN_DIR/ray-start.log for the Ray engine and a local run directory."""
    if cfg.engine != "ray" or storage.is_uri(cfg.run_dir):
        return None
    path = Path(cfg.run_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--run-dir {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path / "ray-start.log"


def _anchored(spec: str) -> str:
    """A data spec `KIND:PATH[,OPTIONS]` with its path made absolute (a URI, or no path, stays as it is)."""
    kind, _, rest = spec.partition(":")
    path, comma, options = rest.partition(",")
    if kind not in ("npz", "moving-mnist", "video", "parquet") or not path or "://" in path:
        return spec
    return f"{kind}:{os.path.abspath(os.path.expanduser(path))}{comma}{options}"


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


def _status(reports: list[StepReport]) -> str:
    """Per-layer loss; with several stages also each stage's throughput and busy fraction."""
    text = " ".join(f"L{lr.layer + 1} {lr.loss:.3f}" for r in reports for lr in r.layers)
    if len(reports) > 1:
        text += " | " + " ".join(f"S{r.stage} {r.rate:.1f}/s {r.busy:.0%}{' gives way' if r.giving_way else ''}"
                                 for r in reports)
    return text
