"""The checkpoint store: the one checkpoint format of a run, written by the stages, read by everything.

[Note: the checkpoint store]
Barriers ([Note: barrier checkpoints] in pipeline/schedule.py) make every stage write its own part of
checkpoint `step` (micro-batches applied = the micro-batch to resume at); the driver marks it complete once
every part is there. `--resume`, stage-failure recovery, `probe`, `report` and `study` all read the newest
complete one, so a run that was stopped, failed or killed can be resumed and probed like a finished one.

    ROOT/step-000124/stage-0.state   stage 0's learners [first, last) and ledger after micro-batch 123
    ROOT/step-000124/stage-1.state
    ROOT/step-000124/COMPLETE        written last: {"format", "step", "time", "stages": [{"file", "bytes",
                                     "sha256"}, ...], "meta": {"config", "in_shape"}}

Stages write their parts themselves: on a cluster the state goes from each stage's node to the shared
storage in parallel, never through the driver, which handles a few hundred bytes per checkpoint. It costs
the stages access to the storage: a local path is only right on one machine (or a shared mount); a cluster
uses a URI that `pyarrow.fs` understands (s3://, gs://, hdfs://). Every file is written under a temporary
name and moved into place (on object stores a move is a copy, which is why the marker, not the move, makes
a checkpoint count).

Trust. Reading a checkpoint never runs code from it: parts are tensorfile.py's JSON header and raw tensor
bytes, COMPLETE is JSON, and every field is checked before use. Every read checks a part's size and
sha256 against COMPLETE, so a truncated, torn or bit-flipped part is refused and the next older complete
checkpoint is used. The hashes guard against accidents, not against a writer of the store: whoever can
write it can write a COMPLETE that matches new parts, and so change the numbers a run resumes from or a
probe measures; they cannot make a reader execute anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.checkpoints import tensorfile
from pipeline.checkpoints.ledger import Ledger
from pipeline.errors import CheckpointError

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
FORMAT = 1  # of COMPLETE and of the parts; a reader refuses others
_DIR = re.compile(r"^step-(\d{6,})$")
MAX_RECORD = 1 << 20  # bytes: a COMPLETE larger than this was not written by lamina
_SHA = re.compile(r"^[0-9a-f]{64}$")
_PART = re.compile(r"^stage-\d+\.state$")


@dataclass(frozen=True)
class Part:
    """What a stage reports after writing its part of a checkpoint (a control message: no tensors)."""

    stage: int  # stage index
    step: int  # checkpoint step it belongs to
    file: str  # name inside the checkpoint directory
    bytes: int  # size written
    sha256: str  # of the bytes written


@dataclass
class Checkpoint:
    """A complete checkpoint, loaded: every learner's state bottom to top, each layer's ledger, and the
    run's description (its config and frame shape) as the driver recorded it."""

    step: int  # micro-batches applied: resume at this micro-batch
    learners: list[dict]  # Learner.state_dict() of every learner, bottom to top
    ledgers: list[Ledger] = field(default_factory=list)  # one per learner (its stage's ledger)
    meta: dict = field(default_factory=dict)  # {"config": TrainConfig.to_dict(), "in_shape": [C, H, W]}


