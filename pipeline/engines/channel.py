"""A one-writer, one-reader channel between two processes on one node: arrays through shared memory,
messages through a FIFO. The `shm` transport (pipeline/engines/shm.py) chains stages with these.

    writer                                          reader
      take a free slot  <------- free FIFO --------   release(): one byte, once its array is used
      copy the array into slot i (one memcpy)         recv(): the message, and a view of slot i (no copy)
      send the message, naming slot i  -- msg FIFO -->

A writer that makes the array itself can make it in the slot: `claim` gives a writable view of the next
free slot, and `send` of that view copies nothing (the stages write their outputs so: [Note: emitting into
a slot] in workers/learner.py).

A channel is a directory's files: `NAME.msg` and `NAME.free` (FIFOs) and `NAME.slot<i>.<generation>`
(shared-memory files, in /dev/shm where there is one). Slots are used in turn, so the free FIFO carries one
byte per released slot and the writer blocks on it when all `slots` are taken: that is the bounded queue.
A slot too small for an array is replaced by a larger file (a new generation); the reader maps each slot's
file once and again only when the message names a new one.

Both ends block in the kernel (read on a FIFO), never poll: a stage waiting for input costs no CPU. A
process that dies closes its ends, so the other side's read sees end of file and its write a broken pipe:
both raise `ChannelClosed`. Opening: every party opens its read ends (`Reader(...)`, `Writer(...)`) before
anyone opens a write end (`open_write`), and every party opens its write ends before anyone reads, so that an
end of file always means the other side is gone (pipeline/engines/shm.py does this in two rounds of calls).

Messages are pickles, as Ray's own are: the directory is the run's own (mode 0700, made by the driver), so
only the run's processes can write into its FIFOs.
"""

from __future__ import annotations

import math
import mmap
import os
import pickle
import shutil
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

_LEN = struct.Struct("<I")  # a message: its length, then its pickle


class ChannelClosed(Exception):
    """The other end of a channel is gone (its process ended or closed it)."""


def make(directory: str, name: str) -> None:
    """Create channel `name`'s FIFOs in `directory` (the slot files are made by the writer as needed)."""
    for end in ("msg", "free"):
        os.mkfifo(os.path.join(directory, f"{name}.{end}"), 0o600)


def _open_fifo(path: str, flags: int) -> int:
    """Open a FIFO end without blocking (a write end needs its reader open already), then make it blocking."""
    fd = os.open(path, flags | os.O_NONBLOCK)
    os.set_blocking(fd, True)
    return fd


# A message is written in one write and, up to the pipe's buffer (64 KiB on Linux), read in one read: the
# first call below is the whole of it, and the loops are for larger messages only. On the hop's path the
# few microseconds of Python matter next to the wake-up (PERFLOG.md, M13).


def _read_exact(fd: int, n: int) -> bytes:
    chunk = os.read(fd, n)
    if len(chunk) == n:
        return chunk
    chunks, got = [chunk], len(chunk)
    while got < n:
        if not chunk:
            raise ChannelClosed(f"end of file after {got} of {n} bytes")
        chunk = os.read(fd, n - got)
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    try:
        done = os.write(fd, data)
        if done < len(data):
            view = memoryview(data)[done:]
            while view:
                view = view[os.write(fd, view):]
    except OSError as e:  # a broken pipe: the reader is gone
        raise ChannelClosed(str(e)) from e


def _send_message(fd: int, message: Any) -> None:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    _write_all(fd, _LEN.pack(len(body)) + body)


def _recv_message(fd: int) -> Any:
    (n,) = _LEN.unpack(_read_exact(fd, _LEN.size))
    return pickle.loads(_read_exact(fd, n))


class Reader:
    """The reading end of channel `name`. Open before the writer's end (module docstring)."""

    def __init__(self, directory: str, name: str) -> None:
        self.base = os.path.join(directory, name)
        self.msg = _open_fifo(self.base + ".msg", os.O_RDONLY)
        self.free = -1  # opened by open_write, once the writer has opened its read end of it
        self._maps: dict[int, tuple[str, mmap.mmap]] = {}  # slot -> (its file, the mapping)

    def open_write(self) -> None:
        self.free = _open_fifo(self.base + ".free", os.O_WRONLY)

    def recv(self) -> tuple[Any, np.ndarray | None]:
        """The next message and, when it carries one, a read-only view of its array in the slot (valid
        until `release`)."""
        header, slot = _recv_message(self.msg)
        if slot is None:
            return header, None
        i, path, shape, dtype = slot
        if self._maps.get(i, ("",))[0] != path:  # a slot seen for the first time, or grown since
            fd = os.open(path, os.O_RDONLY)
            try:
                self._maps[i] = (path, mmap.mmap(fd, 0, prot=mmap.PROT_READ))
            finally:
                os.close(fd)
        return header, np.frombuffer(self._maps[i][1], dtype=dtype, count=math.prod(shape)).reshape(shape)

    def release(self) -> None:
        """Give the oldest slot back to the writer (its array is no longer read)."""
        _write_all(self.free, b"\0")

    def close(self) -> None:
        for fd in (self.msg, self.free):
            if fd >= 0:
                os.close(fd)
        self.msg = self.free = -1
        self._maps.clear()  # a view still held keeps its mapping alive until it is dropped


