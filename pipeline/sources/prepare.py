"""`lamina prepare SRC... --out DIR`: video files, folders of them and image-sequence folders -> a Parquet
dataset ([Note: the prepared dataset] in dataset.py) that `parquet:DIR` trains on.

[Note: preparing in parallel]
    driver:  find the sources (media.discover) -> leave out those a previous run prepared -> group the rest
             into shards -> one Ray task per shard, at most `workers` at a time -> manifest.json
    task:    (shards.py) decode each source once, checking it ([Note: damaged video]), every frame to
             SIZE x SIZE, rows into the shard `group_frames` at a time -> shards/<name>.parquet, then
             shards/<name>.json

Resumable: a shard's record is written after its Parquet file, so a record names finished work. A re-run
with the same options skips every source a record holds with the same path, size and modification time
(sources found damaged too: their verdict stands until the file changes), and prepares the rest. The
manifest, written last, lists exactly the sources of this run.

Tasks write to DIR themselves, so on a cluster DIR must be storage every node reaches (a pyarrow.fs URI),
and the sources must be at the same paths on every node. Without a Ray to join (`--address`, RAY_ADDRESS)
the command starts a local one for itself and stops it when done; a Ray the caller connected stays.
Memory per task: one row group of frames, whatever the length of a video.

A shard holds consecutive sources up to about SHARD_SOURCE_BYTES of source files (fewer when that leaves
fewer than 4 shards per worker): large enough that a dataset of many short clips is not thousands of
tiny files, small enough to keep every worker busy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.errors import ConfigError, DataError, LaminaError
from pipeline.sources.dataset import (
    FORMAT,
    MANIFEST,
    SHARD_FIELDS,
    SHARDS,
    SKIP_FIELDS,
    VERSION,
    VIDEO_FIELDS,
    PrepareOptions,
    brief,
    check_fields,
    open_fs,
    read_json,
    write_file,
)
from pipeline.sources.files import BadVideo, Item, discover
from pipeline.sources.shards import write_shard

logger = logging.getLogger(__name__)

SHARD_SOURCE_BYTES = 64 << 20  # source bytes per shard at most (a larger file is a shard of its own)
SHARDS_PER_WORKER = 4  # at least this many shards per worker when the sources allow


@dataclass(frozen=True)
class Job:
    """One source to prepare, as the driver saw it."""

    item: Item
    bytes: int  # source size (all images of a sequence)
    mtime_ns: int  # newest modification time
    id: str  # the video id of its rows: a hash of path, size and time

    @property
    def key(self) -> tuple[str, int, int]:
        return (os.path.abspath(self.item.path), self.bytes, self.mtime_ns)


@dataclass(frozen=True)
class PrepareResult:
    out: str  # the dataset's root, as given
    videos: int  # in the manifest
    frames: int  # in the manifest
    prepared: int  # videos prepared by this run
    reused: int  # videos a previous run had prepared
    skipped: tuple[tuple[str, str], ...]  # (source, why) of every damaged or unreadable source
    ignored: int  # files in the folders that are neither video nor image
    shards: int  # in the manifest
    seconds: float
    labels: tuple[str, ...] = field(default=())  # label names
    size: int = 32  # frames are SIZE x SIZE


def prepare(sources: Sequence[str], out: str, options: PrepareOptions | None = None, strict: bool = False,
            address: str | None = None, workers: int = 0, progress: bool = True) -> PrepareResult:
    """Prepare `sources` into the dataset at `out` ([Note: preparing in parallel])."""
    options = options or PrepareOptions()
    t0 = time.perf_counter()
    if not sources:
        raise ConfigError("prepare: give at least one SRC (a video file, a folder or a glob)")
    if workers < 0:
        raise ConfigError(f"--workers must be >= 0 (got {workers})")
    fs, root = open_fs(out, f"--out {out}")
    found, ignored = discover(sources, "prepare")
    # Absolute: the tasks run in Ray workers, whose working directory need not be this one.
    items = [Item(os.path.abspath(i.path), tuple(os.path.abspath(f) for f in i.images)) for i in found]
    if ignored:
        logger.info("ignoring %d file(s) that are neither video nor image, e.g. %s", len(ignored), ignored[0])
    try:
        fs.create_dir(f"{root}/{SHARDS}", recursive=True)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"--out {out}: cannot create {root}/{SHARDS} ({brief(e)})") from None
    done = _finished(fs, root, options)

    jobs: list[Job] = []
    verdicts: dict[tuple[str, int, int], tuple[str, Any]] = {}  # key -> ("video", entry) | ("skip", why)
    for item in items:
        try:
            size, mtime = item.stat()
        except BadVideo as e:
            _bad(item.path, str(e), strict)
            verdicts[(os.path.abspath(item.path), -1, -1)] = ("skip", str(e))
            jobs.append(Job(item, -1, -1, ""))
            continue
        ident = hashlib.sha256(f"{os.path.abspath(item.path)}\n{size}\n{mtime}".encode()).hexdigest()[:16]
        job = Job(item, size, mtime, ident)
        jobs.append(job)
        if job.key in done:
            verdicts[job.key] = done[job.key]
            if done[job.key][0] == "skip":
                _bad(item.path, done[job.key][1] + " (found by an earlier run; unchanged since)", strict)
    todo = [j for j in jobs if j.key not in verdicts]
    reused = sum(1 for v in verdicts.values() if v[0] == "video")
    if reused:
        logger.info("%d of %d sources were prepared by an earlier run: skipping them", reused, len(jobs))

    if todo:
        with _ray(address, workers) as parallel:
            groups = _group(todo, parallel)
            logger.info("preparing %d sources in %d shards, %d at a time, into %s", len(todo), len(groups),
                        parallel, out)
            for record in _run_tasks(groups, out, options, parallel, progress, strict):
                for v in record["videos"]:
                    verdicts[(os.path.abspath(v["source"]), v["bytes"], v["mtime_ns"])] = ("video", {
                        **v, "shard": record["shard"]})
                for s in record["skipped"]:
                    verdicts[(os.path.abspath(s["source"]), s["bytes"], s["mtime_ns"])] = ("skip", s["reason"])

    manifest = _manifest(jobs, verdicts, options, sources)
    counts = manifest["counts"]
    if not counts["videos"]:
        raise DataError(f"prepare: none of the {len(jobs)} sources is usable; see the warnings above")
    write_file(fs, f"{root}/{MANIFEST}", _dumps(manifest).encode())
    prepared = sum(1 for j in todo if verdicts.get(j.key, ("",))[0] == "video")
    result = PrepareResult(out, counts["videos"], counts["frames"], prepared, reused,
                           tuple((s["source"], s["reason"]) for s in manifest["skipped"]), len(ignored),
                           counts["shards"], time.perf_counter() - t0, tuple(manifest["labels"]),
                           options.size)
    return result


def summary(r: PrepareResult) -> str:
    """What `lamina prepare` prints when it is done."""
    lines = [(f"{r.out}: {r.videos} videos, {r.frames} frames, {len(r.labels)} labels in {r.shards} shards "
              f"({r.prepared} prepared now, {r.reused} by an earlier run; {r.seconds:.1f} s)")]
    if r.skipped:
        lines.append(f"skipped {len(r.skipped)} damaged or unreadable source(s):")
        lines += [f"  {source}: {why}" for source, why in r.skipped]
    if r.ignored:
        lines.append(f"ignored {r.ignored} file(s) that are neither video nor image")
    lines.append(f"next: lamina train --data parquet:{r.out} --size {r.size}")
    return "\n".join(lines)


def _bad(path: str, why: str, strict: bool) -> None:
    if strict:
        raise DataError(f"{path}: {why} (--strict stops at a bad source; without it, bad sources are skipped)")
    logger.warning("skipped %s: %s", path, why)


# -- what earlier runs finished --------------------------------------------------------------------------


def _finished(fs: pafs.FileSystem, root: str, options: PrepareOptions) -> dict[tuple[str, int, int],
                                                                               tuple[str, Any]]:
    """The verdicts of every complete shard record under root; a record made with other options is a
    ConfigError (one dataset, one set of options)."""
    selector = pafs.FileSelector(f"{root}/{SHARDS}", allow_not_found=True)
    done: dict[tuple[str, int, int], tuple[str, Any]] = {}
    for info in fs.get_file_info(selector):
        if not info.path.endswith(".json") or os.path.basename(info.path).startswith("."):
            continue
        try:
            record = _check_record(read_json(fs, info.path), info.path)
        except DataError as e:
            logger.warning("ignoring %s and preparing its sources again: %s", info.path, e)
            continue
        recorded = PrepareOptions.from_dict(record["options"], info.path)
        if recorded != options:
            differ = {k: v for k, v in recorded.to_dict().items() if options.to_dict()[k] != v}
            raise ConfigError(f"--out {root} holds a dataset prepared with {differ}: prepare with the same options "
                              f"to add to it, or choose another --out")
        shard = fs.get_file_info(f"{root}/{record['shard']['file']}")
        if shard.type != pafs.FileType.File or shard.size != record["shard"]["bytes"]:
            logger.warning("%s: its shard is missing or has another size: preparing its sources again", info.path)
            continue
        for v in record["videos"]:
            done[(os.path.abspath(v["source"]), v["bytes"], v["mtime_ns"])] = ("video", {**v, "shard":
                                                                                     record["shard"]})
        for s in record["skipped"]:
            done[(os.path.abspath(s["source"]), s["bytes"], s["mtime_ns"])] = ("skip", s["reason"])
    return done


def _check_record(record: Any, where: str) -> dict[str, Any]:
    check_fields(record, {"format": str, "version": int, "options": dict, "shard": dict, "videos": list,
                          "skipped": list}, where)
    if (record["format"], record["version"]) != (FORMAT, VERSION):
        raise DataError(f"{where}: format {record['format']!r} version {record['version']}, not {FORMAT} {VERSION}")
    check_fields(record["shard"], SHARD_FIELDS, f"{where}: shard")
    for i, v in enumerate(record["videos"]):
        check_fields(v, VIDEO_FIELDS, f"{where}: videos[{i}]")
    for i, s in enumerate(record["skipped"]):
        check_fields(s, SKIP_FIELDS, f"{where}: skipped[{i}]")
    return record


# -- the work --------------------------------------------------------------------------------------------


def _group(jobs: list[Job], workers: int) -> list[list[Job]]:
    """Consecutive sources into shards of at most `cap` source bytes ([Note: preparing in parallel])."""
    total = sum(j.bytes for j in jobs)
    cap = max(1, min(SHARD_SOURCE_BYTES, math.ceil(total / (SHARDS_PER_WORKER * workers))))
    groups: list[list[Job]] = [[]]
    held = 0
    for j in jobs:
        if groups[-1] and held + j.bytes > cap:
            groups.append([])
            held = 0
        groups[-1].append(j)
        held += j.bytes
    return groups


@contextmanager
def _ray(address: str | None, workers: int) -> Iterator[int]:
    """The Ray this process has, the one at `address` / RAY_ADDRESS, or a local one started (and stopped)
    here; yields how many tasks to run at once."""
    import ray

    started = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            # address="local": a Ray of this command's own, even when another one runs on this machine.
            ray.init(address="local", num_cpus=workers or os.cpu_count() or 1, include_dashboard=False,
                     logging_level=logging.WARNING)
        started = True
    try:
        yield max(1, workers or int(ray.cluster_resources().get("CPU", 1)))
    finally:
        if started:
            ray.shutdown()


def _run_tasks(groups: list[list[Job]], out: str, options: PrepareOptions, parallel: int, progress: bool,
               strict: bool) -> Iterator[dict[str, Any]]:
    """Run one task per group, at most `parallel` at a time; yield each shard's record as it finishes."""
    import ray
    from ray.exceptions import RayTaskError

    task = ray.remote(num_cpus=1, max_retries=1)(write_shard)  # retried only when its worker dies
    bar = _Bar(sum(len(g) for g in groups), progress)
    waiting = list(groups)
    running: dict[Any, list[Job]] = {}
    try:
        while waiting or running:
            while waiting and len(running) < parallel:
                group = waiting.pop(0)
                running[task.remote(out, [j.item for j in group], [(j.bytes, j.mtime_ns, j.id) for j in group],
                                    options)] = group
            ready, _ = ray.wait(list(running), num_returns=1)
            group = running.pop(ready[0])
            try:
                record = ray.get(ready[0])
            except RayTaskError as e:
                cause = e.cause if isinstance(e.cause, LaminaError | OSError) else e
                raise cause from None
            for s in record["skipped"]:
                _bad(s["source"], s["reason"], strict)
            bar.update(len(group), sum(v["frames"] for v in record["videos"]), len(record["skipped"]))
            yield record
    finally:
        for ref in running:
            ray.cancel(ref)
        bar.close()