class CheckpointStore:
    """Checkpoints of one run under `uri`: a local path or any URI `pyarrow.fs.FileSystem.from_uri` reads.

    Picklable (rebuilt from the URI), so the driver hands it to stage actors, which write their own parts.
    `keep` complete checkpoints are kept; older ones and abandoned partial ones are pruned. `meta` (plain
    JSON) goes into every COMPLETE the store writes.
    """

    def __init__(self, uri: str, keep: int = 3, meta: dict | None = None) -> None:
        if keep < 1:
            raise CheckpointError(f"a store keeps at least one checkpoint (got keep={keep})")
        try:
            if "://" in uri:
                self.fs, self.root = pafs.FileSystem.from_uri(uri)
            else:
                self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(uri)
        except (OSError, ValueError, pa.ArrowException) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]  # pyarrow's first line says it
            if "libjvm" in reason:
                reason += " (hdfs:// needs a Java runtime and libhdfs on every node)"
            raise CheckpointError(f"checkpoint store {uri!r}: {reason}") from None
        self.uri, self.keep, self.meta = uri, keep, meta or {}

    def __reduce__(self) -> tuple[Any, tuple[str, int, dict]]:
        return (CheckpointStore, (self.uri, self.keep, self.meta))

    def __repr__(self) -> str:
        return f"CheckpointStore({self.uri!r}, keep={self.keep})"

    def dir(self, step: int) -> str:
        return f"{self.root}/step-{step:06d}"

    # -- writing -------------------------------------------------------------------------------------

    def write_part(self, step: int, stage: int, state: dict) -> Part:
        """Write one stage's part of checkpoint `step` (tmp + move); called by the stage itself."""
        data = tensorfile.dumps(state)
        name = f"stage-{stage}.state"
        self._write(f"{self.dir(step)}/{name}", data)
        return Part(stage, step, name, len(data), hashlib.sha256(data).hexdigest())

    def commit(self, step: int, parts: list[Part]) -> None:
        """Mark checkpoint `step` complete once every stage's part is there, then prune old ones."""
        parts = sorted(parts, key=lambda p: p.stage)
        if [p.stage for p in parts] != list(range(len(parts))) or any(p.step != step for p in parts):
            raise CheckpointError(f"checkpoint {step}: parts {parts} do not cover every stage once")
        record = {"format": FORMAT, "step": step, "time": time.time(), "meta": self.meta,
                  "stages": [{"file": p.file, "bytes": p.bytes, "sha256": p.sha256} for p in parts]}
        try:
            for p in parts:
                info = self.fs.get_file_info(f"{self.dir(step)}/{p.file}")
                if info.type != pafs.FileType.File or info.size != p.bytes:
                    raise CheckpointError(f"checkpoint {step}: {p.file} is missing or not {p.bytes} bytes "
                                          f"({info.type}, {info.size})")
            self._write(f"{self.dir(step)}/{MARKER}", (json.dumps(record, indent=1) + "\n").encode())
        except OSError as e:
            raise CheckpointError(f"checkpoint {step}: could not write {MARKER} to {self.uri}: {e}") from e
        logger.info("checkpoint %s complete (%d stages, %d bytes)", self.dir(step), len(parts),
                    sum(p.bytes for p in parts))
        try:
            self.prune()
        except OSError as e:  # the checkpoint is complete; an old one left behind is only disk space
            logger.warning("%s: could not prune old checkpoints: %s", self.uri, e)

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
        # Only names dir() writes: a stray `step-7` is not ours to read or to prune.
        return sorted(int(m[1]) for m in found if m and m[0] == f"step-{int(m[1]):06d}")

    def record(self, step: int) -> dict | None:
        """COMPLETE's record of checkpoint `step` if it is complete and intact (well-formed, every part there
        at the size recorded); None otherwise, with a warning when a marker exists but does not hold."""
        path = f"{self.dir(step)}/{MARKER}"
        try:
            with self.fs.open_input_stream(path) as f:
                text = f.read(MAX_RECORD + 1)
            if len(text) > MAX_RECORD:
                raise ValueError(f"larger than {MAX_RECORD} bytes")
            record = json.loads(text)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError) as e:
            logger.warning("%s is unreadable (%s); ignoring this checkpoint", path, e)
            return None
        problem = _record_problem(record, step)
        if problem is None:
            for s in record["stages"]:
                info = self.fs.get_file_info(f"{self.dir(step)}/{s['file']}")
                if info.type != pafs.FileType.File or info.size != s["bytes"]:
                    problem = f"{s['file']} is missing or not the {s['bytes']} bytes recorded"
                    break
        if problem is not None:
            logger.warning("checkpoint %s: %s; ignoring it", self.dir(step), problem)
            return None
        return record

    def marked(self) -> list[int]:
        """Steps whose directory has a COMPLETE marker, intact or not (what was once committed)."""
        return [s for s in self.steps()
                if self.fs.get_file_info(f"{self.dir(s)}/{MARKER}").type == pafs.FileType.File]

    def complete(self) -> list[int]:
        """Steps of the complete, intact checkpoints, oldest first."""
        return [s for s in self.steps() if self.record(s) is not None]

    def latest_complete(self) -> int | None:
        """The newest complete, intact checkpoint's step, or None."""
        for step in reversed(self.steps()):
            if self.record(step) is not None:
                return step
        return None

    def read_part(self, step: int, stage: int) -> dict:
        """One stage's part of a complete checkpoint: size and sha256 checked against COMPLETE, then decoded
        (tensors and plain data only) and its fields checked."""
        record = self.record(step)
        if record is None:
            raise CheckpointError(f"{self.dir(step)} is not a complete checkpoint")
        if not 0 <= stage < len(record["stages"]):
            raise CheckpointError(f"{self.dir(step)} has {len(record['stages'])} stages, not stage {stage}")
        entry = record["stages"][stage]
        path = f"{self.dir(step)}/{entry['file']}"
        with self.fs.open_input_stream(path) as f:
            data = f.read(entry["bytes"] + 1)  # never more than COMPLETE promised, and one byte to see more
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"{path}: size or sha256 does not match COMPLETE (corrupt or altered)")
        part = tensorfile.loads(data, path)
        problem = _part_problem(part, stage, step)
        if problem is not None:
            raise CheckpointError(f"{path}: {problem}")
        return part

    def load(self, step: int) -> Checkpoint:
        """Every stage of complete checkpoint `step`, merged bottom to top (independent of how the run
        grouped layers into stages)."""
        record = self.record(step)
        if record is None:
            raise CheckpointError(f"{self.dir(step)} is not a complete checkpoint")
        learners: list[dict] = []
        ledgers: list[Ledger] = []
        for k in range(len(record["stages"])):
            part = self.read_part(step, k)
            if part["first"] != len(learners):
                raise CheckpointError(f"{self.dir(step)}: stage {k} starts at learner {part['first']}, "
                                      f"expected {len(learners)}")
            learners += part["learners"]
            ledgers += [Ledger(part["ledger"]) for _ in part["learners"]]
        return Checkpoint(step, learners, ledgers, record["meta"])

    def load_latest(self) -> Checkpoint | None:
        """The newest complete checkpoint that loads; an unusable one is skipped with a warning."""
        for step in reversed(self.complete()):
            try:
                return self.load(step)
            except (CheckpointError, OSError) as e:
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


