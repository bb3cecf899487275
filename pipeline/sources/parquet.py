"""`parquet:PATH|URI[,key=value...]`: a dataset `lamina prepare` wrote ([Note: the prepared dataset]), on a
local path or any storage `pyarrow.fs` reads (file://, s3://, gs://, hdfs://); the location may not contain
commas. Options:
  strict        0 | 1   1: a shard that is unusable stops the command (default 0: its videos are skipped,
                        with a warning naming it, and counted)
  cache         MB of decoded row groups kept ([Note: streaming clips]; default 512; 0: only the
                        micro-batch being assembled, and no read-ahead)
  readahead     micro-batches read ahead in the background (default 2)
  workers       reading threads (default: the machine's cores)
  probe_videos  the probe's sample: at most this many videos ... (default 500)
  probe_frames  ... with this many frames each, spread evenly over the video (default 16)

Opening reads manifest.json and every shard's Parquet footer, and checks them against each other: a
missing, truncated or foreign shard (another schema), or one whose rows or size differ from what the
manifest says, is skipped with its videos. Frames are then read a row group at a time, with page checksums
verified, through the cache of pipeline/sources/streaming.py; labels come from the shards' label column.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import ConfigError, DataError
from pipeline.sources.dataset import (
    FORMAT,
    MANIFEST,
    SHARD_FIELDS,
    VERSION,
    VIDEO_FIELDS,
    PrepareOptions,
    brief,
    check_fields,
    open_fs,
    read_json,
    schema,
)
from pipeline.sources.options import parse_options
from pipeline.sources.streaming import (
    STREAM_OPTIONS,
    Catalog,
    Key,
    Piece,
    Segment,
    StreamingSource,
    StreamOptions,
    sample_videos,
)
from pipeline.sources.videos import Videos

logger = logging.getLogger(__name__)

_SHARD_FILE = re.compile(r"^shards/[A-Za-z0-9_.-]+\.parquet$")  # inside the dataset, never elsewhere


@dataclass(frozen=True)
class Shard:
    file: str  # relative to the dataset root
    rows: int
    offsets: np.ndarray  # (row groups + 1,) int64: first row of each row group, then the row count


class ParquetReader:
    """The `Reader` of a prepared dataset: a segment is one row group of one shard. Picklable (the
    filesystem is rebuilt from the URI, open files and footers are per process and per thread)."""

    def __init__(self, uri: str, shards: list[Shard], shard_of: np.ndarray, first_row: np.ndarray,
                 options: PrepareOptions, label_names: tuple[str, ...]) -> None:
        self.uri, self.shards, self.shard_of, self.first_row = uri, shards, shard_of, first_row
        self.options, self.label_names = options, label_names
        self._init()

    def _init(self) -> None:
        self.fs, self.root = open_fs(self.uri, f"parquet:{self.uri}")
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("fs", "root", "_local")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init()

    def pieces(self, video: int, lo: int, hi: int) -> list[Piece]:
        s = int(self.shard_of[video])
        offsets = self.shards[s].offsets
        a, b = int(self.first_row[video]) + lo, int(self.first_row[video]) + hi
        out = []
        g = int(np.searchsorted(offsets, a, side="right")) - 1
        while a < b:
            end = min(b, int(offsets[g + 1]))
            out.append(Piece((s, g), a - int(offsets[g]), end - int(offsets[g])))
            a, g = end, g + 1
        return out

    def estimate(self, key: Key) -> int:
        s, g = cast(tuple[int, int], key)
        offsets = self.shards[s].offsets
        return int(offsets[g + 1] - offsets[g]) * (self.options.frame_bytes + 8)

    def load(self, key: Key) -> list[tuple[Key, Segment]]:
        s, g = cast(tuple[int, int], key)
        shard = self.shards[s]
        rows = int(shard.offsets[g + 1] - shard.offsets[g])
        where = f"{self.root}/{shard.file} row group {g}"
        try:
            table = self._file(s).read_row_group(g, columns=["image", "label"], use_threads=False)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{where}: cannot be read ({brief(e)})") from None
        if table.num_rows != rows:
            raise DataError(f"{where}: {table.num_rows} rows, its footer says {rows}")
        return [(key, Segment(self._images(table.column("image"), rows, where), self._labels(table.column("label"))))]

    def _file(self, s: int) -> pq.ParquetFile:
        files: dict[int, pq.ParquetFile] | None = getattr(self._local, "files", None)
        if files is None:
            files = self._local.files = {}
        pf = files.get(s)
        if pf is None:
            if len(files) >= 64:  # a thread keeps at most this many shards open
                files.pop(next(iter(files))).close()
            handle = self.fs.open_input_file(f"{self.root}/{self.shards[s].file}")
            pf = files[s] = pq.ParquetFile(handle, page_checksum_verification=True)
        return pf

    def _images(self, column: pa.ChunkedArray, rows: int, where: str) -> np.ndarray:
        o = self.options
        shape = (rows, o.size, o.size, o.channels)
        if o.encoding == "raw":
            arr = column.combine_chunks()
            if arr.null_count:
                raise DataError(f"{where}: {arr.null_count} frames have no image")
            data = arr.buffers()[1]
            assert data is not None
            return np.frombuffer(data, np.uint8, count=rows * o.frame_bytes,
                                 offset=arr.offset * o.frame_bytes).reshape(shape)
        from PIL import Image  # comes with matplotlib

        out = np.empty(shape, np.uint8)
        for i, blob in enumerate(column.to_pylist()):
            try:
                with Image.open(io.BytesIO(blob)) as pic:
                    a = np.asarray(pic.convert("RGB" if o.channels == 3 else "L"))
            except (OSError, ValueError, TypeError) as e:
                raise DataError(f"{where}: frame {i} is not a readable {o.encoding} image ({brief(e)})") from None
            if a.shape[:2] != (o.size, o.size):
                raise DataError(f"{where}: frame {i} is {a.shape[1]}x{a.shape[0]}, not {o.size}x{o.size}")
            out[i] = a.reshape(o.size, o.size, o.channels)
        return out

    def _labels(self, column: pa.ChunkedArray) -> np.ndarray:
        ids = pc.index_in(column, value_set=pa.array(self.label_names, pa.string()))
        return np.asarray(pc.fill_null(ids, -1).to_numpy(zero_copy_only=False), np.int64)


def parse_spec(arg: str) -> tuple[str, StreamOptions]:
    uri, _, rest = arg.partition(",")
    uri = uri.strip()
    if not uri:
        raise DataError("parquet: no location given (use parquet:DIR or parquet:URI)")
    return uri, StreamOptions(**StreamOptions.fields(parse_options(rest, STREAM_OPTIONS, "parquet")))


@dataclass(frozen=True)
class OpenDataset:
    name: str  # the spec
    reader: ParquetReader
    catalog: Catalog
    options: PrepareOptions  # how the frames were prepared
    skipped: tuple[tuple[str, str], ...]  # (shard file, why) of every unusable shard
    spec_options: StreamOptions

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return (self.options.channels, self.options.size, self.options.size)


def open_dataset(arg: str) -> OpenDataset:
    """Read and check the dataset of `parquet:ARG`; DataError naming the file for what cannot be used."""
    uri, opts = parse_spec(arg)
    name = f"parquet:{arg}"
    fs, root = open_fs(uri, f"parquet:{uri}")
    where = f"{root}/{MANIFEST}"
    try:
        exists = fs.get_file_info(where).type == pafs.FileType.File
        if not exists:
            raise DataError(f"{name}: no {MANIFEST} in {root}: not a dataset `lamina prepare` wrote, or its prepare "
                            f"did not finish (run it again: it continues where it stopped)")
        manifest = read_json(fs, where)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{name}: cannot read {where} ({brief(e)})") from None
    options, labels, shard_entries, videos = _check_manifest(manifest, where)

    def check(entry: dict[str, Any]) -> Shard | str:
        return _check_shard(fs, f"{root}/{entry['file']}", entry, options)

    workers = opts.workers or os.cpu_count() or 1
    with ThreadPoolExecutor(min(workers * 4, 32), thread_name_prefix="lamina-footer") as pool:
        checked = list(pool.map(check, shard_entries))
    shards: list[Shard] = []
    index: dict[str, int] = {}
    skipped: list[tuple[str, str]] = []
    for entry, result in zip(shard_entries, checked):
        if isinstance(result, str):
            n = sum(1 for v in videos if v["shard"] == entry["file"])
            if opts.strict:
                raise DataError(f"{root}/{entry['file']}: {result} (strict=1 stops at an unusable shard)")
            logger.warning("%s: skipped shard %s/%s and its %d videos: %s", name, root, entry["file"], n, result)
            skipped.append((entry["file"], result))
            continue
        index[entry["file"]] = len(shards)
        shards.append(result)
    usable = [v for v in videos if v["shard"] in index]
    for v in usable:
        if v["first_row"] + v["frames"] > shards[index[v["shard"]]].rows:
            raise DataError(f"{where}: video {v['source']} (rows {v['first_row']}+{v['frames']}) runs past the "
                            f"{shards[index[v['shard']]].rows} rows of {v['shard']}: the manifest does not match")
    if not usable:
        raise DataError(f"{name}: none of its {len(videos)} videos is in a usable shard")
    ids = {n: i for i, n in enumerate(labels)}
    catalog = Catalog(np.array([v["frames"] for v in usable], np.int64),
                      np.array([ids[v["label"]] if v["label"] is not None else -1 for v in usable], np.int64),
                      tuple(labels), tuple(v["source"] for v in usable))
    reader = ParquetReader(uri, shards, np.array([index[v["shard"]] for v in usable], np.int64),
                           np.array([v["first_row"] for v in usable], np.int64), options, tuple(labels))
    logger.info("%s: %d videos, %d frames, %d labels, %d shards%s", name, len(usable), int(catalog.lengths.sum()),
                len(labels), len(shards), f"; {len(skipped)} unusable shard(s) skipped" if skipped else "")
    return OpenDataset(name, reader, catalog, options, tuple(skipped), opts)


def _check_manifest(manifest: Any, where: str) -> tuple[PrepareOptions, list[str], list[dict[str, Any]],
                                                        list[dict[str, Any]]]:
    check_fields(manifest, {"format": str, "version": int, "options": dict, "labels": list, "shards": list,
                            "videos": list}, where)
    if (manifest["format"], manifest["version"]) != (FORMAT, VERSION):
        raise DataError(f"{where}: format {manifest['format']!r} version {manifest['version']}; this lamina reads "
                        f"{FORMAT!r} version {VERSION}")
    options = PrepareOptions.from_dict(manifest["options"], where)
    labels = manifest["labels"]
    if not all(isinstance(n, str) for n in labels) or labels != sorted(set(labels)):
        raise DataError(f"{where}: 'labels' must be distinct names in sorted order (got {str(labels)[:80]})")
    shards = [check_fields(s, SHARD_FIELDS, f"{where}: shards[{i}]") for i, s in enumerate(manifest["shards"])]
    files = [s["file"] for s in shards]
    bad = [f for f in files if not _SHARD_FILE.match(f)]
    if bad or len(set(files)) != len(files):
        raise DataError(f"{where}: shard files must be distinct shards/NAME.parquet (got {(bad or files)[:3]})")
    videos = []
    for i, v in enumerate(manifest["videos"]):
        v = check_fields(v, {**VIDEO_FIELDS, "shard": str}, f"{where}: videos[{i}]")
        if v["shard"] not in files:
            raise DataError(f"{where}: videos[{i}] ({v['source']}) is in {v['shard']!r}, which 'shards' does not list")
        if v["label"] is not None and v["label"] not in labels:
            raise DataError(f"{where}: videos[{i}] has label {v['label']!r}, which 'labels' does not list")
        if v["frames"] < 1 or v["first_row"] < 0:
            raise DataError(f"{where}: videos[{i}] has {v['frames']} frames at row {v['first_row']}")
        videos.append(v)
    if not videos:
        raise DataError(f"{where}: lists no videos")
    return options, labels, shards, videos


def _check_shard(fs: pafs.FileSystem, path: str, entry: dict[str, Any], options: PrepareOptions) -> Shard | str:
    """The shard, checked against its manifest entry, or why it cannot be used."""
    try:
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            return "missing"
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
            found = meta.schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as e:
        return f"truncated or not a Parquet file ({brief(e)})"
    expected = schema(options)
    if not found.remove_metadata().equals(expected):
        return (f"wrong schema: {', '.join(f'{f.name}: {f.type}' for f in found)}; a dataset prepared with "
                f"{options.encoding} {options.size}x{options.size}x{options.channels} frames has "
                f"{', '.join(f'{f.name}: {f.type}' for f in expected)}")
    if meta.num_rows != entry["rows"] or info.size != entry["bytes"]:
        return (f"does not match the manifest: {meta.num_rows} rows and {info.size} bytes, the manifest says "
                f"{entry['rows']} rows and {entry['bytes']} bytes")
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    return Shard(entry["file"], meta.num_rows, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))


def _check_size(d: OpenDataset, size: int) -> None:
    if size != d.options.size:
        raise ConfigError(f"--size {size} does not match {d.name}, prepared at {d.options.size}x{d.options.size}: "
                          f"use --size {d.options.size}, or prepare the videos again with --size {size}")


def parquet_source(arg: str, size: int, clips: int, clip_len: int, seed: int, stride: int = 1) -> StreamingSource:
    """The training source of `parquet:ARG`."""
    d = open_dataset(arg)
    _check_size(d, size)
    o = d.spec_options
    return StreamingSource(d.name, d.reader, d.catalog, d.frame_shape, clips, clip_len, seed, stride, o.cache_mb,
                           o.readahead, o.workers or os.cpu_count() or 1)


def parquet_videos(arg: str, size: int, split: str) -> Videos:
    """A bounded sample of `parquet:ARG` in memory, the same for both splits ([Note: probing streamed data])."""
    d = open_dataset(arg)
    _check_size(d, size)
    if split == "probe" and not d.catalog.label_names:
        raise DataError(f"{d.name}: no labels (prepared with --labels none): the probe needs labels; prepare with "
                        f"--labels folder or --labels stem")
    o = d.spec_options
    return sample_videos(d.name, d.reader, d.catalog, d.frame_shape, o.probe_videos, o.probe_frames,
                         min(o.cache_mb, 256), o.workers or os.cpu_count() or 1)
