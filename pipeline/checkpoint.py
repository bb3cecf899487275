"""Barrier checkpoints: where they are stored, when one is complete, and the flags that ask for one.

[Note: barrier checkpoints]
A checkpoint is a barrier after micro-batch m (design decision 6, as Flink does after Chandy-Lamport).
In the Ray engine the barrier travels with the data: right after the driver submits stage k's
`step(m)`, it submits `snapshot(m)` to the same actor. A stage actor runs one caller's calls in
submission order ([Note: channels] in pipeline/ray_engine.py), so the snapshot sees the stage exactly
as it is after m — and while stage k writes it, stage k-1 already learns from m+1: nobody stops.

    stage 0   step(m) snap(m) step(m+1) ...
    stage 1           step(m) snap(m) step(m+1) ...
    stage 2                   step(m) snap(m) ...       complete when the last snap(m) is written

Each stage writes its own file; the driver writes the COMPLETE marker once every stage has reported
its write, and only then. Stages write (rather than return bytes to the driver) because on a cluster
the state then goes straight from the stage's node to the shared storage, in parallel, never through
the driver's memory or network link; the driver handles a few hundred bytes per checkpoint. It costs
the stages access to the storage: a local path is only right on one machine (or a shared mount); a
cluster uses a URI that `pyarrow.fs` understands (s3://, gs://, hdfs://).

Layout, `step` = micro-batches applied = the micro-batch to resume at (m + 1):

    ROOT/step-000124/stage-0.pt     stage 0's learners, ledger and RNG after micro-batch 123
    ROOT/step-000124/stage-1.pt
    ROOT/step-000124/COMPLETE       written last (tmp + move): {"step", "stages": [{"file", "bytes",
                                    "sha256"}, ...]}

Every file is written to a temporary name and moved into place, so a reader never sees half a file
under a final name (on object stores the move is a copy, which is why the marker, not the move, is what
makes a checkpoint count). A directory without COMPLETE, or whose stage files are missing or not the
size COMPLETE recorded, is never loaded; a stage also checks the sha256 when it loads its file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import torch

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or a file of a complete one does not match its record."""


# -- the ledger: which micro-batches a stage applied ---------------------------------------------------


class Ledger:
    """The micro-batches a stage applied, as sorted half-open ranges [a, b): bounded by the number of
    interruptions, not of micro-batches. A duplicate or a gap shows as a second range."""

    def __init__(self, ranges: list[list[int]] | None = None) -> None:
        self.ranges: list[list[int]] = [list(r) for r in ranges or []]

    def add(self, m: int) -> None:
        if self.ranges and self.ranges[-1][1] == m:
            self.ranges[-1][1] = m + 1
        else:
            self.ranges.append([m, m + 1])

    def applied(self) -> list[int]:
        """Every application in order (duplicates included): for tests and reports."""
        return [m for a, b in self.ranges for m in range(a, b)]

    def exactly_once(self, stop: int) -> bool:
        """True when micro-batches 0 .. stop-1 were each applied exactly once, and nothing else."""
        return self.ranges == ([[0, stop]] if stop > 0 else [])

    def __repr__(self) -> str:
        return f"Ledger({self.ranges})"


# -- the store ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageFile:
    """What a stage reports after writing its part of a checkpoint (no tensors: a control message)."""

    stage: int  # stage index
    step: int  # micro-batches applied when it was taken
    file: str  # name inside the checkpoint directory
    bytes: int  # size written
    sha256: str  # of the bytes written


@dataclass
class Checkpoint:
    """A complete checkpoint, loaded: every learner's state bottom to top, and each layer's ledger."""

    step: int  # micro-batches applied: resume at this micro-batch
    learners: list[dict]  # LocalLearner.state_dict() of every learner, bottom to top
    ledgers: list[Ledger] = field(default_factory=list)  # one per learner (its stage's ledger)


