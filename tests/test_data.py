"""Where data comes in: the replayable clip sampler, the npz loader's errors, and the generated sources.

Recovery and the transparency test both lean on the sampler being a pure function of (seed, m); the
loaders are the part of the system that meets files nobody here wrote, so their errors must name the file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError, DataError
from pipeline.sources import ClipSampler, Videos, load_videos, synthetic
from pipeline.sources.moving_mnist import CANVAS, moving_mnist_videos
from pipeline.sources.npz import npz_videos
from pipeline.sources.synthetic import CLASS_NAMES, synthetic_videos

# ---------------------------------------------------------------------------------------------- sampler


def numbered_videos(n: int = 6, length: int = 10, wrap: bool = False) -> Videos:
    """Every pixel of frame l of sequence s holds 1000 * s + l, so a clip says where it was cut from."""
    code = 1000 * torch.arange(n)[:, None] + torch.arange(length)[None, :]
    frames = code[:, :, None, None, None].float().expand(n, length, 1, 2, 3).contiguous()
    return Videos(frames, (code % 7).long(), wrap, "numbered")


def decode(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, 1, H, W) numbered frames -> (sequence, frame index), each (B, T)."""
    code = frames[:, :, 0, 0, 0].long()
    return code // 1000, code % 1000


def test_same_seed_and_index_give_the_same_micro_batch() -> None:
    a = ClipSampler(numbered_videos(), clips=4, clip_len=3, seed=7).batch(5)
    b = ClipSampler(numbered_videos(), clips=4, clip_len=3, seed=7).batch(5)
    assert torch.equal(a.frames, b.frames) and torch.equal(a.labels, b.labels)
    assert (a.index, a.sequences, a.starts) == (b.index, b.sequences, b.starts)


def test_another_index_or_seed_gives_another_micro_batch() -> None:
    sampler = ClipSampler(numbered_videos(n=50, length=40), clips=4, clip_len=3, seed=7)
    first = sampler.batch(0)
    assert (first.sequences, first.starts) != (sampler.batch(1).sequences, sampler.batch(1).starts)
    other_seed = ClipSampler(numbered_videos(n=50, length=40), clips=4, clip_len=3, seed=8).batch(0)
    assert (first.sequences, first.starts) != (other_seed.sequences, other_seed.starts)


def test_stream_resumed_at_m_replays_what_an_uninterrupted_stream_yields() -> None:
    sampler = ClipSampler(numbered_videos(), clips=3, clip_len=4, seed=1)
    uninterrupted = list(sampler.stream(0, 9))
    resumed = list(ClipSampler(numbered_videos(), clips=3, clip_len=4, seed=1).stream(start=5, stop=9))
    assert [b.index for b in resumed] == [5, 6, 7, 8]
    for a, b in zip(uninterrupted[5:], resumed, strict=True):
        assert torch.equal(a.frames, b.frames) and (a.sequences, a.starts) == (b.sequences, b.starts)
    endless = sampler.stream(start=5)
    assert torch.equal(next(endless).frames, uninterrupted[5].frames)


def test_micro_batch_has_the_documented_shapes_and_consistent_metadata() -> None:
    videos = numbered_videos(n=6, length=10)
    mb = ClipSampler(videos, clips=4, clip_len=3, seed=0).batch(2)
    assert mb.frames.shape == (4, 3, 1, 2, 3) and mb.frames.dtype == torch.float32
    assert mb.labels.shape == (4, 3) and mb.labels.dtype == torch.int64
    seq, idx = decode(mb.frames)
    assert seq[:, 0].tolist() == list(mb.sequences) and idx[:, 0].tolist() == list(mb.starts)
    assert torch.equal(mb.labels, videos.labels[seq, idx])


def test_clips_of_a_micro_batch_come_from_distinct_sequences() -> None:
    sampler = ClipSampler(numbered_videos(n=5, length=8), clips=5, clip_len=2, seed=3)
    for m in range(50):
        assert len(set(sampler.batch(m).sequences)) == 5
    # Fewer sequences than clips would make clips of one sequence each other's negatives: refused.
    with pytest.raises(ConfigError, match="--clips 5 is more than the 2 sequences"):
        ClipSampler(numbered_videos(n=2, length=8), clips=5, clip_len=2, seed=3)