def _manifest(jobs: list[Job], verdicts: dict[tuple[str, int, int], tuple[str, Any]], options: PrepareOptions,
              sources: Sequence[str]) -> dict[str, Any]:
    import av

    videos, skipped, shards = [], [], {}
    for job in jobs:
        kind, what = verdicts[job.key]
        if kind == "video":
            shards[what["shard"]["file"]] = what["shard"]
            videos.append({**{k: what[k] for k in VIDEO_FIELDS}, "shard": what["shard"]["file"]})
        else:
            skipped.append({"source": job.item.path, "reason": what})
    labels = sorted({v["label"] for v in videos if v["label"] is not None})
    return {"format": FORMAT, "version": VERSION, "options": options.to_dict(), "labels": labels,
            "shards": sorted(shards.values(), key=lambda s: s["file"]), "videos": videos, "skipped": skipped,
            "counts": {"sources": len(jobs), "videos": len(videos), "frames": sum(v["frames"] for v in videos),
                       "skipped": len(skipped), "shards": len(shards)},
            "sources": list(sources), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tools": {"pyav": av.__version__, "pyarrow": pa.__version__}}


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1) + "\n"


class _Bar:
    """prepare's progress line on stderr: sources done, frames, frames/s, skipped (redrawn on a terminal,
    every 10 % otherwise)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.done = self.frames = self.skipped = 0
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self._decile = -1

    def update(self, sources: int, frames: int, skipped: int) -> None:
        self.done += sources
        self.frames += frames
        self.skipped += skipped
        if not self.enabled:
            return
        rate = self.frames / max(time.perf_counter() - self.t0, 1e-9)
        line = (f"prepare [{'#' * (24 * self.done // max(self.total, 1)):<24}] {self.done}/{self.total} sources, "
                f"{self.frames} frames, {rate:.0f} frames/s" + (f", {self.skipped} skipped" if self.skipped else ""))
        if self.tty:
            sys.stderr.write("\r" + line + "\033[K")
        elif 10 * self.done // max(self.total, 1) != self._decile:
            self._decile = 10 * self.done // max(self.total, 1)
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()
