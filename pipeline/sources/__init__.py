"""Where data comes in: sources of micro-batches (source.py), videos in memory (videos.py) and the sampler
that cuts them into clips (sampler.py), the loaders (synthetic.py, moving_mnist.py, npz.py), real video
(files.py: which videos a path names; media.py: decoding with PyAV; video.py: files decoded on the fly;
prepare.py, shards.py, dataset.py, parquet.py: `lamina prepare` and the Parquet datasets it writes;
streaming.py: the sampler and cache they share) and the data spec that names one (specs.py)."""

from pipeline.sources.sampler import ClipSampler
from pipeline.sources.source import MicroBatch, Source
from pipeline.sources.specs import load_videos, open_source
from pipeline.sources.videos import Videos

__all__ = ["ClipSampler", "MicroBatch", "Source", "Videos", "load_videos", "open_source"]