def test_turntable_clips_wrap_from_the_last_view_to_the_first() -> None:
    length, t = 6, 4
    sampler = ClipSampler(numbered_videos(n=4, length=length, wrap=True), clips=4, clip_len=t, seed=0)
    crossed = 0
    for m in range(30):
        seq, idx = decode(sampler.batch(m).frames)
        assert (seq == seq[:, :1]).all(), "a clip switched sequence"
        assert ((idx[:, 1:] - idx[:, :-1]) % length == 1).all(), "consecutive frames of a clip are not neighbours"
        crossed += int((idx[:, 1:] < idx[:, :-1]).any(dim=1).sum())
    assert crossed > 0, "no clip ever crossed view V-1 -> view 0 in 30 micro-batches"


def test_non_wrapping_clips_never_run_past_the_last_frame() -> None:
    length, t = 6, 4
    sampler = ClipSampler(numbered_videos(n=4, length=length), clips=4, clip_len=t, seed=0)
    starts = set()
    for m in range(60):
        mb = sampler.batch(m)
        _, idx = decode(mb.frames)
        assert ((idx[:, 1:] - idx[:, :-1]) == 1).all()
        starts.update(mb.starts)
    assert starts == set(range(length - t + 1)), "every legal start should occur, no other"


@pytest.mark.parametrize("wrap", [False, True])
def test_strided_clips_take_every_stride_th_frame_and_stay_inside_the_sequence(wrap: bool) -> None:
    length, t, stride = 10, 3, 4
    sampler = ClipSampler(numbered_videos(n=4, length=length, wrap=wrap), clips=4, clip_len=t, seed=0, stride=stride)
    starts = set()
    for m in range(60):
        mb = sampler.batch(m)
        seq, idx = decode(mb.frames)
        assert (seq == seq[:, :1]).all(), "a clip switched sequence"
        step = idx[:, 1:] - idx[:, :-1]
        assert ((step % length == stride) if wrap else (step == stride)).all()
        starts.update(mb.starts)
    assert starts == set(range(length if wrap else length - (t - 1) * stride))


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"clips": 1}, "--clips"), ({"clip_len": 1}, "--clip-len"), ({"clip_len": 11}, "more than"),
    ({"stride": 0}, "--stride"), ({"clip_len": 4, "stride": 4}, "spans 13 frames"),
])
def test_sampler_rejects_bad_arguments_by_flag(kwargs: dict, fragment: str) -> None:
    args = {"clips": 2, "clip_len": 2, "seed": 0} | kwargs
    with pytest.raises(ConfigError, match=fragment):
        ClipSampler(numbered_videos(length=10), **args)
    with pytest.raises(ValueError, match="-1"):
        ClipSampler(numbered_videos(), clips=2, clip_len=2, seed=0).batch(-1)


# ------------------------------------------------------------------------------------------ npz archives


def seq_arrays(n: int = 3, t: int = 4, h: int = 8, w: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"frames": rng.integers(0, 256, (n, t, h, w), dtype=np.uint8), "labels": np.arange(n)}


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _with(**changes: np.ndarray | None) -> Callable[[Path], Path]:
    """A writer of a sequence archive that differs from a good one by `changes` (None drops the array)."""
    def write(path: Path) -> Path:
        arrays = seq_arrays() | changes
        return write_npz(path, **{k: v for k, v in arrays.items() if v is not None})
    return write


def _text(path: Path) -> Path:
    path.write_text("these are not the frames you are looking for")
    return path


NPZ_ERRORS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing file": (lambda p: p, "no such file"),
    "not a zip": (_text, "not a readable .npz"),
    "no frames or images": (_with(frames=None, clips=seq_arrays()["frames"]), "'frames'.*'images'"),
    "no labels": (_with(labels=None), "missing the array 'labels'"),
    "rank 3": (_with(frames=np.zeros((3, 8, 8), np.uint8)), "rank"),
    "int16": (_with(frames=np.zeros((3, 4, 8, 8), np.int16)), "uint8, or float"),
    "NaN": (_with(frames=np.full((3, 4, 8, 8), np.nan, np.float32)), "NaN or inf"),
    "float beyond 1": (_with(frames=np.full((3, 4, 8, 8), 2.0, np.float32)), r"\[0, 1\]"),
    "empty frames": (_with(frames=np.zeros((3, 4, 0, 8), np.uint8)), "empty"),
    "one frame": (_with(frames=np.zeros((3, 1, 8, 8), np.uint8)), "at least 2 frames"),
    "labels shape": (_with(labels=np.arange(5)), "shape"),
    "negative labels": (_with(labels=np.array([0, -1, 2])), ">= 0"),
    "float labels": (_with(labels=np.array([0.0, 1.0, 2.0])), "integers"),
    "4 channels": (_with(frames=np.zeros((3, 4, 8, 8, 4), np.uint8)), "channels"),
}


