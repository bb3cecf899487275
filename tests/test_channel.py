"""The shared-memory channel under the shm transport (pipeline/engines/channel.py), between real processes:
arrays arrive intact through slots that grow when needed, an array made in a claimed slot is sent without a
copy, the writer blocks when every slot is taken, and a process that dies makes the other end raise
ChannelClosed instead of hanging."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.engines import channel

pytestmark = pytest.mark.timeout(120)

SPAWN = mp.get_context("spawn")


def _echo(directory: str, opened: mp.Queue, results: mp.Queue) -> None:
    """Child: read every message, send back (header, sum, dtype, shape, writable) until a None header."""
    reader = channel.Reader(directory, "c")
    opened.put("read ends")
    assert opened.get(timeout=30) == "write ends"  # the writer's are open: an end of file now means it is gone
    reader.open_write()
    results.put("open")  # ... and so are this side's: the writer may wait for a free slot from now on
    while True:
        header, x = reader.recv()
        if header is None:
            break
        results.put((header, None if x is None else (float(x.sum()), x.dtype.str, x.shape, x.flags.writeable)))
        if x is not None:
            reader.release()
    reader.close()


def _writer_then_sleep(directory: str, opened: mp.Queue, sent: mp.Queue) -> None:
    """Child: open a writer, send one array, then wait to be killed."""
    writer = channel.Writer(directory, "c", 2)
    opened.put("read ends")
    assert opened.get(timeout=30) == "write ends"
    writer.open_write()
    writer.send("one", np.ones(4, np.float32))
    sent.put("sent")
    time.sleep(60)


def _opened_pair(tmp_path: Path, target, *extra: object) -> tuple[mp.Process, mp.Queue]:
    channel.make(str(tmp_path), "c")
    opened = SPAWN.Queue()
    child = SPAWN.Process(target=target, args=(str(tmp_path), opened, *extra), daemon=True)
    child.start()
    assert opened.get(timeout=60) == "read ends"
    return child, opened


def _writer_to_echo(tmp_path: Path, slots: int) -> tuple[mp.Process, channel.Writer, mp.Queue]:
    """A writer of `slots` slots, both ends open, to a child that echoes what it reads into the queue."""
    results = SPAWN.Queue()
    child, opened = _opened_pair(tmp_path, _echo, results)
    writer = channel.Writer(str(tmp_path), "c", slots)
    writer.open_write()
    opened.put("write ends")
    assert results.get(timeout=30) == "open"
    return child, writer, results


def _pair(directory: str, slots: int) -> tuple[channel.Reader, channel.Writer]:
    """Both ends of channel "c" in this process, opened in the order the module docstring asks."""
    channel.make(directory, "c")
    reader = channel.Reader(directory, "c")
    writer = channel.Writer(directory, "c", slots)
    writer.open_write()
    reader.open_write()
    return reader, writer


def test_arrays_arrive_intact_and_a_larger_one_grows_its_slot(tmp_path: Path) -> None:
    child, writer, results = _writer_to_echo(tmp_path, 2)
    arrays = [np.arange(12, dtype=np.float32).reshape(3, 4), np.full((2, 2, 2), 7, np.int64),
              np.arange(300_000, dtype=np.float64),  # larger than the first slot: the slot grows
              np.arange(5, dtype=np.float32)]
    for i, a in enumerate(arrays):
        writer.send(("a", i), a)
    writer.send(("no array", 9))
    writer.send(None)
    got = [results.get(timeout=30) for _ in range(len(arrays) + 1)]
    child.join(30)
    assert got[:-1] == [(("a", i), (float(a.sum()), a.dtype.str, a.shape, False)) for i, a in enumerate(arrays)]
    assert got[-1] == (("no array", 9), None)
    slots = sorted(p.name for p in tmp_path.glob("c.slot*"))
    assert len(slots) == 2 and any(name.endswith(".3") for name in slots), slots  # slot 0 was replaced once
    writer.close()
    assert list(tmp_path.glob("c.slot*")) == []


def test_the_writer_blocks_while_every_slot_is_taken(tmp_path: Path) -> None:
    reader, writer = _pair(str(tmp_path), 2)
    for i in range(2):
        writer.send(i, np.full(8, i, np.float32))
    third = threading.Thread(target=writer.send, args=(2, np.full(8, 2, np.float32)), daemon=True)
    third.start()
    third.join(0.5)
    assert third.is_alive()  # both slots are the reader's until it releases one
    header, x = reader.recv()
    assert header == 0 and x is not None and (x == 0).all()
    reader.release()
    third.join(10)
    assert not third.is_alive()
    assert [reader.recv()[0] for _ in range(2)] == [1, 2]
    reader.close()
    writer.close()


def test_an_array_made_in_a_claimed_slot_is_sent_without_a_copy(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    reader, writer = _pair(str(tmp_path), 2)
    copies: list[int] = []
    copyto = np.copyto
    monkeypatch.setattr(channel.np, "copyto", lambda dst, src, **kw: (copies.append(src.nbytes), copyto(dst, src, **kw)))
    view = writer.claim((6, 4), np.dtype(np.float32))
    assert view.flags.writeable and writer.claim((6, 4), np.dtype(np.float32)).ctypes.data == view.ctypes.data
    view[:] = np.arange(24, dtype=np.float32).reshape(6, 4)  # made in the slot
    writer.send("made in place", view.reshape(2, 3, 4))  # a view of the claimed slot: nothing to copy
    writer.send("copied", np.ones(5, np.float32))  # an ordinary array: copied into the next slot
    assert copies == [20]
    header, x = reader.recv()
    assert header == "made in place" and x is not None and x.shape == (2, 3, 4)
    assert np.array_equal(x.ravel(), np.arange(24, dtype=np.float32))
    # Both slots are the reader's now: a claim waits for one to come back, as a send does.
    third = threading.Thread(target=writer.claim, args=((4,), np.dtype(np.float32)), daemon=True)
    third.start()
    third.join(0.5)
    assert third.is_alive()
    reader.release()
    third.join(10)
    assert not third.is_alive()
    assert reader.recv()[0] == "copied"
    reader.close()
    writer.close()


def test_messages_come_whole_small_or_larger_than_the_fifo_holds(tmp_path: Path) -> None:
    reader, writer = _pair(str(tmp_path), 2)
    big = bytes(range(256)) * 1200  # 300 KB: more than the FIFO holds, so the writer waits for the reader
    headers = [("small", 1), ("big", big), ("small", 2), ("small", 3)]
    sender = threading.Thread(target=lambda: [writer.send(h) for h in headers], daemon=True)
    sender.start()  # the big one blocks the sender until the reader takes it in parts
    assert [reader.recv()[0] for _ in headers] == headers
    sender.join(10)
    writer.close()
    with pytest.raises(channel.ChannelClosed):
        reader.recv()  # the writer is gone and nothing is left: end of file
    reader.close()


def test_a_dead_writer_ends_the_readers_wait(tmp_path: Path) -> None:
    sent = SPAWN.Queue()
    child, opened = _opened_pair(tmp_path, _writer_then_sleep, sent)
    reader = channel.Reader(str(tmp_path), "c")  # after the child's read end, before its write end
    opened.put("write ends")
    reader.open_write()
    assert sent.get(timeout=30) == "sent"
    header, x = reader.recv()
    assert header == "one" and x is not None and x.sum() == 4
    os.kill(child.pid, signal.SIGKILL)
    with pytest.raises(channel.ChannelClosed):
        reader.recv()
    child.join(10)
    reader.close()


def test_a_dead_reader_fails_the_writers_send(tmp_path: Path) -> None:
    child, writer, results = _writer_to_echo(tmp_path, 1)
    writer.send("first", np.ones(4, np.float32))
    assert results.get(timeout=30)[0] == "first"
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    with pytest.raises(channel.ChannelClosed):
        for _ in range(3):  # the reader's ends are closed: a broken pipe, or end of file on the free FIFO
            writer.send("more", np.ones(4, np.float32))
    writer.close()


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs tmpfs: it refuses an oversized slot before taking any page")
def test_a_slot_that_does_not_fit_in_shared_memory_is_an_error_naming_the_way_out() -> None:
    directory = tempfile.mkdtemp(prefix="lamina-test-", dir="/dev/shm")
    try:
        reader, writer = _pair(directory, 1)
        # A broadcast view: as many bytes as all of /dev/shm and more, while holding one float.
        huge = np.broadcast_to(np.float32(1), ((shutil.disk_usage(directory).total + 2**30) // 4,))
        with pytest.raises(OSError, match=r"no room for a .* MiB channel slot .* --transport object-store"):
            writer.send("too big", huge)
        assert [p for p in os.listdir(directory) if ".slot" in p] == []  # nothing half-made is left behind
        writer.send("fits", np.ones(3, np.float32))
        header, x = reader.recv()
        assert header == "fits" and x is not None and x.sum() == 3
        reader.close()
        writer.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
