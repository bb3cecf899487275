"""The built-in procedural videos: the embedded default data, so lamina learns with nothing downloaded.

Each sequence follows one textured object of one class through a scene that a moving camera films:

  - 8 classes, each a shape *and* a texture drawn in the object's own coordinates (so the texture turns
    and moves with the object): disc/rings, square/checker, triangle/gradient, cross/plain, ring/spokes,
    bar/bands, star/bright centre, crescent/dots. Class is not only an outline.
  - the object bounces around the frame (2-3 px a frame at 32x32), spins 9-20 degrees a frame and breathes
    in size (about +-15 %); it is large (about two thirds of the frame across), so its shape and texture
    dominate the frame wherever it is;
  - the camera pans 3-5 px a frame over a panorama four frames wide (smooth noise at two scales), so the
    background behind the object is new every few frames;
  - object and background brightness wander independently (which one is brighter changes over time),
    the exposure drifts and a soft shadow edge sweeps to and fro;
  - two soft blobs (distractors) cross the frame fast, fading in and out; the sensor noise changes level
    from frame to frame.

[Note: what a clip shares] Every nuisance above changes smoothly, with periods of 6-14 frames or motion
of a few pixels a frame, so it changes little from one frame to the next but covers much of its range
within one clip of 8 frames; and none has a level of its own per sequence that would tell one sequence
from another (mean brightness, contrast polarity, the look of the background). What a clip's frames do
share is the object: its class, and the small jitter of its texture's scale and phase (an instance). A
layer that learns to map frames of one clip together and other clips apart (`clip-nce`) is thus pushed
towards shape and texture, while a random network's features are dominated by where the object is, how
bright things are and what lies behind it. Whatever else stays put within a clip, the objective learns
instead of the object (while this data was designed, a slower camera and a fainter texture each cost the
top layer about a quarter of its gain, both together most of it). What the main job learns from it, over
three seeds: `.results/synthetic-main-job.md`. The cost: consecutive frames are less alike than in a slow
video (their mean pixel difference is a little over half of that between two sequences).

Options (comma-separated key=value, all optional), e.g. `synthetic:sequences=200,frames=32,seed=1`:
  sequences  train sequences                  (default 160)
  probe      probe sequences                  (default 16 per class)
  frames     frames per sequence              (default 32)
  classes    object classes, 2..8             (default 8)
  seed       generator seed, >= 0             (default 0)
  noise      sensor noise std, 0..0.5         (default 0.03, on a 0..1 scale; each frame 0.5-1.5 times it)

The train and probe splits draw from different random streams of the same seed, so the probe's sequences
are held out: other instances, motions, scenes and lighting of the same classes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.sources.budget import check, frames_bytes
from pipeline.sources.options import OptionSpec, parse_options
from pipeline.sources.videos import Videos, from_array

CLASS_NAMES = ("disc", "square", "triangle", "cross", "ring", "bar", "star", "crescent")

# One random stream per split: the probe never sees a train sequence.
_SPLIT_STREAM = {"train": 0, "probe": 1}
# Sequences rendered at once; bounds the float32 temporaries to ~10 arrays of chunk*L*H*W (4 MB each at
# the defaults).
_CHUNK = 32
# Nuisance periods in frames ([Note: what a clip shares]): short enough to change within a clip of 8.
_PERIOD = (6.0, 14.0)
_PANORAMA = 4.0  # the panorama's width and height, in frames
_DISTRACTORS = 2

_SYNTHETIC_OPTIONS: OptionSpec = {
    "sequences": (int, 1, 1_000_000),
    "probe": (int, 1, 1_000_000),
    "frames": (int, 2, 100_000),
    "classes": (int, 2, len(CLASS_NAMES)),
    "seed": (int, 0, 2**63 - 1),
    "noise": (float, 0.0, 0.5),
}


def synthetic_videos(options: str, size: int, split: str, budget: float | None = None) -> Videos:
    """Generate the split's sequences (see the module docstring); deterministic in (options, size, split).
    Refused before anything is drawn when it would need more than `budget` GiB (budget.py)."""
    if split not in _SPLIT_STREAM:
        raise ValueError(f"split must be 'train' or 'probe' (got {split!r})")
    opts = parse_options(options, _SYNTHETIC_OPTIONS, "synthetic")
    classes = int(opts.get("classes", len(CLASS_NAMES)))
    n = int(opts.get("sequences", 160)) if split == "train" else int(opts.get("probe", 16 * classes))
    length = int(opts.get("frames", 32))
    seed = int(opts.get("seed", 0))
    noise = float(opts.get("noise", 0.03))
    # The uint8 frames, the float32 videos made of them, and a chunk's ~10 float32 temporaries.
    need = n * length * size * size + frames_bytes(n, length, 1, size) + 10 * frames_bytes(min(n, _CHUNK), length, 1, size)
    check(f"synthetic:{options}", need, budget, f"{n} sequences of {length} frames at {size}x{size}")

    rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
    params = _draw_params(rng, n, length, classes, size)
    frames = np.empty((n, length, size, size), np.uint8)
    for lo in range(0, n, _CHUNK):
        hi = min(lo + _CHUNK, n)
        chunk = {k: v[lo:hi] for k, v in params.items()}
        img = _render(chunk, length, size)
        if noise > 0:
            # Drawn per sequence from a stream of its own, so the picture does not depend on the chunk size.
            grain = np.stack([np.random.default_rng([seed, _SPLIT_STREAM[split], 1, i]).standard_normal(
                (length, size, size), np.float32) for i in range(lo, hi)])
            img += grain * (np.float32(noise) * chunk["noise_gain"].astype(np.float32)[..., None, None])
        frames[lo:hi] = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    labels = np.repeat(params["cls"][:, None], length, axis=1).astype(np.int64)
    name = f"synthetic:{options}" if options else "synthetic"
    return from_array(name, frames, labels, False, size)


def _wander(rng: np.random.Generator, n: int, t: np.ndarray) -> np.ndarray:
    """n smooth random processes over frames t (1, L): two sinusoids of _PERIOD periods, std about 0.8."""
    out = np.zeros((n, t.shape[1]))
    for _ in range(2):
        period = rng.uniform(*_PERIOD, n)[:, None]
        out += np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi, n)[:, None])
    return out / (np.sqrt(2) * 0.9)


def _draw_params(rng: np.random.Generator, n: int, length: int, classes: int, size: int) -> dict[str, np.ndarray]:
    """Everything random about the n sequences, drawn up front so the rendering order does not matter."""
    u = rng.uniform
    cls = np.arange(n) % classes  # balanced: the probe gets exactly n / classes sequences per class
    cls = cls[rng.permutation(n)]
    t = np.arange(length, dtype=np.float64)[None, :]
    zero = np.zeros(n)

    # The object: radius in pixels per frame, centre bouncing off the walls (it may leave the frame by 40 %
    # of its radius), angle.
    base = 0.38 * size
    radius = base * (1 + 0.05 * u(-1, 1, n))[:, None] * (1 + 0.15 * _wander(rng, n, t))
    margin = np.full(n, 0.6 * base)
    speed, heading = size * u(0.06, 0.1, n), u(0, 2 * np.pi, n)
    cx = _bounce(u(margin, size - margin)[:, None] + (speed * np.cos(heading))[:, None] * t, margin, size)
    cy = _bounce(u(margin, size - margin)[:, None] + (speed * np.sin(heading))[:, None] * t, margin, size)
    spin = u(0.15, 0.35, n) * rng.choice([-1.0, 1.0], n)  # radians per frame
    theta = u(0, 2 * np.pi, n)[:, None] + spin[:, None] * t

    # Brightness: object and background wander independently around mid-grey; the texture's strength too.
    obj = 0.5 + 0.3 * _wander(rng, n, t)
    bg = 0.5 + 0.2 * _wander(rng, n, t)
    tex_amp = 0.25 + 0.15 * (0.5 + 0.5 * np.clip(_wander(rng, n, t), -1, 1))

    # The camera's top-left corner on the panorama, bouncing inside it.
    room = (_PANORAMA - 1) * size
    cam_speed, cam_dir = size * u(0.1, 0.15, n), u(0, 2 * np.pi, n)
    camx = _bounce(u(0, room, n)[:, None] + (cam_speed * np.cos(cam_dir))[:, None] * t, zero, room)
    camy = _bounce(u(0, room, n)[:, None] + (cam_speed * np.sin(cam_dir))[:, None] * t, zero, room)

    # Distractors: soft blobs crossing the frame, each fading in and out (and changing sign) over time.
    d = _DISTRACTORS
    dist_speed, dist_dir = size * u(0.06, 0.12, (n, d)), u(0, 2 * np.pi, (n, d))
    dist_x = np.stack([_bounce(u(0, size, n)[:, None] + (dist_speed[:, j] * np.cos(dist_dir[:, j]))[:, None] * t,
                               zero, size) for j in range(d)], -1)
    dist_y = np.stack([_bounce(u(0, size, n)[:, None] + (dist_speed[:, j] * np.sin(dist_dir[:, j]))[:, None] * t,
                               zero, size) for j in range(d)], -1)
    dist_amp = u(0.1, 0.25, (n, 1, d)) * np.stack([_wander(rng, n, t) for _ in range(d)], -1)

    # Lighting: a soft shadow edge at angle light_dir moving to and fro across the frame, and the exposure.
    edge_speed = u(0.03, 0.08, n) * rng.choice([-1.0, 1.0], n)
    edge = _bounce(u(0, 1, n)[:, None] + edge_speed[:, None] * t, zero, 1.0) - 0.5
    return {
        "cls": cls, "radius": radius, "cx": cx, "cy": cy, "theta": theta,
        "obj": obj, "tex_amp": tex_amp, "tex_freq": u(0.9, 1.1, n), "tex_phase": u(0, 2 * np.pi, n),
        "bg": bg, "cam_x": camx, "cam_y": camy,
        "coarse": rng.standard_normal((n, 9, 9)), "fine": rng.standard_normal((n, 17, 17)),
        "dist_r": size * u(0.05, 0.1, (n, d)), "dist_x": dist_x, "dist_y": dist_y, "dist_amp": dist_amp,
        "light_dir": u(0, 2 * np.pi, n), "edge": edge, "edge_width": u(0.08, 0.25, n),
        "shade": u(0.6, 0.95, n), "gain": 1.0 + 0.15 * _wander(rng, n, t),
        "noise_gain": u(0.5, 1.5, (n, length)),
    }


def _bounce(x: np.ndarray, lo: np.ndarray, size: float) -> np.ndarray:
    """Fold a straight path into [lo, size - lo] as a ball reflecting off the walls (triangle wave)."""
    lo = lo[:, None]
    span = size - 2 * lo
    y = np.mod(x - lo, 2 * span)
    return lo + np.where(y > span, 2 * span - y, y)


def _render(p: dict[str, np.ndarray], length: int, size: int) -> np.ndarray:
    """Render a chunk of sequences to float32 (n, L, size, size) in about [0, 1], before noise."""
    f32 = np.float32
    n = p["cls"].shape[0]
    coords = (np.arange(size, dtype=f32) + 0.5)
    xs, ys = coords[None, None, None, :], coords[None, None, :, None]

    # Pixel -> object coordinates (u, v), unit = the object's current radius; the texture lives there too.
    unit = p["radius"].astype(f32)[..., None, None]  # (n, L, 1, 1) pixels per unit
    dx = xs - p["cx"].astype(f32)[..., None, None]
    dy = ys - p["cy"].astype(f32)[..., None, None]
    cos, sin = np.cos(p["theta"]).astype(f32)[..., None, None], np.sin(p["theta"]).astype(f32)[..., None, None]
    u = (cos * dx + sin * dy) / unit
    v = (cos * dy - sin * dx) / unit
    del dx, dy

    dist = np.empty((n, length, size, size), f32)  # signed distance to the outline, in object units
    tex = np.empty_like(dist)  # texture in about [-1, 1]
    for c in np.unique(p["cls"]):
        idx = np.flatnonzero(p["cls"] == c)
        k = p["tex_freq"][idx].astype(f32)[:, None, None, None]
        ph = p["tex_phase"][idx].astype(f32)[:, None, None, None]
        dist[idx], tex[idx] = _SHAPES[CLASS_NAMES[c]](u[idx], v[idx], k, ph)
    # Antialiased coverage: a one-pixel ramp across the outline.
    cover = np.clip(f32(0.5) - dist * unit, 0, 1)
    del u, v, dist

    obj = p["obj"].astype(f32)[..., None, None] + p["tex_amp"].astype(f32)[..., None, None] * tex
    img = _background(p, size) * (1 - cover) + obj * cover
    del tex, obj, cover

    # Lighting: gain `shade` on one side of a soft edge, 1 on the other; then the exposure of the frame.
    centred = (coords - size / 2) / size
    ld = p["light_dir"].astype(f32)[:, None, None, None]
    proj = np.cos(ld) * centred[None, None, None, :] + np.sin(ld) * centred[None, None, :, None]
    z = (proj - p["edge"].astype(f32)[..., None, None]) / p["edge_width"].astype(f32)[:, None, None, None]
    shade = p["shade"].astype(f32)[:, None, None, None]
    img *= (shade + (1 - shade) / (1 + np.exp(-z))) * p["gain"].astype(f32)[..., None, None]
    return img


def _background(p: dict[str, np.ndarray], size: int) -> np.ndarray:
    """(n, L, size, size) float32: brightness + the camera's view of the panorama + the distractors."""
    f32 = np.float32
    x = (np.arange(size) + 0.5).astype(f32)
    pan = _PANORAMA * size
    px = (x[None, None, None, :] + p["cam_x"].astype(f32)[..., None, None]) / pan  # panorama coordinates, 0..1
    py = (x[None, None, :, None] + p["cam_y"].astype(f32)[..., None, None]) / pan
    out = p["bg"].astype(f32)[..., None, None] + 0.08 * _smooth_noise(p["coarse"], px, py)
    out += 0.04 * _smooth_noise(p["fine"], px, py)
    for j in range(p["dist_r"].shape[1]):
        r2 = ((x[None, None, None, :] - p["dist_x"][..., j].astype(f32)[..., None, None]) ** 2
              + (x[None, None, :, None] - p["dist_y"][..., j].astype(f32)[..., None, None]) ** 2)
        width = 2 * p["dist_r"][:, j].astype(f32)[:, None, None, None] ** 2
        out += p["dist_amp"][..., j].astype(f32)[..., None, None] * np.exp(-r2 / width)
    return out


