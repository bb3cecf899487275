"""The prepared dataset: Parquet shards of frames and a manifest, as `lamina prepare` writes them
(pipeline/sources/prepare.py) and the `parquet:` data spec reads them (pipeline/sources/parquet.py).

[Note: the prepared dataset]
    ROOT/manifest.json          written last, by the driver: what the dataset is (below)
    ROOT/shards/<name>.parquet  the frames of a group of source videos, one row per frame
    ROOT/shards/<name>.json     that shard's record: its videos (and the sources found bad), written by the
                                task after its shard; what lets a re-run of `prepare` skip those sources

ROOT is a local path or any URI `pyarrow.fs` reads (file://, s3://, gs://, hdfs://); every file is written
under a temporary name and moved into place. A row: `video` (string, the video's id), `frame` (int32,
presentation order from 0), `time` (float64 seconds from the stream's start; NaN when unknown), `label`
(string, null without labels), `image` (the frame at SIZE x SIZE: raw HWC uint8 as fixed_size_binary, or
PNG / JPEG bytes). A video's rows are consecutive in its shard, at `first_row`; row groups of
`group_frames` rows are the unit a reader fetches. Rows no manifest entry points at (a video found damaged
after some of its rows were written) are dead weight, never read.

manifest.json: {"format": "lamina-frames", "version": 1, "options": {size, channels, fit, encoding,
quality, labels, group_frames}, "labels": [names], "shards": [{file, bytes, sha256, rows}], "videos":
[{id, source, kind, bytes, mtime_ns, sha256, label, frames, fps, width, height, shard, first_row}],
"skipped": [{source, reason}], "counts": {...}, "created": ISO time, "tools": {versions}}.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.errors import ConfigError, DataError
from pipeline.sources.files import FITS, LABELS

FORMAT = "lamina-frames"
VERSION = 1
MANIFEST = "manifest.json"
SHARDS = "shards"
ENCODINGS = ("raw", "png", "jpeg")
MAX_RECORD = 1 << 30  # bytes: a manifest or record larger than this was not written by lamina


@dataclass(frozen=True)
class PrepareOptions:
    """How frames are stored; a dataset has one set, and a re-run into it must use the same."""

    size: int = 32  # frames are SIZE x SIZE
    channels: int = 3  # 3: RGB, 1: grey
    fit: str = "crop"  # crop: centre square of the short side; squash: resize as is
    encoding: str = "raw"  # raw uint8, or png / jpeg bytes
    quality: int = 90  # jpeg quality
    labels: str = "folder"  # a video's label: parent folder, file stem, or none
    group_frames: int = 64  # rows per Parquet row group: what a reader fetches at once

    def __post_init__(self) -> None:
        checks = [(self.size >= 4, "--size must be >= 4", self.size),
                  (self.channels in (1, 3), "--channels must be 1 or 3", self.channels),
                  (self.fit in FITS, f"--fit must be one of {list(FITS)}", self.fit),
                  (self.encoding in ENCODINGS, f"--encoding must be one of {list(ENCODINGS)}", self.encoding),
                  (1 <= self.quality <= 100, "--quality must be in [1, 100]", self.quality),
                  (self.labels in LABELS, f"--labels must be one of {list(LABELS)}", self.labels),
                  (self.group_frames >= 1, "--group-frames must be >= 1", self.group_frames)]
        for ok, message, value in checks:
            if not ok:
                raise ConfigError(f"{message} (got {value!r})")

    @property
    def frame_bytes(self) -> int:
        return self.size * self.size * self.channels

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> PrepareOptions:
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) != set(fields):
            raise DataError(f"{where}: 'options' must hold exactly {sorted(fields)} (got {str(d)[:120]})")
        for k, v in d.items():
            want = int if fields[k] == "int" else str
            if type(v) is not want:
                raise DataError(f"{where}: option {k!r} must be {want.__name__} (got {v!r:.40})")
        try:
            return cls(**d)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None


def schema(options: PrepareOptions) -> pa.Schema:
    """The Arrow schema of every shard of a dataset with these options."""
    image = pa.binary(options.frame_bytes) if options.encoding == "raw" else pa.binary()
    return pa.schema([("video", pa.string()), ("frame", pa.int32()), ("time", pa.float64()),
                      ("label", pa.string()), ("image", image)])


def brief(e: BaseException, limit: int = 200) -> str:
    """A library's error in one line: its first line, cut at `limit` characters (pyarrow's hdfs error is a
    hundred lines of paths it tried)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def open_fs(uri: str, label: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path) of a local path or a pyarrow.fs URI; DataError starting with `label` (what
    names it to the user) when its filesystem cannot be had (an unknown scheme, a library missing)."""
    try:
        if "://" in uri:
            fs, root = pafs.FileSystem.from_uri(uri)
            return fs, root.rstrip("/") or "/"
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise DataError(f"{label}: its filesystem is not available ({brief(e)})") from None


def write_file(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write under a temporary name, then move into place: a reader sees the whole file or none."""
    tmp = f"{os.path.dirname(path)}/.tmp-{secrets.token_hex(4)}-{os.path.basename(path)}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def read_json(fs: pafs.FileSystem, path: str) -> Any:
    """A JSON file lamina wrote; DataError naming it when it is missing, huge or not JSON."""
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise DataError(f"{path}: no such file")
    if info.size is not None and info.size > MAX_RECORD:
        raise DataError(f"{path}: {info.size} bytes, too large for a lamina record")
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable JSON record ({brief(e)})") from None


def check_fields(entry: Any, fields: dict[str, type | tuple[type, ...]], where: str) -> dict[str, Any]:
    """`entry` is a JSON object with at least `fields` of these types (bool is not an int here)."""
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected a JSON object (got {type(entry).__name__})")
    for key, kind in fields.items():
        value = entry.get(key)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if key not in entry or isinstance(value, bool) or not isinstance(value, kinds):
            raise DataError(f"{where}: field {key!r} must be {' or '.join(k.__name__ for k in kinds)} "
                            f"(got {value!r:.60})")
    return entry


VIDEO_FIELDS: dict[str, type | tuple[type, ...]] = {
    "id": str, "source": str, "kind": str, "bytes": int, "mtime_ns": int, "sha256": str,
    "label": (str, type(None)), "frames": int, "fps": (int, float), "width": int, "height": int,
    "first_row": int}
SKIP_FIELDS: dict[str, type | tuple[type, ...]] = {"source": str, "reason": str, "bytes": int, "mtime_ns": int}
SHARD_FIELDS: dict[str, type | tuple[type, ...]] = {"file": str, "bytes": int, "sha256": str, "rows": int}
