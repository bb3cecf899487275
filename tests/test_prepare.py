"""`lamina prepare` and the `parquet:` data spec: shards and a manifest written by Ray tasks onto a `file://`
URI through pyarrow.fs, the same frames as decoding the files, a re-run that skips finished sources, damaged
sources and shards named and skipped (or stopping with strict), storage that cannot be reached, bounded
memory over a dataset larger than the cache, replay and resume on the Ray pipeline, the CLI end to end on
shared real videos, and the source-throughput bench."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from support import Recorder, sequential, state_differences
from video_support import damaged_set, encode, shape_frames, shapes_dataset

from pipeline.bench.sources import SourceBenchConfig, format_sources, run_sources
from pipeline.checkpoints import CheckpointStore
from pipeline.cli import main
from pipeline.config import TrainConfig
from pipeline.control import RunControl
from pipeline.engines.ray_engine import run_ray
from pipeline.errors import ConfigError, DataError
from pipeline.sources import load_videos, open_source
from pipeline.sources.dataset import PrepareOptions
from pipeline.sources.parquet import open_dataset
from pipeline.sources.prepare import prepare

pytestmark = pytest.mark.timeout(240)

OPTIONS = PrepareOptions(size=16, group_frames=10)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shapes_dataset(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def dataset(ray_local: str, shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The shapes prepared onto a file:// URI: the `parquet:` spec of it."""
    uri = (tmp_path_factory.mktemp("ds") / "shapes").as_uri()
    prepare([str(shapes)], uri, OPTIONS, progress=False)
    return f"parquet:{uri}"


def _root(spec: str) -> Path:
    return Path(spec.removeprefix("parquet:").removeprefix("file://"))


def test_prepare_writes_shards_and_a_manifest_through_pyarrow_fs(dataset: str, shapes: Path) -> None:
    root = _root(dataset)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["format"] == "lamina-frames" and manifest["options"] == OPTIONS.to_dict()
    assert manifest["labels"] == ["disc", "square"] and manifest["counts"]["videos"] == 6
    assert manifest["counts"]["frames"] == 6 * 24 and not manifest["skipped"]
    for v in manifest["videos"]:
        assert v["frames"] == 24 and len(v["sha256"]) == 64 and v["label"] == Path(v["source"]).parent.name
    for s in manifest["shards"]:
        table = pq.read_table(root / s["file"])
        assert table.schema.field("image").type == pa.binary(16 * 16 * 3)
        assert (root / s["file"]).stat().st_size == s["bytes"] and table.num_rows == s["rows"]
        assert all(g <= 10 for g in (pq.ParquetFile(root / s["file"]).metadata.row_group(i).num_rows
                                     for i in range(pq.ParquetFile(root / s["file"]).num_row_groups)))
        assert (root / s["file"].replace(".parquet", ".json")).is_file()  # the shard's record
    assert ray.is_initialized()  # a Ray the caller connected stays connected


def test_parquet_gives_the_frames_of_decoding_the_files(dataset: str, shapes: Path) -> None:
    prepared = open_source(dataset, 16, 4, 5, seed=2, stride=2)
    decoded = open_source(f"video:{shapes}", 16, 4, 5, seed=2, stride=2)
    assert prepared.frame_shape == decoded.frame_shape == (3, 16, 16)
    for m in range(6):
        a, b = prepared.batch(m), decoded.batch(m)
        assert torch.equal(a.frames, b.frames) and torch.equal(a.labels, b.labels)
        assert (a.sequences, a.starts) == (b.sequences, b.starts) and len(set(a.sequences)) == 4
    again = open_source(f"{dataset},workers=1,readahead=0,cache=1", 16, 4, 5, seed=2, stride=2)
    assert torch.equal(again.batch(4).frames, prepared.batch(4).frames)  # replay: another instance, cold cache
    probe = load_videos(f"{dataset},probe_frames=7", 16, "probe")
    assert probe.frames.shape == (6, 7, 3, 16, 16) and probe.labels[:, 0].tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ConfigError, match="--size 32 does not match .* prepared at 16x16"):
        open_source(dataset, 32, 4, 5, seed=0)