class CheckpointStore:
    """Checkpoints of one run under `uri`: a local path or any URI `pyarrow.fs.FileSystem.from_uri` reads.

    Picklable (it is rebuilt from the URI), so the driver hands it to stage actors, which write their own
    files. `keep` complete checkpoints are kept; older ones and abandoned partial ones are pruned.
    """

    def __init__(self, uri: str, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"--keep-checkpoints must be >= 1 (got {keep})")
        if "://" in uri:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(uri)
        self.uri, self.keep = uri, keep

    def __reduce__(self) -> tuple[Any, tuple[str, int]]:
        return (CheckpointStore, (self.uri, self.keep))

    def __repr__(self) -> str:
        return f"CheckpointStore({self.uri!r}, keep={self.keep})"

    def dir(self, step: int) -> str:
        return f"{self.root}/step-{step:06d}"

    # -- writing -------------------------------------------------------------------------------------

    def write_stage(self, step: int, stage: int, payload: dict) -> StageFile:
        """Write one stage's part of checkpoint `step` (tmp + move); called by the stage itself."""
        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
        name = f"stage-{stage}.pt"
        self._write(f"{self.dir(step)}/{name}", data)
        return StageFile(stage, step, name, len(data), hashlib.sha256(data).hexdigest())

    def commit(self, step: int, files: list[StageFile]) -> None:
        """Mark checkpoint `step` complete once every stage's file is there, then prune old ones."""
        stages = sorted(files, key=lambda f: f.stage)
        if [f.stage for f in stages] != list(range(len(stages))) or any(f.step != step for f in stages):
            raise CheckpointError(f"checkpoint {step}: stage files {files} do not cover every stage once")
        for f in stages:
            info = self.fs.get_file_info(f"{self.dir(step)}/{f.file}")
            if info.type != pafs.FileType.File or info.size != f.bytes:
                raise CheckpointError(f"checkpoint {step}: {f.file} is missing or not {f.bytes} bytes "
                                      f"({info.type}, {info.size})")
        record = {"step": step, "time": time.time(),
                  "stages": [{"file": f.file, "bytes": f.bytes, "sha256": f.sha256} for f in stages]}
        self._write(f"{self.dir(step)}/{MARKER}", (json.dumps(record, indent=1) + "\n").encode())
        logger.info("checkpoint %s complete (%d stages, %d bytes)", self.dir(step), len(stages),
                    sum(f.bytes for f in stages))
        self.prune()

    def _write(self, path: str, data: bytes) -> None:
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        tmp = f"{path}.tmp-{secrets.token_hex(4)}"
        with self.fs.open_output_stream(tmp) as out:
            out.write(data)
        self.fs.move(tmp, path)

    # -- reading -------------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Steps of every checkpoint directory, complete or not, oldest first."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        found = [_DIR.match(i.base_name) for i in infos if i.type == pafs.FileType.Directory]
        return sorted(int(m[1]) for m in found if m)

    def record(self, step: int) -> dict | None:
        """COMPLETE's record of checkpoint `step` if it is complete and intact (files there, sizes as
        recorded); None otherwise."""
        try:
            with self.fs.open_input_stream(f"{self.dir(step)}/{MARKER}") as f:
                record = json.loads(f.read())
        except (FileNotFoundError, OSError, ValueError):
            return None
        for s in record.get("stages", []):
            info = self.fs.get_file_info(f"{self.dir(step)}/{s['file']}")
            if info.type != pafs.FileType.File or info.size != s["bytes"]:
                logger.warning("checkpoint %s: %s is missing or truncated; ignoring this checkpoint",
                               self.dir(step), s["file"])
                return None
        return record if record.get("stages") and record.get("step") == step else None

    def complete(self) -> list[int]:
        """Steps of the complete, intact checkpoints, oldest first."""
        return [s for s in self.steps() if self.record(s) is not None]

    def latest_complete(self) -> int | None:
        """The newest complete, intact checkpoint's step, or None."""
        for step in reversed(self.steps()):
            if self.record(step) is not None:
                return step
        return None

    def read_stage(self, step: int, stage: int) -> dict:
        """One stage's payload of a complete checkpoint, its bytes checked against COMPLETE's sha256."""
        record = self.record(step)
        if record is None:
            raise CheckpointError(f"{self.dir(step)} is not a complete checkpoint")
        if stage >= len(record["stages"]):
            raise CheckpointError(f"{self.dir(step)} has {len(record['stages'])} stages, not stage {stage}")
        entry = record["stages"][stage]
        with self.fs.open_input_stream(f"{self.dir(step)}/{entry['file']}") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"{self.dir(step)}/{entry['file']}: sha256 does not match COMPLETE")
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)

    def load(self, step: int) -> Checkpoint:
        """Every stage of complete checkpoint `step`, merged bottom to top (independent of how the run
        grouped layers into stages)."""
        record = self.record(step)
        if record is None:
            raise CheckpointError(f"{self.dir(step)} is not a complete checkpoint")
        learners: list[dict] = []
        ledgers: list[Ledger] = []
        for k in range(len(record["stages"])):
            payload = self.read_stage(step, k)
            learners += payload["learners"]
            ledgers += [Ledger(payload["ledger"]) for _ in payload["learners"]]
        return Checkpoint(step, learners, ledgers)

    def load_latest(self) -> Checkpoint | None:
        """The newest complete checkpoint that loads; an unreadable one is skipped with a warning."""
        for step in reversed(self.complete()):
            try:
                return self.load(step)
            except (CheckpointError, OSError, RuntimeError) as e:
                logger.warning("checkpoint %s unusable, trying an older one: %s", self.dir(step), e)
        return None

    # -- pruning -------------------------------------------------------------------------------------

    def prune(self) -> None:
        """Keep the newest `keep` complete checkpoints; delete older ones, and partial directories older
        than the newest complete one (abandoned: a failure or a hard stop interrupted them)."""
        steps = self.steps()
        complete = [s for s in steps if self.record(s) is not None]
        if not complete:
            return
        kept = set(complete[-self.keep:])
        for s in steps:
            if s not in kept and s < complete[-1]:
                self.fs.delete_dir(self.dir(s))


