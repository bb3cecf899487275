"""The data spec: which loader a `--data` string names. The one module that knows every loader.

  synthetic[:OPTIONS]     the built-in procedural video generator (the embedded default)
  moving-mnist:PATH       digits bouncing in a frame, made from an MNIST .npz
  npz:PATH                a sequence archive (`frames`) or a turntable archive (`images`)
  video:PATH              video files (a file, a folder, a glob), decoded on the fly (video.py)
  parquet:PATH|URI        a dataset `lamina prepare` wrote, local or on any pyarrow.fs storage (parquet.py)

The first three are held in memory and cut into clips by the ClipSampler; the last two stream
([Note: streaming clips] in streaming.py). `open_source` gives the training source of any spec;
`load_videos` gives videos in memory (for the last two: a bounded sample, [Note: probing streamed data]).
"""

from __future__ import annotations

from pipeline.errors import ConfigError
from pipeline.sources.moving_mnist import moving_mnist_videos
from pipeline.sources.npz import npz_videos
from pipeline.sources.sampler import ClipSampler
from pipeline.sources.source import Source
from pipeline.sources.synthetic import synthetic_videos
from pipeline.sources.videos import Videos

KINDS = "synthetic[:OPTIONS], moving-mnist:PATH, npz:PATH, video:PATH or parquet:PATH|URI"


def load_videos(spec: str, size: int = 32, split: str = "train", budget: float | None = None) -> Videos:
    """Load the videos a data spec names. `split` is "train" (learning) or "probe" (evaluation sequences).

    npz archives, video files and prepared datasets are used whole for both splits (the probe picks its
    labelled frames inside them); generated sources draw the probe's sequences from held-out material
    (other digits, another seed). `budget`: GiB the in-memory loaders may take (budget.py; None: half of
    this machine's memory).
    """
    if size < 4:
        raise ConfigError(f"--size must be >= 4 (got {size})")
    if split not in ("train", "probe"):
        raise ValueError(f"split must be 'train' or 'probe' (got {split!r})")
    kind, _, arg = spec.partition(":")
    if kind == "synthetic":
        return synthetic_videos(arg, size, split, budget)
    if kind == "moving-mnist":
        return moving_mnist_videos(arg, size, split, budget)
    if kind == "npz":
        return npz_videos(arg, size, budget)
    if kind == "video":
        from pipeline.sources.video import video_videos  # PyAV is imported only when video is asked for

        return video_videos(arg, size, split)
    if kind == "parquet":
        from pipeline.sources.parquet import parquet_videos

        return parquet_videos(arg, size, split)
    raise ConfigError(f"--data must be {KINDS} (got {spec!r})")


def open_source(spec: str, size: int, clips: int, clip_len: int, seed: int, stride: int = 1,
                budget: float | None = None) -> Source:
    """The training source of a data spec: micro-batch m a pure function of (seed, m) for every kind."""
    kind, _, arg = spec.partition(":")
    if kind == "video":
        if size < 4:
            raise ConfigError(f"--size must be >= 4 (got {size})")
        from pipeline.sources.video import video_source

        return video_source(arg, size, clips, clip_len, seed, stride)
    if kind == "parquet":
        from pipeline.sources.parquet import parquet_source

        return parquet_source(arg, size, clips, clip_len, seed, stride)
    return ClipSampler(load_videos(spec, size, "train", budget), clips, clip_len, seed, stride)