@pytest.mark.parametrize("encoding", ["png", "jpeg"])
def test_png_and_jpeg_frames(ray_local: str, shapes: Path, dataset: str, tmp_path: Path, encoding: str) -> None:
    prepare([str(shapes / "disc")], str(tmp_path / encoding), PrepareOptions(size=16, encoding=encoding),
            progress=False)
    got = load_videos(f"parquet:{tmp_path / encoding}", 16, "probe").frames
    raw = load_videos(f"{dataset},probe_frames=16", 16, "probe").frames[:3]
    if encoding == "png":
        assert torch.equal(got, raw)  # lossless
    else:
        assert 0 < float((got - raw).abs().mean()) < 0.03


def test_a_rerun_prepares_only_what_is_new_and_rebuilds_a_torn_shard(ray_local: str, shapes: Path,
                                                                       tmp_path: Path) -> None:
    out = str(tmp_path / "ds")
    first = prepare([str(shapes / "disc")], out, OPTIONS, progress=False)
    assert (first.prepared, first.reused, first.videos) == (3, 0, 3)
    second = prepare([str(shapes)], out, OPTIONS, progress=False)
    assert (second.prepared, second.reused, second.videos) == (3, 3, 6)
    whole = prepare([str(shapes)], str(tmp_path / "whole"), OPTIONS, progress=False)
    a, b = open_source(f"parquet:{out}", 16, 4, 3, seed=0), open_source(f"parquet:{tmp_path / 'whole'}", 16, 4, 3, 0)
    assert all(torch.equal(a.batch(m).frames, b.batch(m).frames) for m in range(4))
    assert whole.reused == 0
    # A task killed between its shard and its record: the shard without a record is done again.
    records = sorted((tmp_path / "ds" / "shards").glob("*.json"))
    lost = json.loads(records[0].read_text())
    records[0].unlink()
    third = prepare([str(shapes)], out, OPTIONS, progress=False)
    assert third.prepared == len(lost["videos"]) and third.reused == 6 - len(lost["videos"])
    with pytest.raises(ConfigError, match=r"prepared with \{'size': 16\}"):
        prepare([str(shapes)], out, PrepareOptions(size=24, group_frames=10), progress=False)