def _record_problem(record: Any, step: int) -> str | None:
    """What is wrong with a COMPLETE record (as read: any JSON), or None."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        return f"COMPLETE is not a format-{FORMAT} record"
    if record.get("step") != step:
        return f"COMPLETE says step {record.get('step')!r}"
    stages, meta = record.get("stages"), record.get("meta")
    if not isinstance(meta, dict) or not isinstance(stages, list) or not stages:
        return "COMPLETE lacks its stages or meta"
    for s in stages:
        if not (isinstance(s, dict) and isinstance(s.get("file"), str) and _PART.match(s["file"])
                and type(s.get("bytes")) is int and isinstance(s.get("sha256"), str) and _SHA.match(s["sha256"])):
            return f"COMPLETE has a malformed stage entry {s!r:.80}"
    return None


def _part_problem(part: Any, stage: int, step: int) -> str | None:
    """What is wrong with a decoded part, or None. Learner states are checked by the learners that load
    them (shapes, ranges); here only what the store itself relies on."""
    if not isinstance(part, dict):
        return "not a stage part"
    want = {"stage": int, "first": int, "last": int, "step": int, "learners": list, "ledger": list}
    bad = [k for k, t in want.items() if not isinstance(part.get(k), t) or isinstance(part.get(k), bool)]
    if bad:
        return f"fields {bad} missing or of the wrong type"
    if (part["stage"], part["step"]) != (stage, step) or part["last"] - part["first"] != len(part["learners"]):
        return f"holds stage {part['stage']} step {part['step']} learners [{part['first']}, {part['last']})"
    if not all(isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r) for r in part["ledger"]):
        return "ledger is not a list of [first, last) ranges"
    if not all(isinstance(s, dict) for s in part["learners"]):
        return "learner states are not objects"
    return None
