"""Where a run's durable files live: a local path or a `pyarrow.fs` URI, and which of them every node reaches.

[Note: shared storage]
A location is one of two things, and its spelling says which:

    runs/x, /data/runs/x          a path: a directory on the disk of whichever machine opens it
    s3://bucket/runs/x            a URI: opened through pyarrow.fs (s3, gs, abfs, hdfs, ...), the same
    gs://bucket/runs/x?...        store from every node (query options such as ?region=... or
                                  ?endpoint_override=... go to pyarrow)
    file:///mnt/shared/runs/x     a URI too: a local path *declared shared*, a mount (NFS, EFS,
                                  Filestore, a volume every pod mounts) at the same path on every node

On one machine the two are interchangeable. On a cluster they are not: each stage actor writes its part of
a checkpoint from its own node, and the driver commits the checkpoint by looking at those files from its
node, so a checkpoint store that is a plain path would be a different directory on every node, and the
first barrier would fail. lamina cannot see whether a directory is mounted elsewhere; the scheme is the
declaration: a plain path is taken to be node-local, a URI (`file://` included) to be reachable from every
node. pipeline/engines/placement.py refuses a node-local store as soon as the stages and the driver are
known to span more than one node, before the first micro-batch.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs


def is_uri(location: str) -> bool:
    """A URI (`scheme://...`), opened through pyarrow.fs; otherwise a plain path."""
    return "://" in location


def is_shared(location: str) -> bool:
    """Whether every node reaches `location` ([Note: shared storage]): a URI does, a plain path does not."""
    return is_uri(location)


def open_location(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem that holds `location` and the path inside it; raises ValueError for a location pyarrow
    cannot open (an unknown scheme, a malformed URI, a filesystem this pyarrow was built without)."""
    try:
        if is_uri(location):
            fs, root = pafs.FileSystem.from_uri(location)
        else:
            fs, root = pafs.LocalFileSystem(), os.path.abspath(location)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise ValueError(f"{location!r} is neither a path nor a URI pyarrow.fs can open ({e})") from None
    return fs, root.rstrip("/") or "/"


def join(location: str, *names: str) -> str:
    """`location`/name/...: for a URI, inside its path and before its query options."""
    if not is_uri(location):
        return os.path.join(location, *names)
    base, sep, query = location.partition("?")
    return "/".join([base.rstrip("/"), *names]) + sep + query
