"""The measurement behind the Ray engine's transport: what one stage-to-stage hop costs.

    python -m pipeline.bench.transport hops          per-hop cost of activation transports vs memcpy

`lamina bench` (pipeline/bench/suite.py) runs `hop_costs` next to its throughput and memory measurements.

Hop: the time from a producer actor handing over an activation (just before it returns / puts it) to a
consumer actor holding a usable array (first line of its method), both read from time.time() on one
machine, median over rounds after warm-up. Transports:

  numpy-ref     numpy array, the producer's output reference passed to the consumer's call (the engine's
                --transport object-store: one copy into the object store, zero-copy read on the other side)
  torch-ref     the same with a torch tensor: pickled by value, so copied in and copied out again
  queue         numpy array put by value on a ray.util.queue.Queue (itself an actor: the item is
                deserialised and re-serialised inside it) and taken by the consumer
  direct        torch tensor by Ray Direct Transport (the engine's --transport direct): the producer's call
                returns the tensor, Ray sends it to the consumer over a collective group of the two (gloo
                on the cpu); only its description goes through the object store
  compiled-graph  numpy array from producer to consumer through a Ray Compiled Graph's shared-memory channel
                (the engine's --transport compiled-graph): no per-call RPC, no object store; the driver
                starts each round by writing the size into the graph's input channel
  shm           numpy array through lamina's shared-memory channel (the engine's --transport shm,
                pipeline/engines/channel.py): the producer copies it into a slot and writes a message into a
                FIFO; the consumer, blocked reading the FIFO, wakes and holds a view of the slot
  shm-in-place  the same channel as the engine's stages use it: the producer makes the array in the slot it
                claimed (a stage's last operation writes its output there: [Note: emitting into a slot] in
                workers/learner.py), then hands it over, and the hand-over copies nothing: the message only
  wake          the same channel with no array: the message alone wakes the blocked consumer. The floor of
                any handover to a process that waits in the kernel, whatever the size: shm is memcpy + wake
  memcpy        numpy copy of the same bytes in one process: the floor any transport is measured against
  memcpy-new    the same copy into a newly allocated array: with the page faults of first-touched memory
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from pipeline.engines import channel, shm

logger = logging.getLogger(__name__)

KB, MB = 1024, 1024 * 1024
SIZES = (64 * KB, 1 * MB, 16 * MB, 64 * MB)
TRANSPORTS = ("numpy-ref", "torch-ref", "queue", "direct", "compiled-graph", "shm", "shm-in-place", "wake")


class _Producer:
    """Holds one payload per size; hands it over as numpy or torch, or puts it on a queue."""

    def __init__(self) -> None:
        self.payloads: dict[int, np.ndarray] = {}
        self.sent = 0.0  # when emit_tensor last handed its tensor over

    def _payload(self, nbytes: int) -> np.ndarray:
        if nbytes not in self.payloads:
            self.payloads[nbytes] = np.random.default_rng(0).random(nbytes // 4, dtype=np.float32)
        return self.payloads[nbytes]

    def emit(self, nbytes: int, as_torch: bool) -> tuple[Any, float]:
        x = self._payload(nbytes)
        out = torch.from_numpy(x) if as_torch else x
        return out, time.time()  # serialisation happens after this: it is part of the hop

    def emit_stamped(self, nbytes: int) -> tuple[np.ndarray, float]:
        x = self._payload(nbytes)
        return x, time.time()  # the channel write happens after this: it is part of the hop

    def emit_tensor(self, nbytes: int) -> torch.Tensor:
        x = torch.from_numpy(self._payload(nbytes))
        self.sent = time.time()  # the send over the collective group happens after this: part of the hop
        return x

    def last_sent(self) -> float:
        return self.sent

    def put(self, queue: Any, nbytes: int) -> None:
        x = self._payload(nbytes)
        queue.put((x, time.time()))

    def shm_open(self, directory: str, phase: int) -> None:
        if phase == 0:
            self.writer = channel.Writer(directory, "hop", 1)
        else:
            self.writer.open_write()

    def shm_send(self, nbytes: int, times: int, in_place: bool = False) -> None:
        x = self._payload(nbytes) if nbytes else None  # 0: the message alone
        for _ in range(times):
            time.sleep(0.002)  # the consumer is back to waiting on the channel, as a stage waits for input
            if in_place and x is not None:  # made in the slot (here: written there), then handed over
                made = self.writer.claim(x.shape, x.dtype)
                np.copyto(made, x)
                self.writer.send(time.time(), made)
            else:
                self.writer.send(time.time(), x)  # the copy into the slot comes after the stamp: part of the hop


class _Consumer:
    def take(self, x: Any) -> float:
        now = time.time()
        assert x.shape[0] > 0
        return now

    def take_stamped(self, msg: tuple[np.ndarray, float]) -> tuple[float, float]:
        now = time.time()
        x, sent = msg
        assert x.shape[0] > 0
        return sent, now

    def take_from(self, queue: Any) -> tuple[float, float]:
        x, sent = queue.get()
        now = time.time()
        assert x.shape[0] > 0
        return sent, now

    def shm_open(self, directory: str, phase: int) -> None:
        if phase == 0:
            self.reader = channel.Reader(directory, "hop")
        else:
            self.reader.open_write()

    def shm_take(self, times: int) -> list[tuple[float, float]]:
        got = []
        for _ in range(times):
            sent, x = self.reader.recv()
            got.append((sent, time.time()))
            if x is not None:
                assert x.shape[0] > 0
                self.reader.release()
        return got


@dataclass(frozen=True)
class HopRow:
    nbytes: int
    ms: dict[str, float]  # transport -> median hop in milliseconds; "memcpy" included


def hop_costs(sizes: Sequence[int] = SIZES, rounds: int = 20, warmup: int = 3,
              transports: Sequence[str] = TRANSPORTS) -> list[HopRow]:
    """Median per-hop cost of each transport for each payload size (needs a connected Ray)."""
    unknown = set(transports) - set(TRANSPORTS)
    if unknown:
        raise ValueError(f"unknown transports {sorted(unknown)}; known: {list(TRANSPORTS)}")
    from ray.util.queue import Queue

    # Handles typed Any: Ray's stubs do not follow methods through ray.remote(cls).
    producer: Any = ray.remote(num_cpus=0)(_Producer).remote()
    consumer: Any = ray.remote(num_cpus=0)(_Consumer).remote()
    queue = Queue(maxsize=1)
    direct: list[Any] = []  # a producer and a consumer that can pass tensors over a gloo group
    if "direct" in transports:
        from ray.experimental.collective import create_collective_group

        rdt = ray.remote(num_cpus=0, enable_tensor_transport=True)  # type: ignore[call-overload]  # (stubs lack it)
        direct = [rdt(c).remote() for c in (_Producer, _Consumer)]
        create_collective_group(direct, backend="torch_gloo")
    graph = None
    if "compiled-graph" in transports:
        from ray.dag import InputNode

        with InputNode() as size:
            dag = consumer.take_stamped.bind(producer.emit_stamped.bind(size))
        graph = dag.experimental_compile(_buffer_size_bytes=max(sizes) + MB)
    shm_dir = None
    if {"shm", "shm-in-place", "wake"} & set(transports):  # the consumer's read end, then the producer's; then the write ends (channel.py)
        shm_dir = tempfile.mkdtemp(prefix="lamina-hops-", dir=shm.shm_dir())
        channel.make(shm_dir, "hop")
        for phase in (0, 1):
            ray.get(consumer.shm_open.remote(shm_dir, phase))
            ray.get(producer.shm_open.remote(shm_dir, phase))
    rows = []
    for nbytes in sizes:
        ms: dict[str, float] = {}
        for transport in transports:
            hops = []
            for r in range(warmup + rounds):
                if transport == "compiled-graph":
                    assert graph is not None
                    sent, received = graph.execute(nbytes).get(timeout=-1)
                elif transport == "direct":
                    x = direct[0].emit_tensor.options(tensor_transport="gloo").remote(nbytes)
                    received = ray.get(direct[1].take.remote(x))
                    sent = ray.get(direct[0].last_sent.remote())
                elif transport in ("shm", "shm-in-place", "wake"):  # all rounds in one call each: as a stage loops
                    if r == 0:
                        got = consumer.shm_take.remote(warmup + rounds)
                        ray.get(producer.shm_send.remote(0 if transport == "wake" else nbytes, warmup + rounds,
                                                         transport == "shm-in-place"))
                        stamps = ray.get(got)
                    sent, received = stamps[r]
                elif transport == "queue":
                    got = consumer.take_from.remote(queue)  # waiting on the queue before the put
                    ray.get(producer.put.remote(queue, nbytes))
                    sent, received = ray.get(got)
                else:
                    x, sent_ref = producer.emit.options(num_returns=2).remote(nbytes, transport == "torch-ref")
                    received = ray.get(consumer.take.remote(x))
                    sent = ray.get(sent_ref)
                if r >= warmup:
                    hops.append(received - sent)
            ms[transport] = 1000 * statistics.median(hops)
        ms["memcpy"] = 1000 * _memcpy(nbytes, rounds)
        ms["memcpy-new"] = 1000 * _memcpy(nbytes, rounds, fresh=True)
        rows.append(HopRow(nbytes, ms))
        logger.info("%s: %s", _size(nbytes), ms)
    if graph is not None:
        graph.teardown(kill_actors=True)
    for actor in (producer, consumer, *direct):
        ray.kill(actor)
    queue.shutdown()
    if shm_dir is not None:
        shutil.rmtree(shm_dir, ignore_errors=True)
    return rows


def _memcpy(nbytes: int, rounds: int, fresh: bool = False) -> float:
    """Median seconds to copy nbytes into a warm buffer, or (fresh) into a newly allocated one: large
    allocations are new pages from the kernel, so that copy also pays the page faults a write into memory
    not touched before does."""
    src = np.random.default_rng(0).random(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(rounds + 3):
        t = time.perf_counter()
        if fresh:
            dst = src.copy()
        else:
            np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    return statistics.median(times[3:])


def hop_table(rows: Sequence[HopRow]) -> str:
    names = [n for n in (*TRANSPORTS, "memcpy", "memcpy-new") if n in rows[0].ms]
    lines = ["| payload | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in rows:
        lines.append(f"| {_size(row.nbytes)} | " + " | ".join(_ms(row.ms[n]) for n in names) + " |")
    return "\n".join(lines)


def _size(nbytes: int) -> str:
    return f"{nbytes // MB} MB" if nbytes >= MB else f"{nbytes // KB} KB"


def _ms(ms: float) -> str:
    return f"{ms:.3f} ms" if ms < 0.1 else f"{ms:.2f} ms" if ms < 10 else f"{ms:.1f} ms"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.transport", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="hops", choices=("hops",))
    parser.add_argument("--sizes-kb", default="64,1024,16384", help="payload sizes in KB")
    parser.add_argument("--rounds", type=int, default=20, help="measured rounds per size and transport")
    parser.add_argument("--worker-niceness", type=int, default=None,
                        help="niceness of Ray's workers (Ray's default: 15); 0 keeps other, niced jobs on a "
                             "shared machine from taking the measured processes' CPU")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    system = {} if args.worker_niceness is None else {"worker_niceness": args.worker_niceness}
    ray.init(address="local", num_cpus=2, include_dashboard=False, _system_config=system)
    sizes = [int(s) * KB for s in args.sizes_kb.split(",")]
    print(hop_table(hop_costs(sizes, args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
