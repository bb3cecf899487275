"""One pushed frame: its bytes decoded (raw, PNG, JPEG) and brought to the run's frame shape.

No gRPC here: the server hands in the message's fields, and every problem is a `FrameError` carrying the
proto's reason code, so the same checks serve any transport. A frame is kept as uint8 at the run's
--size (C, SIZE, SIZE), as `lamina prepare` stores them: a clip of 8 RGB frames at 32x32 is 24 KB.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.ingest.proto.lamina.v1 import ingest_pb2 as pb

MAX_PIXELS = 4096 * 4096  # a PNG / JPEG header promising more is refused before decoding (a decompression bomb)
RAW_DTYPES = {"uint8": np.uint8, "float32": np.float32}


class FrameError(ValueError):
    """A frame that cannot be taken; `reason` is the proto's Reason code."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def decode(encoding: int, data: bytes, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The frame's pixels as (H, W, C) uint8, C = 1 or 3; FrameError when they cannot be read."""
    if encoding == pb.RAW:
        return _raw(data, shape, dtype)
    if encoding in (pb.PNG, pb.JPEG):
        return _image(data, "PNG" if encoding == pb.PNG else "JPEG")
    raise FrameError(pb.UNKNOWN_ENCODING, f"unknown encoding {encoding} (expected RAW=1, PNG=2 or JPEG=3)")


def _raw(data: bytes, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    if dtype not in RAW_DTYPES:
        raise FrameError(pb.UNKNOWN_ENCODING, f"RAW dtype {dtype!r} is not one of {sorted(RAW_DTYPES)}")
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3)) or min(shape) < 1:
        raise FrameError(pb.UNDECODABLE, f"RAW shape {list(shape)} is not [H, W] or [H, W, C] with C 1 or 3")
    if shape[0] * shape[1] > MAX_PIXELS:
        raise FrameError(pb.UNDECODABLE, f"RAW shape {list(shape)}: more than {MAX_PIXELS} pixels")
    kind = RAW_DTYPES[dtype]
    want = int(np.prod(shape)) * np.dtype(kind).itemsize
    if len(data) != want:
        raise FrameError(pb.UNDECODABLE, f"RAW {dtype} {list(shape)} needs {want} bytes, the frame has {len(data)}")
    x = np.frombuffer(data, dtype=kind).reshape(shape[0], shape[1], -1)
    if kind is np.float32:
        if not np.isfinite(x).all():
            raise FrameError(pb.UNDECODABLE, "RAW float32 frame holds non-finite values")
        x = (np.clip(x, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return x


def _image(data: bytes, kind: str) -> np.ndarray:
    from PIL import Image  # Pillow comes with matplotlib

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=[kind])
            if im.size[0] * im.size[1] > MAX_PIXELS:
                raise FrameError(pb.UNDECODABLE, f"{kind} of {im.size[0]}x{im.size[1]}: more than {MAX_PIXELS} pixels")
            im.load()
    except FrameError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds on bad bytes; each is this frame's problem
        raise FrameError(pb.UNDECODABLE, f"not a readable {kind} ({type(e).__name__}: {e})") from None
    x = np.asarray(im.convert("L" if im.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"), dtype=np.uint8)
    return x[..., None] if x.ndim == 2 else x


def to_frame(pixels: np.ndarray, size: int, channels: int) -> np.ndarray:
    """(H, W, C) uint8 -> (channels, size, size) uint8: grey and colour converted, resized as the loaders do
    (area averaging when shrinking, bilinear when enlarging; pipeline/sources/videos.py)."""
    x = torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float()  # a copy: RAW pixels are read-only
    if x.shape[0] != channels:
        x = x.mean(0, keepdim=True) if channels == 1 else x.repeat(channels, 1, 1)
    h, w = x.shape[1:]
    if (h, w) != (size, size):
        shrink = min(h, w) >= size
        x = F.interpolate(x[None], size=(size, size), mode="area" if shrink else "bilinear",
                          align_corners=None if shrink else False)[0]
    return x.round_().clamp_(0, 255).to(torch.uint8).numpy()
