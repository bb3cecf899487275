"""One shard of a prepared dataset ([Note: the prepared dataset] in dataset.py): the work of one Ray task of
`lamina prepare` (prepare.py) — decode its sources, write their frames a row group at a time, then the
shard's record. Runs where Ray places it, so everything it needs travels in its arguments."""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.sources.dataset import FORMAT, SHARDS, VERSION, PrepareOptions, open_fs, schema, write_file
from pipeline.sources.files import BadVideo, Item
from pipeline.sources.media import Converter, describe, read


def write_shard(out: str, items: list[Item], stats: list[tuple[int, int, str]],
                options: PrepareOptions) -> dict[str, Any]:
    """One Ray task: decode `items` into one shard of the dataset at `out`, then its record. A damaged
    source is recorded as skipped (its rows written so far stay, unreferenced)."""
    fs, root = open_fs(out, f"--out {out}")
    name = "shard-" + hashlib.sha256("\n".join(i for _, _, i in stats).encode()).hexdigest()[:16]
    final = f"{root}/{SHARDS}/{name}.parquet"
    tmp = f"{root}/{SHARDS}/.tmp-{os.getpid()}-{name}.parquet"
    convert = Converter(options.size, options.channels, options.fit)
    videos: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    rows = _Rows(options)
    with fs.open_output_stream(tmp) as stream:
        # lz4 for raw frames: measured on the shared videos at 32x32, it keeps 65 % of the bytes and reads a row
        # group in 0.07 ms of CPU, zstd 51 % in 0.2 ms (no compression: 0.06 ms); the reader runs in the
        # training driver, on the cores the stages use. png and jpeg are compressed already. No min/max
        # statistics of images: each would copy two whole frames into the footer.
        writer = pq.ParquetWriter(stream, schema(options), compression="lz4" if options.encoding == "raw" else
                                  "none", use_dictionary=["video", "label"], write_page_checksum=True,
                                  write_statistics=["video", "frame", "time", "label"])
        try:
            for item, (nbytes, mtime, ident) in zip(items, stats):
                label = item.label(options.labels)
                first = rows.total
                try:
                    width, height, fps = describe(item)
                    n = 0
                    for frame in read(item, convert):
                        rows.add(ident, frame.number, frame.time, label, frame.image)
                        n += 1
                        if rows.full():
                            writer.write_table(rows.take())
                except BadVideo as e:
                    rows.drop_from(first)
                    skipped.append({"source": item.path, "reason": str(e), "bytes": nbytes, "mtime_ns": mtime})
                    continue
                videos.append({"id": ident, "source": item.path, "kind": item.kind, "bytes": nbytes,
                               "mtime_ns": mtime, "sha256": _sha256(item), "label": label, "frames": n,
                               "fps": fps, "width": width, "height": height, "first_row": first})
            if rows.pending():
                writer.write_table(rows.take())
        finally:
            writer.close()
    digest, size = _file_sha256(fs, tmp)
    fs.move(tmp, final)
    record = {"format": FORMAT, "version": VERSION, "options": options.to_dict(),
              "shard": {"file": f"{SHARDS}/{name}.parquet", "bytes": size, "sha256": digest, "rows": rows.total},
              "videos": videos, "skipped": skipped}
    write_file(fs, f"{root}/{SHARDS}/{name}.json", (json.dumps(record, indent=1) + "\n").encode())
    return record


class _Rows:
    """Rows on their way into a shard, written a row group at a time."""

    def __init__(self, options: PrepareOptions) -> None:
        self.options = options
        self.total = 0  # rows added so far (written or pending)
        self._cols: dict[str, list[Any]] = {k: [] for k in ("video", "frame", "time", "label", "image")}

    def add(self, video: str, frame: int, t: float, label: str | None, image: np.ndarray | None) -> None:
        assert image is not None
        for k, v in (("video", video), ("frame", frame), ("time", t), ("label", label),
                     ("image", _encode(image, self.options))):
            self._cols[k].append(v)
        self.total += 1

    def pending(self) -> int:
        return len(self._cols["video"])

    def full(self) -> bool:
        return self.pending() >= self.options.group_frames

    def drop_from(self, row: int) -> None:
        """Forget the pending rows from absolute row `row` on (a source that turned out damaged); rows
        already written stay in the shard, unreferenced."""
        written = self.total - self.pending()
        keep = max(0, row - written)
        for v in self._cols.values():
            del v[keep:]
        self.total = written + keep

    def take(self) -> pa.Table:
        cols = self._cols
        self._cols = {k: [] for k in cols}
        sch = schema(self.options)
        if self.options.encoding == "raw":
            data = pa.py_buffer(b"".join(cols["image"]))
            image = pa.FixedSizeBinaryArray.from_buffers(sch.field("image").type, len(cols["image"]), [None, data])
        else:
            image = pa.array(cols["image"], pa.binary())
        return pa.table({"video": pa.array(cols["video"], pa.string()), "frame": pa.array(cols["frame"], pa.int32()),
                         "time": pa.array(cols["time"], pa.float64()), "label": pa.array(cols["label"], pa.string()),
                         "image": image}, schema=sch)


def _encode(image: np.ndarray, options: PrepareOptions) -> bytes:
    if options.encoding == "raw":
        return image.tobytes()
    from PIL import Image  # comes with matplotlib

    buf = io.BytesIO()
    pic = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    if options.encoding == "png":
        pic.save(buf, "PNG")
    else:
        pic.save(buf, "JPEG", quality=options.quality)
    return buf.getvalue()


def _sha256(item: Item) -> str:
    """Of the file, or of a sequence's images (their names and bytes, in order)."""
    h = hashlib.sha256()
    for path in item.images or (item.path,):
        if item.images:
            h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _file_sha256(fs: pafs.FileSystem, path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size
