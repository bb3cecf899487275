"""The built-in procedural videos: the embedded default data, so lamina learns with nothing downloaded.

Each sequence shows one textured object of one class moving over a textured background:

  - 8 classes, each a shape *and* a texture drawn in the object's own coordinates (so the texture turns
    and moves with the object): disc/rings, square/checker, triangle/gradient, cross/plain, ring/spokes,
    bar/bands, star/bright centre, crescent/dots. Class is not only an outline.
  - the object drifts on a straight line and bounces off the walls, turns, and breathes in size a little;
  - a soft shadow edge sweeps across the frame over the sequence (a cat walking from sun into shade), so
    the same object changes brightness over time while staying the same object;
  - the background is per-sequence smooth noise, half of them with stripes, static (a fixed camera).

Per frame the object moves about 2-4 % of the frame and turns a few degrees, so consecutive frames are
close and "consecutive frames look alike" is a meaningful signal. Object and background brightness are
drawn independently per sequence and the lighting changes within it, so mean brightness says little about
the class: a probe has to read shape and texture. (What stays constant within a sequence, background and
base brightness, also tells sequences apart: an objective that separates clips can lean on it instead of
the object. Real video has the same shortcut.)

Options (comma-separated key=value, all optional), e.g. `synthetic:sequences=200,frames=32,seed=1`:
  sequences  train sequences                  (default 160)
  probe      probe sequences                  (default 16 per class)
  frames     frames per sequence              (default 32)
  classes    object classes, 2..8             (default 8)
  seed       generator seed, >= 0             (default 0)
  noise      sensor noise std, 0..0.5         (default 0.01, on a 0..1 scale)

The train and probe splits draw from different random streams of the same seed, so the probe's sequences
are held out: other positions, motions, backgrounds and lighting of the same classes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.sources.options import OptionSpec, parse_options
from pipeline.sources.videos import Videos, from_array

CLASS_NAMES = ("disc", "square", "triangle", "cross", "ring", "bar", "star", "crescent")

# One random stream per split: the probe never sees a train sequence.
_SPLIT_STREAM = {"train": 0, "probe": 1}
# Sequences rendered at once; bounds the float32 temporaries to ~10 arrays of chunk*L*H*W.
_CHUNK = 32


_SYNTHETIC_OPTIONS: OptionSpec = {
    "sequences": (int, 1, 1_000_000),
    "probe": (int, 1, 1_000_000),
    "frames": (int, 2, 100_000),
    "classes": (int, 2, len(CLASS_NAMES)),
    "seed": (int, 0, 2**63 - 1),
    "noise": (float, 0.0, 0.5),
}


def synthetic_videos(options: str, size: int, split: str) -> Videos:
    """Generate the split's sequences (see the module docstring); deterministic in (options, size, split)."""
    if split not in _SPLIT_STREAM:
        raise ValueError(f"split must be 'train' or 'probe' (got {split!r})")
    opts = parse_options(options, _SYNTHETIC_OPTIONS, "synthetic")
    classes = int(opts.get("classes", len(CLASS_NAMES)))
    n = int(opts.get("sequences", 160)) if split == "train" else int(opts.get("probe", 16 * classes))
    length = int(opts.get("frames", 32))
    seed = int(opts.get("seed", 0))
    noise = float(opts.get("noise", 0.01))

    rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
    params = _draw_params(rng, n, length, classes, size)
    frames = np.empty((n, length, size, size), np.uint8)
    for lo in range(0, n, _CHUNK):
        hi = min(lo + _CHUNK, n)
        chunk = {k: v[lo:hi] for k, v in params.items()}
        img = _render(chunk, length, size)
        if noise > 0:
            # Drawn per chunk from a stream of its own, so the picture does not depend on the chunk size.
            img += np.random.default_rng([seed, _SPLIT_STREAM[split], 1, lo]).standard_normal(
                img.shape, np.float32) * np.float32(noise)
        frames[lo:hi] = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    labels = np.repeat(params["cls"][:, None], length, axis=1).astype(np.int64)
    name = f"synthetic:{options}" if options else "synthetic"
    return from_array(name, frames, labels, False, size)