@pytest.mark.parametrize("case", NPZ_ERRORS)
def test_bad_npz_archive_raises_data_error_naming_the_file(tmp_path: Path, case: str) -> None:
    writer, fragment = NPZ_ERRORS[case]
    path = writer(tmp_path / f"bad-{case.replace(' ', '-')}.npz")
    with pytest.raises(DataError, match=fragment) as err:
        load_videos(f"npz:{path}", size=8)
    assert path.name in str(err.value)


def test_npy_file_given_as_npz_raises_data_error(tmp_path: Path) -> None:
    path = tmp_path / "frames.npy"
    np.save(path, seq_arrays()["frames"])
    with pytest.raises(DataError, match=path.name):
        npz_videos(str(path), 8)


def test_object_labels_raise_data_error_naming_the_file(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "pickled.npz", frames=seq_arrays()["frames"],
                     labels=np.array([[0], [1], [2]], dtype=object))
    with pytest.raises(DataError, match=path.name):
        npz_videos(str(path), 8)


def test_sequence_archive_labels_per_sequence_and_per_frame(tmp_path: Path) -> None:
    arrays = seq_arrays(n=3, t=4)
    per_seq = npz_videos(str(write_npz(tmp_path / "a.npz", **arrays)), 8)
    per_frame = npz_videos(str(write_npz(tmp_path / "b.npz", frames=arrays["frames"],
                                         labels=np.repeat(arrays["labels"][:, None], 4, axis=1))), 8)
    assert per_seq.frames.shape == (3, 4, 1, 8, 8) and not per_seq.wrap
    assert torch.equal(per_seq.labels, per_frame.labels)
    assert per_seq.labels.tolist() == [[0] * 4, [1] * 4, [2] * 4]
    # Same size: no resampling, just the uint8 -> [0, 1] scale.
    assert torch.equal(per_seq.frames[:, :, 0], torch.from_numpy(arrays["frames"]).float() / 255)


def test_rgb_sequence_archive_has_three_channels(tmp_path: Path) -> None:
    frames = np.zeros((2, 3, 16, 16, 3), np.uint8)
    frames[..., 0] = 255  # pure red: the channel axis must survive the permute
    videos = npz_videos(str(write_npz(tmp_path / "rgb.npz", frames=frames, labels=np.array([0, 1]))), 8)
    assert videos.frame_shape == (3, 8, 8)
    assert videos.frames[:, :, 0].eq(1).all() and videos.frames[:, :, 1:].eq(0).all()


# -------------------------------------------------------------------------- real data nobody here wrote


def shared_file(shared_data: Path, name: str) -> Path:
    path = shared_data / name
    if not path.is_file():
        pytest.skip(f"real data file {path} is absent")
    return path


def test_coil20_turntable_and_a_sequence_archive_cut_from_it(shared_data: Path, tmp_path: Path) -> None:
    coil = shared_file(shared_data, "coil20.npz")
    turntable = load_videos(f"npz:{coil}", size=32)
    assert turntable.wrap and turntable.frames.shape == (20, 72, 1, 32, 32)
    assert turntable.labels[:, 0].tolist() == list(range(20)) and (turntable.labels == turntable.labels[:, :1]).all()

    with np.load(coil) as archive:
        images, labels = archive["images"][:3, 10:20], archive["labels"][:3, 0]
    archive_path = write_npz(tmp_path / "coil-clips.npz", frames=images, labels=labels)
    clips = npz_videos(str(archive_path), 32)
    assert not clips.wrap and clips.frames.shape == (3, 10, 1, 32, 32)
    # 128 -> 32 is exact 4x4 averaging ("area"), so the archive round-trips to the turntable's frames.
    expected = F.avg_pool2d(torch.from_numpy(images).float().div(255).flatten(0, 1)[:, None], 4)
    torch.testing.assert_close(clips.frames.flatten(0, 1), expected)
    torch.testing.assert_close(clips.frames, turntable.frames[:3, 10:20])

    # A clip of the real turntable that crosses view 71 -> view 0 shows neighbouring views.
    sampler = ClipSampler(turntable, clips=8, clip_len=8, seed=0)
    mb = next(b for b in sampler.stream() if any(s > 72 - 8 for s in b.starts))
    k = next(i for i, s in enumerate(mb.starts) if s > 72 - 8)
    views = [(mb.starts[k] + j) % 72 for j in range(8)]
    assert torch.equal(mb.frames[k], turntable.frames[mb.sequences[k], views])