def test_damaged_sources_are_named_skipped_and_counted_or_stop_with_strict(
        ray_local: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = encode(tmp_path / "good.mp4", shape_frames("disc", 30, 48, 36, 0))
    long_good = encode(tmp_path / "long.mkv", shape_frames("square", 90, 64, 48, 5))
    expected = damaged_set(tmp_path / "bad", good, long_good, tmp_path)
    result = prepare([str(tmp_path / "bad")], str(tmp_path / "ds"), OPTIONS, progress=False)
    skipped = {Path(s).name: why for s, why in result.skipped}
    assert set(skipped) == set(expected) and result.videos == 1
    for name, fragment in expected.items():
        assert fragment in skipped[name], (name, skipped[name])
        assert any(name in r.getMessage() for r in caplog.records if r.levelname == "WARNING"), name
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["counts"]["skipped"] == len(expected) and len(manifest["videos"]) == 1
    assert open_dataset(str(tmp_path / "ds")).catalog.lengths.tolist() == [30]  # the rest stays usable
    with pytest.raises(DataError, match="--strict stops") as e:
        prepare([str(tmp_path / "bad")], str(tmp_path / "strict"), OPTIONS, strict=True, progress=False)
    assert str(tmp_path / "bad") in str(e.value)


def _copy(dataset: str, to: Path) -> tuple[Path, dict]:
    shutil.copytree(_root(dataset), to)
    return to, json.loads((to / "manifest.json").read_text())


@pytest.mark.parametrize(("damage", "fragment"), [
    ("truncate", "truncated or not a Parquet file"), ("schema", "wrong schema"),
    ("rows", "does not match the manifest"), ("missing", "missing")])
def test_an_unusable_shard_is_named_and_skipped_with_its_videos(dataset: str, tmp_path: Path, damage: str,
                                                               fragment: str,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    root, manifest = _copy(dataset, tmp_path / "ds")
    shard = manifest["shards"][0]
    path = root / shard["file"]
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:shard["bytes"] // 2])
    elif damage == "schema":
        pq.write_table(pa.table({"video": ["x"], "frame": [0], "pixels": [b"\0"]}), path)
    elif damage == "rows":
        manifest["shards"][0]["rows"] += 5
        (root / "manifest.json").write_text(json.dumps(manifest))
    else:
        path.unlink()
    lost = sum(1 for v in manifest["videos"] if v["shard"] == shard["file"])
    opened = open_dataset(str(root))
    assert opened.skipped == ((shard["file"], opened.skipped[0][1]),) and fragment in opened.skipped[0][1]
    assert len(opened.catalog.lengths) == 6 - lost
    assert any(shard["file"] in r.getMessage() and fragment in r.getMessage() for r in caplog.records)
    src = open_source(f"parquet:{root}", 16, 2, 3, seed=0)
    assert src.batch(0).frames.shape == (2, 3, 3, 16, 16)  # the rest trains
    with pytest.raises(DataError, match=f"{shard['file']}: .*{fragment}"):
        open_dataset(f"{root},strict=1")


@pytest.mark.parametrize(("edit", "fragment"), [
    (lambda m: m.pop("videos"), "field 'videos' must be list"),
    (lambda m: m["videos"][0].update(shard="shards/other.parquet"), "which 'shards' does not list"),
    (lambda m: m["shards"][0].update(file="../../etc/passwd"), "must be distinct shards/NAME.parquet"),
    (lambda m: m.update(version=99), "version 99"),
    (lambda m: m["options"].update(size="16"), "option 'size' must be int")])
def test_a_manifest_that_does_not_fit_is_refused_naming_it(dataset: str, tmp_path: Path, edit: object,
                                                            fragment: str) -> None:
    root, manifest = _copy(dataset, tmp_path / "ds")
    edit(manifest)  # type: ignore[operator]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"manifest.json: .*{fragment}"):
        open_dataset(str(root))


def test_no_manifest_or_unreadable_storage_is_a_clear_error(shapes: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no manifest.json .* did not finish"):
        open_dataset(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not a readable JSON record"):
        open_dataset(str(tmp_path))
    for uri in ("nosuchfs://bucket/data", "hdfs://127.0.0.1:1/data"):
        with pytest.raises(DataError, match=f"{uri}: its filesystem is not available"):
            open_dataset(uri)
        with pytest.raises(DataError, match=f"--out {uri}: its filesystem is not available"):
            prepare([str(shapes)], uri, OPTIONS, progress=False)


def test_a_dataset_larger_than_the_cache_streams_with_flat_memory(ray_local: str, tmp_path: Path) -> None:
    """20 videos of 200 frames at 32x32 RGB (12 MB of frames) through a 1 MB cache: the row groups are read
    again and again, and neither the cache nor Arrow's allocations grow past the bound."""
    (tmp_path / "v").mkdir()
    for i in range(20):
        encode(tmp_path / "v" / f"{i:02d}.mkv", shape_frames(("disc", "square")[i % 2], 200, 40, 32, i), "ffv1")
    prepare([str(tmp_path / "v")], str(tmp_path / "ds"), PrepareOptions(size=32, group_frames=16), progress=False)
    src = open_source(f"parquet:{tmp_path / 'ds'},cache=1", 32, 8, 8, seed=0)
    one_batch = 8 * 2 * 16 * 32 * 32 * 3  # eight clips, each in at most two row groups of 16 frames
    arrow = []
    for m in range(120):
        src.batch(m)
        arrow.append(pa.total_allocated_bytes())
    cache = src.cache  # type: ignore[attr-defined]
    assert cache.peak <= 2**20 + one_batch
    assert cache.reads > 4000 // 16  # more row-group reads than the dataset has row groups: it streamed
    assert max(arrow) < 4 * 2**20, max(arrow)


def test_a_ray_run_on_parquet_stopped_and_resumed_equals_the_sequential_loop(ray_local: str, dataset: str,
                                                                            tmp_path: Path) -> None:
    cfg = TrainConfig(data=dataset, layers="conv:4,conv:4,conv:4", size=16, clips=4, clip_len=3, steps=10,
                      checkpoint_every=0, queue_depth=2, run_dir=str(tmp_path / "run"))
    source = open_source(cfg.data, cfg.size, cfg.clips, cfg.clip_len, cfg.seed)
    spec = cfg.learner_spec(source.frame_shape)
    store = CheckpointStore(str(tmp_path / "ck"), keep=5)
    control = RunControl()
    stopped = run_ray(cfg, spec, source, Recorder(lambda m: control.request_stop() if m == 3 else None),
                      store=store, control=control).stopped_at
    assert stopped is not None and 4 <= stopped < cfg.steps
    ckpt = store.load_latest()
    assert ckpt is not None and ckpt.step == stopped
    calls = Recorder()
    fresh = open_source(cfg.data, cfg.size, cfg.clips, cfg.clip_len, cfg.seed)  # as `--resume` opens it again
    resumed = run_ray(cfg, spec, fresh, calls, resume=ckpt, store=store).states
    assert calls.steps == list(range(stopped, cfg.steps))
    reference = open_source(cfg.data, cfg.size, cfg.clips, cfg.clip_len, cfg.seed)
    assert state_differences(resumed, sequential(cfg, reference)) == []


def test_cli_prepare_train_probe_on_shared_videos(shared_data: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Real files nobody here made, folder-per-label (two signs, two copies each), a damaged copy among them:
    `lamina prepare` in a process of its own (its own Ray, stopped when it is done), then train and probe."""
    for sign in ("again", "yes"):
        (tmp_path / "signs" / sign).mkdir(parents=True)
        for k in range(2):
            shutil.copy(shared_data / "video" / "asl_gestures" / f"{sign}.mkv", tmp_path / "signs" / sign / f"{k}.mkv")
    data = (shared_data / "video" / "asl_gestures" / "yes.mkv").read_bytes()
    (tmp_path / "signs" / "yes" / "cut.mkv").write_bytes(data[:len(data) // 2])
    out = tmp_path / "ds"
    code = ("import sys, ray; from pipeline.cli import main; rc = main(sys.argv[1:]); "
            "print('ray left running' if ray.is_initialized() else 'ray stopped'); sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code, "prepare", str(tmp_path / "signs"), "--out", str(out),
                          "--size", "16", "--workers", "2"], check=False, capture_output=True, text=True, timeout=180,
                         env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ray stopped" in run.stdout and "4 videos" in run.stdout and "2 labels" in run.stdout
    assert "cut.mkv: truncated" in run.stdout and "cut.mkv" in run.stderr  # summary and warning name it
    assert "prepare [" in run.stderr  # the progress bar
    run_dir = tmp_path / "run"
    assert main(["train", "--data", f"parquet:{out}", "--size", "16", "--layers", "conv:4,conv:8", "--clips", "3",
                 "--clip-len", "3", "--steps", "4", "--engine", "sequential", "--head", "16,8",
                 "--run-dir", str(run_dir)]) == 0
    assert main(["probe", "--run-dir", str(run_dir), "--probe-views", "0,5,10"]) == 0
    report = json.loads((run_dir / "probe.json").read_text())
    assert [r["layer"] for r in report["layers"]] == [1, 2] and report["train_frames"] == 4 * 3
    assert all(0 <= r["linear"] <= 1 and 0 <= r["linear_random"] <= 1 for r in report["layers"])
    assert "random" in capsys.readouterr().out


def test_source_bench_measures_both_sources_against_the_pipeline(ray_local: str, tmp_path: Path) -> None:
    cfg = SourceBenchConfig(generated=16, generated_frames=30, batches=3, warmup=2, pipeline_steps=3,
                            pipeline_warmup=2, repeats=1)  # 16 videos: one per clip of a micro-batch
    res = run_sources(cfg, tmp_path)
    assert res["data"]["videos"] == 16 and res["consumption"]["frames_per_s"] > 0
    assert [(r["source"], r["mode"]) for r in res["rows"]] == [("parquet", "streaming"), ("parquet", "cached"),
                                                              ("video", "streaming"), ("video", "cached")]
    assert all(r["frames_per_s"] > 0 and r["frames_per_cpu_s"] > 0 and r["x_consumption"] > 0 for r in res["rows"])
    assert set(res["in_situ"]["driver_cpu_ms"]) == {"memory", "parquet"}
    assert res["in_situ"]["parquet"] > 0 and len(res["in_situ"]["memory_runs"]) == 1
    assert res["rows"][1]["segment_reads"] == 0  # the second pass over the videos: all cached
    assert "| parquet | streaming |" in format_sources(res)
    assert not list(tmp_path.iterdir())  # its working files are gone
