"""The metrics log: one row per (micro-batch, layer), written to Parquet as the run goes.

[Note: metrics that survive]
A Parquet file is readable only once its footer is written, so a file kept open for the whole run would be
lost with the process. The log buffers rows and writes them every FLUSH_S seconds as a new part file
(temporary name, then a rename): a run that fails, is stopped or is killed with SIGKILL keeps every row up
to at most FLUSH_S seconds before its end.

    RUN_DIR/metrics/part-000000.parquet    rows in the order the driver saw them
    RUN_DIR/metrics/part-000001.parquet    ...

RUN_DIR may be a URI ([Note: shared storage] in pipeline/storage.py): the parts are then written through
pyarrow.fs to object storage, one small object per flush, and outlive the machine the driver ran on.

Every COMPACT_AT parts the log merges them into one (written first, the old parts deleted after, so a crash
in between leaves duplicates, never a gap; readers keep the newest copy of a row). A resumed run starts its
log with a part holding the rows below the micro-batch it resumes at, marked `lamina.restart`; a reader
drops every older part's rows at or above that mark, so the rows of micro-batches the resumed run redoes
appear once, from the run that applied them last.
"""

from __future__ import annotations

import logging
import os
import re
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.stage import LayerReport, StepReport

logger = logging.getLogger(__name__)

FLUSH_S = 2.0  # a hard kill loses at most this much of the record
COMPACT_AT = 16  # parts before the log merges them
RESTART_KEY = b"lamina.restart"
_PART = re.compile(r"^part-(\d+)\.parquet$")
METRICS = ("loss", "pos", "neg", "over", "spread")  # LayerReport's metrics, in its order
SCHEMA = pa.schema(
    [("step", pa.int64()), ("layer", pa.int32()), ("stage", pa.int32()), ("time", pa.float64())]
    + [(name, pa.float64()) for name in METRICS]
    + [("busy_start", pa.float64()), ("busy_end", pa.float64()), ("mb_per_s", pa.float64()), ("busy", pa.float64())])
assert [f.name for f in LayerReport.__dataclass_fields__.values()][1:] == list(METRICS)


def report_rows(reports: list[StepReport], seen: float) -> list[dict]:
    """The rows of one micro-batch: one per layer, with its stage's busy interval, rate and busy fraction."""
    return [{"step": r.micro_batch, "layer": lr.layer, "stage": r.stage, "time": seen,
             **{name: getattr(lr, name) for name in METRICS},
             "busy_start": r.start, "busy_end": r.end, "mb_per_s": r.rate, "busy": r.busy}
            for r in reports for lr in r.layers]


class MetricsLog:
    """Appends rows under `directory` (a path or a pyarrow.fs URI); `restart`: the micro-batch a resumed run
    starts at (None: a new run)."""

    def __init__(self, directory: str | os.PathLike, restart: int | None = None,
                 flush_s: float = FLUSH_S) -> None:
        self.fs, self.dir = storage.open_location(os.fspath(directory))
        self.fs.create_dir(self.dir, recursive=True)
        self.flush_s = flush_s
        self._rows: list[dict] = []
        self._last_flush = time.monotonic()
        self._next = max((n for n, _ in _parts(self.fs, self.dir)), default=-1) + 1
        if restart is not None:
            self._rewrite(_read(self.fs, self.dir).filter(pc.field("step") < restart), restart)

    def append(self, reports: list[StepReport]) -> None:
        """Record one micro-batch; writes a part when FLUSH_S has passed since the last one."""
        self._rows += report_rows(reports, time.time())
        if time.monotonic() - self._last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as a new part (nothing when there are none)."""
        self._last_flush = time.monotonic()
        if not self._rows:
            return
        self._write(pa.Table.from_pylist(self._rows, schema=SCHEMA))
        self._rows = []
        if len(_parts(self.fs, self.dir)) >= COMPACT_AT:
            self._rewrite(_read(self.fs, self.dir))

    def _rewrite(self, table: pa.Table, restart: int | None = None) -> None:
        """Replace every part so far by one holding `table` (marked with `restart` when given)."""
        old = _parts(self.fs, self.dir)
        if not old:
            return
        if restart is not None:
            table = table.replace_schema_metadata({RESTART_KEY: str(restart).encode()})
        self._write(table)
        for _, path in old:
            try:
                self.fs.delete_file(path)
            except FileNotFoundError:
                pass

    def _write(self, table: pa.Table) -> None:
        """A new part: written under a temporary name, then moved into place (readers never see half a part;
        on object storage the move is a copy, and the temporary name is not a part's name)."""
        path = f"{self.dir}/part-{self._next:06d}.parquet"
        self._next += 1
        tmp = f"{path}.tmp"
        pq.write_table(table, tmp, filesystem=self.fs)
        self.fs.move(tmp, path)


def read_metrics(directory: str | os.PathLike) -> pa.Table:
    """Every row of the log under `directory` (a path or a pyarrow.fs URI), each (step, layer) once (its
    newest copy), sorted by step and layer. A part that cannot be read (not Parquet, another schema) is
    skipped with a warning: the log is a record, not state."""
    return _read(*storage.open_location(os.fspath(directory)))


def _read(fs: pafs.FileSystem, directory: str) -> pa.Table:
    tables: list[pa.Table] = []
    for _, path in _parts(fs, directory):
        try:
            table = pq.read_table(path, filesystem=fs)
            restart = (table.schema.metadata or {}).get(RESTART_KEY)
            mark = int(restart) if restart is not None else None
            table = table.select(SCHEMA.names).cast(SCHEMA.remove_metadata())
        except FileNotFoundError:  # compacted away while we listed
            continue
        except (OSError, ValueError, KeyError, pa.ArrowException) as e:
            logger.warning("%s: not a metrics part (%s); skipping it", path, e)
            continue
        if mark is not None:
            tables = [t.filter(pc.field("step") < mark) for t in tables]
        tables.append(table.replace_schema_metadata(None))
    if not tables:
        return SCHEMA.empty_table()
    table = pa.concat_tables(tables).append_column("order", pa.array(range(sum(map(len, tables))), pa.int64()))
    newest = table.group_by(["step", "layer"]).aggregate([("order", "max")]).column("order_max")
    return table.take(newest).drop_columns(["order"]).sort_by([("step", "ascending"), ("layer", "ascending")])


def _parts(fs: pafs.FileSystem, directory: str) -> list[tuple[int, str]]:
    """(number, path) of every part under `directory`, in order (none when it does not exist yet)."""
    infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    found = [(_PART.match(i.base_name), i.path) for i in infos if i.type == pafs.FileType.File]
    return sorted((int(m[1]), path) for m, path in found if m)