# ------------------------------------------------------------------------------------------- synthetic

SMALL = "sequences=24,probe=16,frames=12"


def test_synthetic_is_deterministic_by_seed() -> None:
    a, b = synthetic_videos(SMALL, 16, "train"), synthetic_videos(SMALL, 16, "train")
    assert torch.equal(a.frames, b.frames) and torch.equal(a.labels, b.labels)
    c = synthetic_videos(SMALL + ",seed=1", 16, "train")
    assert not torch.equal(a.frames, c.frames)


def test_synthetic_probe_sequences_are_held_out_from_train() -> None:
    train = synthetic_videos(SMALL, 16, "train").frames
    probe = synthetic_videos(SMALL, 16, "probe").frames
    assert probe.shape[0] == 16
    # No probe sequence reappears in train (compare every pair of first frames).
    distance = (probe[:, 0].flatten(1)[:, None] - train[:, 0].flatten(1)[None]).abs().mean(-1)
    assert distance.min() > 0.01


def test_synthetic_default_shapes_labels_and_balanced_probe() -> None:
    train, probe = load_videos("synthetic", 32, "train"), load_videos("synthetic", 32, "probe")
    assert train.frames.shape == (160, 32, 1, 32, 32) and train.labels.shape == (160, 32)
    assert probe.frames.shape == (16 * len(CLASS_NAMES), 32, 1, 32, 32) and not train.wrap
    assert train.frames.dtype == torch.float32 and 0 <= train.frames.min() and train.frames.max() <= 1
    assert (train.labels == train.labels[:, :1]).all(), "a sequence shows one object"
    assert torch.bincount(probe.labels[:, 0]).tolist() == [16] * len(CLASS_NAMES)
    assert set(train.labels[:, 0].tolist()) == set(range(len(CLASS_NAMES)))


@pytest.mark.parametrize("size", [16, 48])
def test_synthetic_renders_at_the_requested_size_and_class_count(size: int) -> None:
    videos = synthetic_videos("sequences=9,frames=3,classes=3", size, "train")
    assert videos.frames.shape == (9, 3, 1, size, size)
    assert sorted(set(videos.labels.flatten().tolist())) == [0, 1, 2]


def test_synthetic_consecutive_frames_are_closer_than_other_sequences() -> None:
    """Consecutive frames look alike (the temporal signal), though less than in a slow video: the camera pans
    3-5 px a frame and every nuisance changes within a clip ([Note: what a clip shares])."""
    frames = synthetic_videos("sequences=32,frames=16", 32, "train").frames
    consecutive = (frames[:, 1:] - frames[:, :-1]).abs().mean()
    shuffled = frames[torch.roll(torch.arange(32), 1)]
    across = (frames - shuffled).abs().mean()
    assert consecutive < across / 1.5, (float(consecutive), float(across))


def test_synthetic_nuisance_changes_within_a_clip() -> None:
    """The two ends of a clip of 8 frames are about as far apart in pixels as two different sequences: what
    a clip's frames share is the object, not the picture."""
    frames = synthetic_videos("sequences=32,frames=16", 32, "train").frames
    ends = (frames[:, 7:] - frames[:, :-7]).abs().mean()
    consecutive = (frames[:, 1:] - frames[:, :-1]).abs().mean()
    across = (frames - frames[torch.roll(torch.arange(32), 1)]).abs().mean()
    assert ends > 0.8 * across and ends > 1.5 * consecutive, (float(ends), float(across), float(consecutive))


def test_synthetic_sequences_have_no_brightness_or_contrast_of_their_own() -> None:
    """Frame brightness and contrast vary within a sequence about as much as across sequences, so neither
    tells one clip from another (a per-sequence level would be a shortcut the objective learns instead of
    the object)."""
    frames = load_videos("synthetic", 32, "train").frames
    # Contrast less strictly: part of it is the class's own texture, which sequences should differ in.
    for name, stat, least in (("brightness", frames.mean((2, 3, 4)), 0.8), ("contrast", frames.std((2, 3, 4)), 0.5)):
        within = stat.var(dim=1).mean() / stat.flatten().var()  # share of the variance within sequences
        assert within > least, (name, float(within))