def stage_payload(stage: int, first: int, last: int, step: int, learners: list[dict], ledger: Ledger) -> dict:
    """What a stage file holds: its learners' states (tensors on the cpu), its ledger and RNG state."""
    return {"stage": stage, "first": first, "last": last, "step": step, "learners": learners,
            "ledger": [list(r) for r in ledger.ranges], "rng": torch.get_rng_state()}


# -- asking for checkpoints and stops ------------------------------------------------------------------


class RunControl:
    """Requests to a running engine, set from a signal handler or another thread, read by the engine
    between micro-batches. Plain flags: setting one is safe anywhere, including in a signal handler."""

    def __init__(self) -> None:
        self.checkpoint_requested = False  # take a barrier checkpoint as soon as possible
        self.stop_requested = False  # stop handing out micro-batches, drain, write a final checkpoint
        self.stopped_at: int | None = None  # set by the engine: micro-batches applied when it stopped early

    def request_checkpoint(self) -> None:
        self.checkpoint_requested = True

    def request_stop(self) -> None:
        self.stop_requested = True


@dataclass
class Checkpointing:
    """How an engine checkpoints: where, how often, and the run's control flags."""

    store: CheckpointStore | None  # None: no checkpoints (and no recovery in the Ray engine)
    every: int = 0  # a barrier after every `every` micro-batches; 0: only on request, at stops and the end
    control: RunControl = field(default_factory=RunControl)
    ledgers: list[Ledger] | None = None  # per learner, what the loaded states had applied (resume)

    def due(self, m: int) -> bool:
        """Is there a barrier after micro-batch m (periodic, or requested: the request is consumed)?"""
        if self.control.checkpoint_requested:
            self.control.checkpoint_requested = False
            return True
        return self.every > 0 and (m + 1) % self.every == 0
