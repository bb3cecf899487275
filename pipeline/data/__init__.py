"""Where data comes in: videos in memory, and the deterministic clip sampler that cuts micro-batches.

A data spec string names the source:
  synthetic[:OPTIONS]     the built-in procedural video generator (the embedded default)
  moving-mnist:PATH       digits bouncing in a frame, made from an MNIST .npz
  npz:PATH                a sequence archive (`frames`) or a turntable archive (`images`)
"""

from __future__ import annotations

from pipeline.data.sampler import ClipSampler, MicroBatch
from pipeline.data.videos import DataError, Videos, load_videos

__all__ = ["ClipSampler", "DataError", "MicroBatch", "Videos", "load_videos"]