def test_synthetic_picture_does_not_depend_on_the_chunk_size(monkeypatch: pytest.MonkeyPatch) -> None:
    a = synthetic_videos(SMALL, 16, "train")
    monkeypatch.setattr(synthetic, "_CHUNK", 5)
    b = synthetic_videos(SMALL, 16, "train")
    assert torch.equal(a.frames, b.frames) and torch.equal(a.labels, b.labels)


def test_synthetic_class_is_not_given_away_by_mean_brightness() -> None:
    """Nearest class mean on frame brightness, fitted on train, scored on probe: close to chance."""
    train, probe = load_videos("synthetic", 32, "train"), load_videos("synthetic", 32, "probe")
    classes = len(CLASS_NAMES)
    brightness = train.frames.mean((2, 3, 4)).flatten()
    means = torch.stack([brightness[train.labels.flatten() == c].mean() for c in range(classes)])
    guess = ((probe.frames.mean((2, 3, 4)).flatten()[:, None] - means).abs()).argmin(1)
    accuracy = (guess == probe.labels.flatten()).float().mean()
    assert accuracy < 2.5 / classes, float(accuracy)


@pytest.mark.parametrize(("options", "key"), [
    ("bogus=1", "bogus"), ("frames=abc", "frames=abc"), ("frames=1", "frames=1"), ("classes=9", "classes=9"),
    ("sequences=0", "sequences=0"), ("seed=-1", "seed=-1"), ("noise=2", "noise=2"), ("frames", "frames"),
    ("frames=4,frames=5", "frames"),
])
def test_synthetic_bad_option_raises_data_error_naming_it(options: str, key: str) -> None:
    with pytest.raises(DataError, match=key):
        load_videos(f"synthetic:{options}", 16)


# ---------------------------------------------------------------------------------------- moving MNIST


def write_mnist(path: Path, train_value: int = 255, test_value: int = 255, **changes: np.ndarray | None) -> Path:
    """A tiny MNIST-shaped archive: 5 train digits labelled 3, 4 test digits labelled 7, solid squares."""
    arrays: dict[str, np.ndarray | None] = {
        "x_train": np.full((5, 28, 28), train_value, np.uint8), "y_train": np.full(5, 3, np.uint8),
        "x_test": np.full((4, 28, 28), test_value, np.uint8), "y_test": np.full(4, 7, np.uint8),
    }
    arrays |= changes
    return write_npz(path, **{k: v for k, v in arrays.items() if v is not None})


def test_moving_mnist_train_uses_train_digits_and_probe_uses_test_digits(tmp_path: Path) -> None:
    path = write_mnist(tmp_path / "mnist.npz", train_value=10, test_value=200)
    train = moving_mnist_videos(f"{path},sequences=6,frames=5", CANVAS, "train")
    probe = moving_mnist_videos(f"{path},probe=3,frames=5", CANVAS, "probe")
    assert train.frames.shape == (6, 5, 1, CANVAS, CANVAS) and probe.frames.shape == (3, 5, 1, CANVAS, CANVAS)
    assert (train.labels == 3).all() and (probe.labels == 7).all()
    torch.testing.assert_close(train.frames.amax((2, 3, 4)), torch.full((6, 5), 10 / 255))
    torch.testing.assert_close(probe.frames.amax((2, 3, 4)), torch.full((3, 5), 200 / 255))


def test_moving_mnist_digit_bounces_inside_the_canvas_at_1_to_3_px_per_frame(tmp_path: Path) -> None:
    path = write_mnist(tmp_path / "mnist.npz")
    frames = moving_mnist_videos(f"{path},sequences=40,frames=30", CANVAS, "train").frames[:, :, 0]
    # The whole 28x28 square is visible in every frame: nothing is clipped at the walls.
    assert (frames.sum((2, 3)) == 28 * 28).all()
    rows = frames.amax(3).argmax(2).float()  # top edge of the square, (N, L)
    cols = frames.amax(2).argmax(2).float()
    step = torch.stack([rows.diff(dim=1), cols.diff(dim=1)], -1)
    assert step.abs().max() <= 4, "more than 3 px/frame plus rounding"
    speed = step.norm(dim=-1).median(dim=1).values
    assert ((speed >= 0.5) & (speed <= 3.6)).all(), speed
    at_wall = (rows == 0) | (cols == 0) | (rows == CANVAS - 28) | (cols == CANVAS - 28)
    assert at_wall.any(), "no digit reached a wall in 40 x 30 frames: the bounce went untested"