def _smooth_noise(knots: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Per-sequence knot grids (n, G, G) spanning the panorama, interpolated (smoothstep weights) at panorama
    coordinates px, py in [0, 1] of shape (n, L, H, W)."""
    n, g, _ = knots.shape
    gx, gy = px * (g - 1), py * (g - 1)
    x0 = np.clip(np.floor(gx).astype(np.int64), 0, g - 2)
    y0 = np.clip(np.floor(gy).astype(np.int64), 0, g - 2)
    wx, wy = gx - x0, gy - y0
    wx, wy = wx * wx * (3 - 2 * wx), wy * wy * (3 - 2 * wy)
    flat = knots.astype(np.float32).reshape(-1)
    i = (np.arange(n) * g * g)[:, None, None, None] + y0 * g + x0
    top = flat[i] * (1 - wx) + flat[i + 1] * wx
    bottom = flat[i + g] * (1 - wx) + flat[i + g + 1] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


# Shapes: (u, v, texture frequency k, texture phase ph) -> (signed distance, texture), in object units
# (the shape spans about [-1, 1]). Distances need only be exact near the outline: they set the antialiasing.
_Shape = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
_TAU = np.float32(2 * np.pi)


def _disc(u: np.ndarray, v: np.ndarray, k: np.ndarray, ph: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = np.hypot(u, v)
    return r - 0.85, np.cos(_TAU * 1.4 * k * r + ph)  # concentric rings


def _square(u: np.ndarray, v: np.ndarray, k: np.ndarray, ph: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.maximum(np.abs(u), np.abs(v)) - 0.72
    return d, np.sign(np.sin(_TAU * 0.7 * k * u) * np.sin(_TAU * 0.7 * k * v))  # checkerboard


def _triangle(u: np.ndarray, v: np.ndarray, k: np.ndarray, ph: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Equilateral, circumradius 1: the largest of three half-plane distances.
    d = np.maximum(np.maximum(v, -0.866 * u - 0.5 * v), 0.866 * u - 0.5 * v) - 0.48
    return d, np.clip(1.6 * v + 0.2, -1, 1)  # a gradient from the base to the apex


def _cross(u: np.ndarray, v: np.ndarray, k: np.ndarray, ph: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    au, av = np.abs(u), np.abs(v)
    d = np.minimum(np.maximum(au - 0.3, av - 0.95), np.maximum(au - 0.95, av - 0.3))
    return d, np.zeros_like(u)  # plain


def _ring(u: np.ndarray, v: np.ndarray, k: np.ndarray, ph: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = np.hypot(u, v)
    return np.abs(r - 0.68) - 0.27, np.cos(6 * np.arctan2(v, u) + ph)  # spokes


def _bar(u: np.ndarray, v: np.ndarray, k: np.ndarray, ph: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.maximum(np.abs(u) - 1.0, np.abs(v) - 0.36)
    return d, np.sign(np.sin(_TAU * 1.2 * k * u + ph))  # bands across the bar


def _star(u: np.ndarray, v: np.ndarray, k: np.ndarray, ph: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = np.hypot(u, v)
    # A five-pointed star in polar form; scaled by 0.7 because the radial gap overstates the distance.
    d = 0.7 * (r - (0.62 + 0.33 * np.cos(5 * np.arctan2(v, u))))
    return d, np.clip(1.0 - 2.5 * r, -1, 1)  # a bright centre


def _crescent(u: np.ndarray, v: np.ndarray, k: np.ndarray, ph: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.maximum(np.hypot(u, v) - 0.92, 0.72 - np.hypot(u - 0.5, v))  # a disc minus an offset disc
    dots = np.cos(_TAU * 1.3 * k * u) * np.cos(_TAU * 1.3 * k * v) > 0.35
    return d, np.where(dots, 1.0, -0.4).astype(np.float32)  # bright dots


_SHAPES: dict[str, _Shape] = {
    "disc": _disc, "square": _square, "triangle": _triangle, "cross": _cross,
    "ring": _ring, "bar": _bar, "star": _star, "crescent": _crescent,
}
