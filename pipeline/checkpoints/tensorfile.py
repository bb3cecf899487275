"""The checkpoint file format: tensors and plain metadata, never code.

A stage's state (weights, optimizer moments, step counts, RNG state, ledger) is a tree of dicts, lists and
tuples whose leaves are tensors, numbers, strings, booleans and None. `torch.save` would pickle it, and
unpickling a file runs whatever the file says: anyone who can write the checkpoint store could then run
code on every machine that loads it. This format is read with `json.loads` and `torch.frombuffer` only,
so the worst a crafted file can do is be refused, or hold other numbers.

    MAGIC                    16 bytes: b"LAMINA-STATE-V1\\n"
    header length            8 bytes, unsigned little-endian
    header                   UTF-8 JSON: {"tree": TREE, "tensors": [{"dtype", "shape", "offset", "nbytes"}, ...]}
    data                     every tensor's bytes back to back, C order, little-endian

In TREE a tensor is {"$tensor": i} (its entry in "tensors"), a tuple {"$tuple": [...]}, and a dict whose keys
are not all plain strings (Adam's state is keyed by parameter index) {"$dict": [[key, value], ...]}; every
other value is itself. Decoding checks every field and raises CheckpointError naming what is wrong.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import torch

from pipeline.errors import CheckpointError

MAGIC = b"LAMINA-STATE-V1\n"
_LENGTH = struct.Struct("<Q")
MAX_HEADER = 64 << 20  # a header larger than this is not a lamina state (a stage's is a few KB)
MAX_TENSORS = 100_000  # nor are more tensors than this (a stage holds a few dozen)
MAX_DIMS = 16

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}


def dumps(tree: Any) -> bytes:
    """Encode a state tree; raises TypeError for a leaf the format does not hold (a function, a module...)."""
    tensors: list[torch.Tensor] = []
    encoded = _encode(tree, tensors)
    entries, offset = [], 0
    blobs = []
    for t in tensors:
        t = t.detach().cpu().contiguous()
        if t.dtype not in _NAMES:
            raise TypeError(f"tensor dtype {t.dtype} is not one the checkpoint format holds ({sorted(DTYPES)})")
        blob = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""  # the raw bytes
        entries.append({"dtype": _NAMES[t.dtype], "shape": list(t.shape), "offset": offset, "nbytes": len(blob)})
        blobs.append(blob)
        offset += len(blob)
    header = json.dumps({"tree": encoded, "tensors": entries}, separators=(",", ":")).encode()
    return b"".join([MAGIC, _LENGTH.pack(len(header)), header, *blobs])


def loads(data: bytes, name: str = "checkpoint file") -> Any:
    """Decode what `dumps` wrote; anything else raises CheckpointError naming `name` and the problem."""
    if not data.startswith(MAGIC):
        hint = " (a pickle: lamina never unpickles)" if data[:1] == b"\x80" or data[:2] == b"PK" else ""
        raise CheckpointError(f"{name}: not a lamina state file{hint}")
    start = len(MAGIC) + _LENGTH.size
    if len(data) < start:
        raise CheckpointError(f"{name}: truncated before its header")
    (length,) = _LENGTH.unpack_from(data, len(MAGIC))
    if length > min(MAX_HEADER, len(data) - start):
        raise CheckpointError(f"{name}: header of {length} bytes does not fit the file ({len(data)} bytes)")
    try:
        header = json.loads(data[start:start + length].decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{name}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict) or set(header) != {"tree", "tensors"} or not isinstance(header["tensors"], list):
        raise CheckpointError(f"{name}: header must be an object with 'tree' and 'tensors'")
    entries = header["tensors"]
    if len(entries) > MAX_TENSORS:
        raise CheckpointError(f"{name}: {len(entries)} tensors, more than a lamina state holds ({MAX_TENSORS})")
    body = memoryview(data)[start + length:]
    tensors, offset = [], 0
    for i, entry in enumerate(entries):  # back to back: every byte of the body belongs to one tensor, once
        tensors.append(_tensor(entry, body, offset, name, i))
        offset += entry["nbytes"]
    if offset != len(body):
        raise CheckpointError(f"{name}: {len(body) - offset} bytes after the last tensor (not written by lamina)")
    try:
        return _decode(header["tree"], tensors)
    except (KeyError, IndexError, TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{name}: malformed state tree ({type(e).__name__}: {e})") from None


def _encode(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return {"$tensor": len(tensors) - 1}
    if isinstance(obj, bool) or obj is None or isinstance(obj, int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"$float": repr(obj)}  # JSON has no inf / nan
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"$dict": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"the checkpoint format holds tensors and plain data, not {type(obj).__name__}")


def _decode(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1 and next(iter(obj)).startswith("$"):
        (tag, value), = obj.items()
        if tag == "$tensor" and type(value) is int and 0 <= value < len(tensors):
            return tensors[value]
        if tag == "$tuple" and isinstance(value, list):
            return tuple(_decode(v, tensors) for v in value)
        if tag == "$dict" and isinstance(value, list):
            out = {}
            for pair in value:
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise ValueError(f"$dict entries are [key, value] pairs (got {pair!r:.60})")
                key = _decode(pair[0], tensors)
                if not isinstance(key, int | str | tuple):
                    raise TypeError(f"dict key of type {type(key).__name__}")
                out[key] = _decode(pair[1], tensors)
            return out
        if tag == "$float" and value in ("inf", "-inf", "nan"):
            return float(value)
        raise ValueError(f"unknown or bad tag {tag}={value!r:.60}")
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _tensor(entry: Any, body: memoryview, offset: int, name: str, i: int) -> torch.Tensor:
    """Tensor i, which must start at `offset` (right after tensor i - 1) and lie inside the body."""
    fields = ("dtype", "shape", "offset", "nbytes")
    if not isinstance(entry, dict) or set(entry) != set(fields):
        raise CheckpointError(f"{name}: tensor {i} must have exactly {list(fields)}")
    dtype, shape, start, nbytes = (entry[f] for f in fields)
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{name}: tensor {i} has unknown dtype {dtype!r:.40}")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(type(n) is int and 0 <= n < 1 << 40
                                                                       for n in shape)
            and math.prod(max(n, 1) for n in shape) < 1 << 48):  # strides must fit, even of an empty tensor
        raise CheckpointError(f"{name}: tensor {i} has a bad shape {shape!r:.60}")
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    if start != offset or type(nbytes) is not int or nbytes != math.prod(shape) * itemsize:
        raise CheckpointError(f"{name}: tensor {i} ({dtype} {shape}) is not {nbytes!r:.20} bytes at {offset}")
    if nbytes > len(body) - offset:
        raise CheckpointError(f"{name}: tensor {i} lies outside the file (truncated?)")
    if nbytes == 0:
        return torch.empty(shape, dtype=DTYPES[dtype])
    raw = torch.frombuffer(bytearray(body[offset:offset + nbytes]), dtype=torch.uint8)  # owns a copy
    return raw.view(DTYPES[dtype]).reshape(shape)