def test_moving_mnist_is_deterministic_and_seeded(tmp_path: Path) -> None:
    path = write_mnist(tmp_path / "mnist.npz")
    a = moving_mnist_videos(f"{path},sequences=4,frames=6", 32, "train")
    b = moving_mnist_videos(f"{path},sequences=4,frames=6", 32, "train")
    c = moving_mnist_videos(f"{path},sequences=4,frames=6,seed=5", 32, "train")
    assert torch.equal(a.frames, b.frames) and not torch.equal(a.frames, c.frames)


def test_moving_mnist_from_the_real_mnist(shared_data: Path) -> None:
    mnist = shared_file(shared_data, "mnist.npz")
    train = load_videos(f"moving-mnist:{mnist},sequences=40,frames=12", 32, "train")
    again = load_videos(f"moving-mnist:{mnist},sequences=40,frames=12", 32, "train")
    assert train.frames.shape == (40, 12, 1, 32, 32) and torch.equal(train.frames, again.frames)
    assert (train.labels == train.labels[:, :1]).all() and 0 <= train.labels.min() and train.labels.max() <= 9
    # Area resizing 64 -> 32 averages 2x2 blocks, so a digit that stays wholly visible keeps its ink.
    ink = train.frames.sum((2, 3, 4))
    torch.testing.assert_close(ink, ink[:, :1].expand_as(ink))
    frames = train.frames
    consecutive = (frames[:, 1:] - frames[:, :-1]).abs().mean()
    assert consecutive < (frames - frames[torch.roll(torch.arange(40), 1)]).abs().mean()
    probe = load_videos(f"moving-mnist:{mnist}", 32, "probe")  # the default probe size
    assert probe.frames.shape == (500, 20, 1, 32, 32)
    assert set(probe.labels[:, 0].tolist()) == set(range(10))


def _mnist_with(**changes: np.ndarray | None) -> Callable[[Path], Path]:
    return lambda p: write_mnist(p, **changes)


def _npy(path: Path) -> Path:
    with path.open("wb") as f:  # a file handle, or np.save would append ".npy" to the name
        np.save(f, np.zeros((2, 28, 28), np.uint8))
    return path


MNIST_ERRORS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing file": (lambda p: p, "no such file"),
    "not a zip": (_text, "not a readable .npz"),
    "npy inside": (_npy, "single .npy array"),
    "missing arrays": (_mnist_with(x_test=None, y_test=None),
                       r"missing arrays \['x_test', 'y_test'\].*found \['x_train', 'y_train'\]"),
    "rank 4": (_mnist_with(x_train=np.zeros((5, 28, 28, 1), np.uint8)), r"\(N, H, W\)"),
    "float32": (_mnist_with(x_train=np.zeros((5, 28, 28), np.float32)), "uint8"),
    "too big": (_mnist_with(x_train=np.zeros((5, 70, 28), np.uint8)), "70x28 do not fit"),
    "label count": (_mnist_with(y_train=np.zeros(4, np.uint8)), r"\(4,\); expected \(5,\)"),
    "negative labels": (_mnist_with(y_train=np.array([0, 1, -2, 3, 4])), ">= 0"),
    "float labels": (_mnist_with(y_train=np.zeros(5, np.float32)), "integers"),
}


@pytest.mark.parametrize("case", MNIST_ERRORS)
def test_bad_mnist_archive_raises_data_error_naming_the_file(tmp_path: Path, case: str) -> None:
    writer, fragment = MNIST_ERRORS[case]
    path = writer(tmp_path / f"mnist-{case.replace(' ', '-')}.npz")
    with pytest.raises(DataError, match=fragment) as err:
        load_videos(f"moving-mnist:{path}", 32)
    assert path.name in str(err.value)


def test_moving_mnist_without_a_path_or_with_a_bad_option(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no path"):
        load_videos("moving-mnist:", 32)
    path = write_mnist(tmp_path / "mnist.npz")
    with pytest.raises(DataError, match="frames=one"):
        load_videos(f"moving-mnist:{path},frames=one", 32)
    with pytest.raises(DataError, match="colour"):
        load_videos(f"moving-mnist:{path},colour=1", 32)


# ------------------------------------------------------------------------------------------- dispatch


def test_unknown_data_kind_names_the_spec() -> None:
    with pytest.raises(ConfigError, match="webcam:0"):
        load_videos("webcam:0")
    with pytest.raises(ValueError, match="'test'"):
        load_videos("synthetic", split="test")
    with pytest.raises(ConfigError, match="--size"):
        load_videos("synthetic", size=2)
