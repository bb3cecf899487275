"""The data spec: which loader a `--data` string names. The one module that knows every loader.

  synthetic[:OPTIONS]     the built-in procedural video generator (the embedded default)
  moving-mnist:PATH       digits bouncing in a frame, made from an MNIST .npz
  npz:PATH                a sequence archive (`frames`) or a turntable archive (`images`)
"""

from __future__ import annotations

from pipeline.errors import ConfigError
from pipeline.sources.moving_mnist import moving_mnist_videos
from pipeline.sources.npz import npz_videos
from pipeline.sources.synthetic import synthetic_videos
from pipeline.sources.videos import Videos


def load_videos(spec: str, size: int = 32, split: str = "train") -> Videos:
    """Load the videos a data spec names. `split` is "train" (learning) or "probe" (evaluation sequences).

    npz archives are used whole for both splits (the probe picks its labelled frames inside them);
    generated sources draw the probe's sequences from held-out material (other digits, another seed).
    """
    if size < 4:
        raise ConfigError(f"--size must be >= 4 (got {size})")
    if split not in ("train", "probe"):
        raise ValueError(f"split must be 'train' or 'probe' (got {split!r})")
    kind, _, arg = spec.partition(":")
    if kind == "synthetic":
        return synthetic_videos(arg, size, split)
    if kind == "moving-mnist":
        return moving_mnist_videos(arg, size, split)
    if kind == "npz":
        return npz_videos(arg, size)
    raise ConfigError(f"--data must be synthetic[:OPTIONS], moving-mnist:PATH or npz:PATH (got {spec!r})")
