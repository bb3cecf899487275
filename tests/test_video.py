"""Real video in: the `video:` data spec on files encoded here (several codecs and containers, known labels)
and on slices of the shared real videos; decoding by seeking equals a full pass; micro-batches replay; memory
stays within the cache; every kind of damaged file is named, skipped and counted (or stops with strict=1);
a run on `video:` resumed midway equals the uninterrupted run."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from support import state_differences
from video_support import (
    CODECS,
    byte_flipped,
    damaged_set,
    encode,
    image_sequence,
    shape_frames,
    shapes_dataset,
)

from pipeline.checkpoints import CheckpointStore
from pipeline.config import TrainConfig
from pipeline.engines.local import run_local
from pipeline.errors import ConfigError, DataError
from pipeline.sources import load_videos, open_source
from pipeline.sources.files import BadVideo, Item, discover
from pipeline.sources.media import Converter, decode_range, index, read
from pipeline.sources.video import open_videos

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """disc/ and square/, 3 videos each of 24 frames at 48x36, six codecs and containers in turn."""
    return shapes_dataset(tmp_path_factory.mktemp("shapes"))


def test_discover_walks_folders_takes_image_sequences_and_globs(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    encode(tmp_path / "a" / "x.mp4", shape_frames("disc", 6, 32, 24, 0))
    image_sequence(tmp_path / "a" / "seq", n=5)
    (tmp_path / "a" / "README.md").write_text("notes")
    (tmp_path / "a" / ".hidden.mp4").write_text("not looked at")
    items, ignored = discover([str(tmp_path / "a")], "video")
    assert [(Path(i.path).name, i.kind, len(i.images)) for i in items] == [("x.mp4", "video", 0), ("seq", "images", 5)]
    assert ignored == [str(tmp_path / "a" / "README.md")]
    assert [i.label("folder") for i in items] == ["a", "a"] and [i.label("stem") for i in items] == ["x", "seq"]
    assert items[0].label("none") is None
    by_glob, _ = discover([str(tmp_path / "*" / "*.mp4")], "video")
    assert by_glob == [items[0]]
    with pytest.raises(DataError, match="nothing.mp4: no such file"):
        discover([str(tmp_path / "nothing.mp4")], "video")
    with pytest.raises(DataError, match="matches no file"):
        discover([str(tmp_path / "*.mkv")], "video")


@pytest.mark.parametrize(("codec", "ext", "pix"), CODECS)
def test_every_codec_and_container_decodes_a_range_as_a_full_pass_does(tmp_path: Path, codec: str, ext: str,
                                                                       pix: str) -> None:
    path = encode(tmp_path / f"v{ext}", shape_frames("disc", 40, 48, 36, 1), codec, pix)
    item, convert = Item(str(path)), Converter(16, 3, "crop")
    full = np.stack([f.image for f in read(item, convert)])  # type: ignore[misc]
    idx = index(item)
    assert full.shape == (40, 16, 16, 3) and idx.frames == 40 and idx.keyframes[0] == 0
    for lo, hi in [(0, 5), (17, 25), (33, 40), (5, 39)]:
        assert np.array_equal(decode_range(item, idx, lo, hi, convert), full[lo:hi]), (lo, hi)


def test_frames_keep_their_picture_crop_or_squash_rgb_or_grey(tmp_path: Path) -> None:
    frames = shape_frames("square", 4, 64, 32, 0)
    path = encode(tmp_path / "v.mkv", frames, "ffv1", "yuv444p")  # lossless: the picture survives exactly
    item = Item(str(path))
    crop = next(iter(read(item, Converter(8, 3, "crop")))).image
    squash = next(iter(read(item, Converter(8, 3, "squash")))).image
    grey = next(iter(read(item, Converter(8, 1, "crop")))).image
    assert crop is not None and squash is not None and grey is not None
    assert crop.shape == squash.shape == (8, 8, 3) and grey.shape == (8, 8, 1)
    centre = frames[0][:, 16:48].reshape(8, 4, 8, 4, 3).mean((1, 3))  # the centre 32x32, area-averaged
    assert np.abs(crop.astype(float) - centre).mean() < 6
    assert np.abs(squash.astype(float) - frames[0].reshape(8, 4, 8, 8, 3).mean((1, 3))).mean() < 6
    assert not np.array_equal(crop, squash)


def test_shared_videos_seek_to_the_frames_of_a_full_pass(shared_data: Path) -> None:
    """A real h264 mp4 with 7 keyframes, and a real mkv that is one keyframe interval."""
    for path in (shared_data / "video" / "car-detection.mp4", shared_data / "video" / "asl_gestures" / "eat.mkv"):
        item, convert = Item(str(path)), Converter(12, 3, "crop")
        idx = index(item)
        full = np.stack([f.image for f in read(item, convert)])  # type: ignore[misc]
        assert len(full) == idx.frames > 40
        rng = np.random.default_rng(0)
        for lo in [*rng.integers(0, idx.frames - 9, 4), *(int(k) for k in idx.keyframes[1:3])]:
            assert np.array_equal(decode_range(item, idx, int(lo), int(lo) + 8, convert), full[lo:lo + 8]), lo


def test_video_source_replays_and_draws_clips_from_distinct_videos(shapes: Path) -> None:
    a = open_source(f"video:{shapes}", 16, 4, 5, seed=3, stride=2)
    b = open_source(f"video:{shapes},workers=1,readahead=0", 16, 4, 5, seed=3, stride=2)
    first = [a.batch(m) for m in range(6)]
    assert a.frame_shape == (3, 16, 16)
    for m in (5, 0, 3):  # another instance, another order, another cache state: the same micro-batch
        x, y = b.batch(m), first[m]
        assert torch.equal(x.frames, y.frames) and torch.equal(x.labels, y.labels)
        assert (x.sequences, x.starts) == (y.sequences, y.starts)
    for mb in first:
        assert mb.frames.shape == (4, 5, 3, 16, 16) and mb.frames.dtype == torch.float32
        assert 0 <= float(mb.frames.min()) and float(mb.frames.max()) <= 1
        assert len(set(mb.sequences)) == 4  # six videos: four distinct ones in each micro-batch
        assert all(s + 8 < 24 for s in mb.starts)  # a clip spans (5 - 1) * 2 + 1 = 9 frames of 24
    # Labels: the parent folder, in sorted order: disc 0, square 1.
    sources = a.catalog.sources  # type: ignore[attr-defined]
    for mb in first:
        for v, row in zip(mb.sequences, mb.labels, strict=True):
            assert row.tolist() == [0 if "/disc/" in sources[v] else 1] * 5
    assert not torch.equal(first[0].frames, open_source(f"video:{shapes}", 16, 4, 5, seed=4).batch(0).frames)


def test_clip_frames_are_the_files_frames(shapes: Path) -> None:
    src = open_source(f"video:{shapes},labels=stem", 16, 2, 4, seed=0)
    mb = src.batch(7)
    for v, start, clip in zip(mb.sequences, mb.starts, mb.frames, strict=True):
        item = Item(src.catalog.sources[v])  # type: ignore[attr-defined]
        full = np.stack([f.image for f in read(item, Converter(16, 3, "crop"))])  # type: ignore[misc]
        expect = torch.from_numpy(full[start:start + 4]).permute(0, 3, 1, 2).float() / 255
        assert torch.equal(clip, expect)


def test_memory_stays_within_the_cache_while_the_data_streams(tmp_path: Path) -> None:
    """14 videos of 120 frames at 32x32 RGB: 6 MB decoded, through a 1 MB cache."""
    for i in range(14):
        encode(tmp_path / f"v{i:02d}.mkv", shape_frames(("disc", "square")[i % 2], 120, 48, 36, i))
    src = open_source(f"video:{tmp_path},cache=1", 32, 4, 4, seed=0)
    budget = 2**20
    one_batch = 4 * 2 * 64 * 32 * 32 * 3  # four clips, each in at most two segments of 64 frames
    for m in range(60):
        src.batch(m)
        assert src.cache.held <= max(budget, one_batch)  # type: ignore[attr-defined]
    cache = src.cache  # type: ignore[attr-defined]
    assert cache.peak <= budget + one_batch
    assert cache.reads > 14 * 2  # segments were read again after eviction: the data streamed


def test_damaged_files_are_named_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = encode(tmp_path / "good.mp4", shape_frames("disc", 30, 48, 36, 0))
    long_good = encode(tmp_path / "long.mkv", shape_frames("square", 90, 64, 48, 5))
    expected = damaged_set(tmp_path / "bad", good, long_good, tmp_path)
    image_sequence(tmp_path / "bad" / "sequence", n=6, sizes=[(40, 30), (40, 30), (20, 30)])
    expected["sequence"] = "is 20x30"
    opened = open_videos(str(tmp_path / "bad"), 16)
    skipped = {Path(p).name: why for p, why in opened.skipped}
    assert set(skipped) == set(expected)
    for name, fragment in expected.items():
        assert fragment in skipped[name], (name, skipped[name])
        assert any(name in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records), name
    assert opened.catalog.sources == (str(tmp_path / "bad" / "good.mp4"),)  # the rest stays usable
    with pytest.raises(DataError, match="strict=1 stops") as e:
        open_videos(f"{tmp_path / 'bad'},strict=1", 16)
    assert str(tmp_path / "bad") in str(e.value)
    (tmp_path / "bad" / "good.mp4").unlink()
    with pytest.raises(DataError, match="none of its 9 videos is usable"):
        open_videos(str(tmp_path / "bad"), 16)


def test_a_flipped_copy_of_a_shared_video_is_refused(shared_data: Path, tmp_path: Path) -> None:
    flipped = byte_flipped(shared_data / "video" / "asl_gestures" / "milk.mkv", tmp_path / "milk.mkv")
    with pytest.raises(BadVideo, match="damaged"):
        index(Item(str(flipped)))
    truncated = tmp_path / "book.mkv"
    truncated.write_bytes((shared_data / "video" / "asl_gestures" / "book.mkv").read_bytes()[:150_000])
    with pytest.raises(BadVideo, match="truncated"):
        index(Item(str(truncated)))


def test_probe_sample_is_labelled_and_bounded(shapes: Path) -> None:
    v = load_videos(f"video:{shapes},probe_frames=6,probe_videos=4", 16, "probe")
    assert v.frames.shape == (4, 6, 3, 16, 16) and v.labels.shape == (4, 6)
    assert set(v.labels.flatten().tolist()) <= {0, 1}
    full = load_videos(f"video:{shapes},labels=stem,probe_frames=5", 16, "probe")
    assert full.frames.shape[0] == 6 and sorted(set(full.labels[:, 0].tolist())) == list(range(6))
    with pytest.raises(DataError, match="no labels"):
        load_videos(f"video:{shapes},labels=none", 16, "probe")


@pytest.mark.parametrize(("spec", "fragment"), [
    ("video:", "no path given"), ("video:{d},labels=name", "labels=name must be one of folder, stem, none"),
    ("video:{d},cache=-1", "cache=-1 must be between"), ("video:{d},colour=1", "unknown option colour"),
    ("video:{d},channels=2", "channels=2 must be 1 or 3")])
def test_bad_video_specs_name_the_option(shapes: Path, spec: str, fragment: str) -> None:
    with pytest.raises(DataError, match=fragment):
        load_videos(spec.format(d=shapes), 16, "train")


def test_clip_longer_than_every_video_names_the_flag(shapes: Path) -> None:
    with pytest.raises(ConfigError, match="--clip-len 30 at --stride 1 spans 30 frames"):
        open_source(f"video:{shapes}", 16, 4, 30, seed=0)


def test_a_run_on_video_resumed_midway_equals_the_uninterrupted_run(shapes: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(data=f"video:{shapes}", layers="conv:4,conv:8", size=16, clips=4, clip_len=3, steps=8,
                      head=(16, 8), engine="sequential", checkpoint_every=0)
    spec = cfg.learner_spec((3, 16, 16))

    def source() -> object:
        return open_source(cfg.data, cfg.size, cfg.clips, cfg.clip_len, cfg.seed)

    whole = run_local(cfg, spec, source(), lambda m, r: None).states  # type: ignore[arg-type]
    store = CheckpointStore(str(tmp_path / "ck"))
    first = dataclasses.replace(cfg, steps=5)
    run_local(first, spec, source(), lambda m, r: None, store=store)  # type: ignore[arg-type]
    ckpt = store.load_latest()
    assert ckpt is not None and ckpt.step == 5
    seen: list[int] = []
    resumed = run_local(cfg, spec, source(), lambda m, r: seen.append(m), resume=ckpt,  # type: ignore[arg-type]
                        store=store).states
    assert seen == [5, 6, 7]
    assert state_differences(resumed, whole) == []


def test_a_copied_folder_of_shared_videos_trains_as_video(shared_data: Path, tmp_path: Path) -> None:
    """Real files nobody here made, folder-per-label: a few signs, two copies each in its label's folder."""
    for sign in ("again", "bird", "book"):
        (tmp_path / sign).mkdir()
        for k in range(2):
            shutil.copy(shared_data / "video" / "asl_gestures" / f"{sign}.mkv", tmp_path / sign / f"{sign}-{k}.mkv")
    src = open_source(f"video:{tmp_path}", 16, 3, 4, seed=0)
    assert src.catalog.label_names == ("again", "bird", "book")  # type: ignore[attr-defined]
    mb = src.batch(0)
    assert mb.frames.shape == (3, 4, 3, 16, 16) and len(set(mb.sequences)) == 3
    assert os.path.basename(src.catalog.sources[mb.sequences[0]]).startswith(  # type: ignore[attr-defined]
        src.catalog.label_names[int(mb.labels[0, 0])])  # type: ignore[attr-defined]
    cfg = TrainConfig(data=f"video:{tmp_path}", layers="conv:4", size=16, clips=3, clip_len=4, steps=2,
                      head=(8, 4), engine="sequential")
    seen: list[int] = []
    states = run_local(cfg, cfg.learner_spec(src.frame_shape), src, lambda m, r: seen.append(m)).states
    assert seen == [0, 1] and states[0]["steps"] == 2  # two optimizer steps on the real frames
    assert bool(torch.isfinite(states[0]["modules"]["blocks.0.conv.weight"]).all())
