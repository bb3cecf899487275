"""The write-ahead log of a live run: every micro-batch formed from the stream, kept until a checkpoint
covers it.

[Note: the ingest write-ahead log]
A file or a dataset can be read again; a live stream cannot. So the order in which admitted clips became
micro-batches is made durable *before* a micro-batch is handed to the pipeline: micro-batch m is written to
the run's checkpoint store as

    CHECKPOINTS/ingest-wal/mb-000000123.state    the clips' uint8 frames, labels, streams, first frames,
                                                 which of them are fresh, capture times

(tensorfile.py's format: JSON and raw bytes, never code; written under a temporary name and moved into
place, like a checkpoint part). To the engines micro-batch m is then again what pipeline/sources/source.py
asks: the same clips whenever it is asked for. After a lost stage the driver restores checkpoint s and asks
for s, s+1, ... again; the live source answers from the log, then goes on with new clips. A complete
checkpoint s makes micro-batches below s unnecessary, and the source deletes them (truncation), so the log
holds at most the micro-batches since the last complete checkpoint plus those in flight — with
--checkpoint-every 100 and B = 16 clips of 8 RGB frames at 32x32, about 100 x 400 KB = 40 MB.

Frames still filling a clip, or clips still in the buffer, are in memory only: they are not admitted yet.
A driver that dies loses them (their Push calls fail, so their clients learn that the frames were not
confirmed); a stage that dies loses nothing.
"""

from __future__ import annotations

import logging
import re
import secrets

import pyarrow.fs as pafs
import torch

from pipeline.checkpoints import tensorfile
from pipeline.errors import CheckpointError

logger = logging.getLogger(__name__)

DIRECTORY = "ingest-wal"
_NAME = re.compile(r"^mb-(\d{9,})\.state$")


class WriteAheadLog:
    """Micro-batches by number in a directory of a pyarrow filesystem (the run's checkpoint store's)."""

    def __init__(self, fs: pafs.FileSystem, root: str) -> None:
        self.fs, self.root = fs, f"{root.rstrip('/')}/{DIRECTORY}"
        self.fs.create_dir(self.root, recursive=True)
        self.sizes: dict[int, int] = {m: self._size(m) for m in self._listed()}  # m -> bytes, what is in the log
        self.bytes = sum(self.sizes.values())  # kept as a number: other threads (Watch, gauges) read it

    def path(self, m: int) -> str:
        return f"{self.root}/mb-{m:09d}.state"

    def append(self, m: int, record: dict) -> None:
        """Write micro-batch m durably (temporary name, then moved into place)."""
        data = tensorfile.dumps(record)
        tmp = f"{self.path(m)}.tmp-{secrets.token_hex(4)}"
        try:
            with self.fs.open_output_stream(tmp) as out:
                out.write(data)
            self.fs.move(tmp, self.path(m))
        except OSError as e:
            raise CheckpointError(f"ingest write-ahead log: could not write micro-batch {m} to {self.root}: "
                                  f"{e}") from e
        self.sizes[m] = len(data)
        self.bytes += len(data)

    def read(self, m: int) -> dict:
        path = self.path(m)
        if m not in self.sizes:
            raise CheckpointError(f"ingest write-ahead log: micro-batch {m} is not in {self.root} (the log "
                                  f"holds {self.span()})")
        with self.fs.open_input_stream(path) as f:
            data = f.read(self.sizes[m] + 1)
        record = tensorfile.loads(data, path)
        if not (isinstance(record, dict) and record.get("m") == m and isinstance(record.get("frames"), torch.Tensor)):
            raise CheckpointError(f"{path}: not micro-batch {m} of an ingest log")
        return record

    def truncate(self, below: int) -> int:
        """Delete micro-batches below `below` (a complete checkpoint covers them); returns how many."""
        gone = [m for m in self.sizes if m < below]
        for m in gone:
            try:
                self.fs.delete_file(self.path(m))
            except FileNotFoundError:
                pass
            self.bytes -= self.sizes.pop(m)
        return len(gone)

    def span(self) -> str:
        return f"micro-batches {min(self.sizes)}..{max(self.sizes)}" if self.sizes else "nothing"

    def _listed(self) -> list[int]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(int(mt[1]) for i in infos if (mt := _NAME.match(i.base_name)))

    def _size(self, m: int) -> int:
        return int(self.fs.get_file_info(self.path(m)).size or 0)