@dataclass(frozen=True)
class _Slot:
    """One of a writer's slots: its file, the mapping, its size and where the mapping starts."""

    path: str
    mm: mmap.mmap
    size: int
    address: int


class Writer:
    """The writing end of channel `name`, with `slots` array slots in flight at most."""

    def __init__(self, directory: str, name: str, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"a channel needs at least one slot (got {slots})")
        self.base, self.slots = os.path.join(directory, name), slots
        self.free = _open_fifo(self.base + ".free", os.O_RDONLY)
        self.msg = -1  # opened by open_write, once the reader has opened its end
        self._credits = slots  # slots the reader has given back and not yet reused
        self._next = 0  # the slot the next array goes into
        self._files: list[_Slot | None] = [None] * slots
        self._generation = 0

    def open_write(self) -> None:
        self.msg = _open_fifo(self.base + ".msg", os.O_WRONLY)

    def claim(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A writable view of the next free slot, of `shape` and `dtype` (blocks while none is free): fill it
        and `send` it, and the send copies nothing. Claiming again before a send gives the same slot."""
        self._await_credit()
        count = math.prod(shape)
        held = self._slot(self._next, count * np.dtype(dtype).itemsize)
        return np.frombuffer(held.mm, dtype=dtype, count=count).reshape(shape)

    def send(self, header: Any, array: np.ndarray | None = None) -> None:
        """Send `header` and, with it, `array` in the next free slot (blocks while none is free): a copy of
        it, or nothing to copy when it is the view `claim` gave, or a view of that."""
        slot = None
        if array is not None:
            self._await_credit()
            i = self._next
            held = self._slot(i, array.nbytes)  # may refuse (no room): then no slot is used up
            if not (array.__array_interface__["data"][0] == held.address and array.flags.c_contiguous):
                view = np.frombuffer(held.mm, dtype=array.dtype, count=array.size).reshape(array.shape)
                np.copyto(view, array, casting="no")  # not made in the slot: copied there
            self._credits -= 1
            self._next = (i + 1) % self.slots
            slot = (i, held.path, array.shape, array.dtype.str)
        _send_message(self.msg, (header, slot))

    def _await_credit(self) -> None:
        """Block until the reader has given a slot back, unless one is free already."""
        if not self._credits:
            got = os.read(self.free, self.slots)
            if not got:
                raise ChannelClosed("the reader is gone")
            self._credits += len(got)

    def _slot(self, i: int, nbytes: int) -> _Slot:
        held = self._files[i]
        if held is not None and held.size >= nbytes:
            return held
        if held is not None:
            os.unlink(held.path)  # the reader has released it: it maps the new file when the message names it
            self._files[i] = None
        self._generation += 1
        path = f"{self.base}.slot{i}.{self._generation}"
        size = max(nbytes, mmap.PAGESIZE)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            # Reserve the pages now: a write through the mapping into a full tmpfs would be SIGBUS, not an error.
            os.posix_fallocate(fd, 0, size)
            mm = mmap.mmap(fd, size)
        except OSError as e:
            os.close(fd)
            os.unlink(path)
            free = shutil.disk_usage(os.path.dirname(path)).free
            raise OSError(e.errno, f"no room for a {size / 2**20:.1f} MiB channel slot in {os.path.dirname(path)} "
                                   f"({free / 2**20:.1f} MiB free): enlarge /dev/shm (a container's default is "
                                   f"64 MiB) or use --transport object-store") from e
        os.close(fd)
        held = self._files[i] = _Slot(path, mm, size, np.frombuffer(mm, np.uint8, count=1).__array_interface__["data"][0])
        return held

    def close(self) -> None:
        for fd in (self.msg, self.free):
            if fd >= 0:
                os.close(fd)
        self.msg = self.free = -1
        for held in self._files:
            if held is not None:
                try:
                    os.unlink(held.path)
                except FileNotFoundError:
                    pass
        self._files = [None] * self.slots
