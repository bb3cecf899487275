"""Real video files for the tests, encoded with PyAV here: moving shapes with known labels in several codecs
and containers, image sequences, and every kind of damaged input (made from good files, never by editing
the shared ones in place)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import av
import numpy as np
from PIL import Image

# (codec, container extension, pixel format): real-world variety that FFmpeg encodes here.
CODECS = [("libx264", ".mp4", "yuv420p"), ("mpeg4", ".avi", "yuv420p"), ("libvpx-vp9", ".webm", "yuv420p"),
          ("mjpeg", ".mkv", "yuvj420p"), ("ffv1", ".mkv", "yuv420p"), ("mpeg2video", ".ts", "yuv420p")]
SHAPES = ("disc", "square")


def shape_frames(shape: str, n: int, w: int, h: int, seed: int) -> np.ndarray:
    """(n, h, w, 3) uint8: one bright shape drifting over a dark background, its own seed for the path."""
    rng = np.random.default_rng(seed)
    x0, y0 = rng.uniform(0.25, 0.75, 2)
    vx, vy = rng.uniform(-0.015, 0.015, 2)
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        cx, cy, r = (x0 + vx * t) % 1 * w, (y0 + vy * t) % 1 * h, min(w, h) * 0.22
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r if shape == "disc" else (abs(xx - cx) < r) & (abs(yy - cy) < r)
        out[t] = (30, 40, 60)
        out[t][mask] = (230, 200, 50) if shape == "disc" else (60, 220, 120)
    return out


def encode(path: Path, frames: np.ndarray, codec: str = "libx264", pix: str = "yuv420p", fps: int = 10,
           fmt: str | None = None, container_options: dict[str, str] | None = None) -> Path:
    """Encode (n, h, w, 3) uint8 frames into a video file."""
    with av.open(str(path), "w", format=fmt, options=container_options or {}) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix
        for img in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def shapes_dataset(root: Path, per_class: int = 3, n: int = 24, w: int = 48, h: int = 36,
                   codecs: list[tuple[str, str, str]] | None = None) -> Path:
    """A folder-per-label layout: root/<shape>/<shape>-<i><ext>, codecs and containers taken in turn."""
    codecs = codecs or CODECS
    k = 0
    for shape in SHAPES:
        (root / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            codec, ext, pix = codecs[k % len(codecs)]
            encode(root / shape / f"{shape}-{i}{ext}", shape_frames(shape, n, w, h, seed=k), codec, pix)
            k += 1
    return root


def image_sequence(folder: Path, shape: str = "disc", n: int = 12, w: int = 40, h: int = 30, seed: int = 0,
                   sizes: list[tuple[int, int]] | None = None) -> Path:
    """A folder of PNG frames; `sizes` gives some frames another size (a damaged sequence)."""
    folder.mkdir(parents=True, exist_ok=True)
    for t, img in enumerate(shape_frames(shape, n, w, h, seed)):
        pic = Image.fromarray(img)
        if sizes and t < len(sizes) and sizes[t] != (w, h):
            pic = pic.resize(sizes[t])
        pic.save(folder / f"frame-{t:04d}.png")
    return folder


# -- damaged inputs ----------------------------------------------------------------------------------------


def truncated(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[:int(len(data) * fraction)])
    return dst


def byte_flipped(src: Path, dst: Path, flips: int = 50, seed: int = 0) -> Path:
    """Flip bytes in the last 90 % of the file (the frames, not the header)."""
    data = bytearray(src.read_bytes())
    rng = np.random.default_rng(seed)
    for i in rng.integers(len(data) // 10, len(data), flips):
        data[i] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


def audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as c:
        a = c.add_stream("aac", rate=8000)
        for i in range(20):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, i * 1024
            for p in a.encode(frame):
                c.mux(p)
        for p in a.encode():
            c.mux(p)
    return path


def size_change(path: Path, tmp: Path) -> Path:
    """An MPEG-TS whose frames are 48x36 and then 64x36: two encodes remuxed into one stream."""
    a = encode(tmp / "part-a.ts", shape_frames("disc", 12, 48, 36, 0), fmt="mpegts")
    b = encode(tmp / "part-b.ts", shape_frames("disc", 12, 64, 36, 1), fmt="mpegts")
    with av.open(str(path), "w", format="mpegts") as out:
        stream = None
        offset = 0
        for part in (a, b):
            with av.open(str(part)) as src:
                if stream is None:
                    stream = out.add_stream_from_template(src.streams.video[0])
                last = offset
                for p in src.demux(src.streams.video[0]):
                    if p.dts is None or p.pts is None:
                        continue
                    p.pts += offset
                    p.dts += offset
                    last = max(last, p.pts)
                    p.stream = stream
                    out.mux(p)
                offset = last + 9000
    return path


def damaged_set(folder: Path, good: Path, long_good: Path, tmp: Path) -> dict[str, str]:
    """Every kind of bad video file in `folder`, made from `good` (a small mp4) and `long_good` (an mkv
    whose container declares its duration); returns file name -> a fragment of the reason expected."""
    folder.mkdir(parents=True, exist_ok=True)
    faststart = encode(tmp / "faststart.mp4", shape_frames("disc", 60, 48, 36, 3),
                       container_options={"movflags": "faststart"})
    truncated(faststart, folder / "truncated.mp4", 0.7)
    truncated(long_good, folder / "truncated.mkv", 0.6)
    byte_flipped(long_good, folder / "flipped.mkv")
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "notes.mp4").write_text("this is not a video\n" * 20)
    audio_only(folder / "audio.mp4")
    size_change(folder / "resized.ts", tmp)
    os.symlink(folder / "gone.mp4", folder / "dangling.mkv")  # unreadable: names a file that does not exist
    shutil.copy(good, folder / "good.mp4")
    return {"truncated.mp4": "damaged", "truncated.mkv": "truncated", "flipped.mkv": "damaged",
            "empty.mp4": "empty file", "notes.mp4": "not a video", "audio.mp4": "audio only",
            "resized.ts": "frame size changes midway", "dangling.mkv": "cannot read"}