def _draw_params(rng: np.random.Generator, n: int, length: int, classes: int, size: int) -> dict[str, np.ndarray]:
    """Everything random about the n sequences, drawn up front so the rendering order does not matter."""
    u = rng.uniform
    cls = np.arange(n) % classes  # balanced: the probe gets exactly n / classes sequences per class
    cls = cls[rng.permutation(n)]
    t = np.arange(length, dtype=np.float64)[None, :]

    radius = size * u(0.22, 0.3, n)  # object radius in pixels
    margin = 0.85 * radius  # the centre bounces inside [margin, size - margin]: the object may graze the edge
    speed = size * u(0.02, 0.04, n)  # pixels per frame: 0.6-1.3 px at 32x32
    heading = u(0, 2 * np.pi, n)
    cx = _bounce(u(margin, size - margin)[:, None] + (speed * np.cos(heading))[:, None] * t, margin, size)
    cy = _bounce(u(margin, size - margin)[:, None] + (speed * np.sin(heading))[:, None] * t, margin, size)
    spin = u(0.03, 0.09, n) * rng.choice([-1.0, 1.0], n)  # radians per frame: 2-5 degrees
    theta = u(0, 2 * np.pi, n)[:, None] + spin[:, None] * t
    scale = 1.0 + 0.08 * np.sin(u(0, 2 * np.pi, n)[:, None] + 2 * np.pi * t / u(20, 40, n)[:, None])

    obj = u(0.25, 0.85, n)  # object base brightness
    bg = u(0.15, 0.85, n)  # background base brightness, kept >= 0.2 away from the object's
    close = np.abs(obj - bg) < 0.2
    bg = np.where(close, np.where(obj > 0.5, obj - 0.3, obj + 0.3), bg)

    # The shadow edge: a soft step across the frame at angle light_dir, moving from edge0 to edge1.
    frac = t / max(length - 1, 1)
    edge0, edge1 = u(-0.9, -0.1, n), u(0.1, 0.9, n)
    edge = edge0[:, None] + (edge1 - edge0)[:, None] * frac
    return {
        "cls": cls, "radius": radius, "cx": cx, "cy": cy, "theta": theta, "scale": scale,
        "obj": obj, "tex_amp": u(0.15, 0.28, n), "tex_freq": u(0.85, 1.15, n), "tex_phase": u(0, 2 * np.pi, n),
        "bg": bg, "bg_grid": rng.standard_normal((n, 5, 5)), "bg_noise_amp": u(0.03, 0.08, n),
        "stripe_amp": u(0.03, 0.08, n) * (rng.random(n) < 0.5), "stripe_freq": u(1.5, 4.0, n),
        "stripe_dir": u(0, np.pi, n), "stripe_phase": u(0, 2 * np.pi, n),
        "light_dir": u(0, 2 * np.pi, n), "edge": edge, "edge_width": u(0.08, 0.25, n),
        "shade": u(0.35, 0.7, n),
    }


def _bounce(x: np.ndarray, lo: np.ndarray, size: int) -> np.ndarray:
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
    unit = (p["radius"][:, None] * p["scale"]).astype(f32)[..., None, None]  # (n, L, 1, 1) pixels per unit
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

    obj = (p["obj"].astype(f32)[:, None, None, None] + p["tex_amp"].astype(f32)[:, None, None, None] * tex)
    img = _background(p, size)[:, None] * (1 - cover) + obj * cover
    del tex, obj, cover

    # Lighting: gain `shade` on one side of a soft edge, 1 on the other; the edge sweeps across in time.
    centred = (coords - size / 2) / size
    ld = p["light_dir"].astype(f32)[:, None, None, None]
    proj = np.cos(ld) * centred[None, None, None, :] + np.sin(ld) * centred[None, None, :, None]
    z = (proj - p["edge"].astype(f32)[..., None, None]) / p["edge_width"].astype(f32)[:, None, None, None]
    shade = p["shade"].astype(f32)[:, None, None, None]
    img *= shade + (1 - shade) / (1 + np.exp(-z))
    return img


def _background(p: dict[str, np.ndarray], size: int) -> np.ndarray:
    """(n, size, size) float32: base brightness + smooth noise (bilinear 5x5 grid) + optional stripes."""
    f32 = np.float32
    pos = (np.arange(size) + 0.5) / size * 4  # pixel centres on the 5-knot grid, 0..4
    left = np.clip(np.floor(pos).astype(int), 0, 3)
    w = pos - left
    interp = np.zeros((size, 5))
    interp[np.arange(size), left] = 1 - w
    interp[np.arange(size), left + 1] = w
    smooth = np.einsum("yi,nij,xj->nyx", interp, p["bg_grid"], interp)
    x = (np.arange(size) + 0.5) / size
    d = p["stripe_dir"][:, None, None]
    phase = 2 * np.pi * p["stripe_freq"][:, None, None] * (np.cos(d) * x[None, None, :] + np.sin(d) * x[None, :, None])
    stripes = np.sin(phase + p["stripe_phase"][:, None, None])
    out = (p["bg"][:, None, None] + p["bg_noise_amp"][:, None, None] * smooth
           + p["stripe_amp"][:, None, None] * stripes)
    return out.astype(f32)


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
