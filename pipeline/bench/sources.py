"""Source throughput against what the pipeline consumes: is the data ever the bottleneck?

[Note: the source is not the bottleneck]
    consumption  the Ray pipeline's steady-state micro-batches/s at the default network (TrainConfig's
                 defaults: 3 conv layers, one stage each, B = 16 clips x T = 8 frames at 32x32; RGB frames,
                 as video has), fed from memory, times B x T: the frames/s training takes in.
    parquet      frames/s the `parquet:` source delivers, micro-batches asked for in order as the driver asks,
                 after warm-up, nothing else running. "streaming": no cache (cache=0), so every clip's row
                 groups are read from storage when it is asked for, without read-ahead: a lower bound for a
                 dataset far larger than memory (which also reads ahead); "cached": the default cache, on
                 the second pass over the data.
    video        the same for `video:`, decoded on the fly: "streaming" decodes every clip's segments again.
    in situ      the pipeline's micro-batches/s fed by the parquet source without cache or read-ahead, next to
                 fed from memory (the dataset's in-memory sample): equal when the source keeps up. The source
                 runs in the driver, on the cores the stages use.
Target: parquet streaming >= 3 x consumption. The data: a folder of videos (--videos), or, without one,
generated ones (a shape drifting over a textured background, h264 in mp4 at 320x240), prepared here.

    python -m pipeline.bench.sources --videos ../shared/data/video --out runs/bench-sources
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceBenchConfig:
    videos: str = ""  # a folder of video files; "": generate them
    generated: int = 24  # videos to generate ...
    generated_frames: int = 150  # ... of this many frames
    batches: int = 40  # measured micro-batches per source and mode
    warmup: int = 4  # micro-batches before each measurement
    pipeline_steps: int = 16  # measured micro-batches of each pipeline run
    pipeline_warmup: int = 4
    repeats: int = 2  # interleaved repeats of every measurement (medians reported)


SOURCES_QUICK = SourceBenchConfig(generated=16, generated_frames=120, batches=24, pipeline_steps=12, repeats=1)
SOURCES_FULL = SourceBenchConfig(generated=32, generated_frames=200, batches=60, pipeline_steps=30, repeats=3)


def generate_videos(folder: Path, count: int, frames: int, seed: int = 0) -> Path:
    """`count` h264 mp4 files of `frames` frames at 320x240, two labels (folders a/ and b/)."""
    import av

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:240, 0:320]
    for i in range(count):
        (folder / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        background = (60 + 40 * np.sin(xx / rng.uniform(8, 30) + rng.uniform(0, 6))[..., None]
                      + rng.uniform(0, 30, 3)).astype(np.uint8)
        x, y, vx, vy = rng.uniform(60, 260), rng.uniform(60, 180), *rng.uniform(-3, 3, 2)
        with av.open(str(folder / "ab"[i % 2] / f"v{i:03d}.mp4"), "w") as c:
            s = c.add_stream("libx264", rate=25)
            s.width, s.height, s.pix_fmt = 320, 240, "yuv420p"
            s.options = {"preset": "veryfast"}
            for t in range(frames):
                img = background.copy()
                cx, cy = 40 + (x + vx * t) % 240, 40 + (y + vy * t) % 160
                img[(xx - cx) ** 2 + (yy - cy) ** 2 < 900] = (220, 180, 40) if i % 2 else (40, 200, 220)
                for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
    return folder


def source_rate(spec: str, clips: int, clip_len: int, size: int, start: int, count: int) -> dict[str, Any]:
    """Frames/s of the source of `spec` over micro-batches [start, start + count), after asking for
    [0, start) (warm-up), with the cache's counters."""
    from pipeline.sources import open_source

    src = open_source(spec, size, clips, clip_len, seed=0)
    try:
        for m in range(start):
            src.batch(m)
        cache = getattr(src, "cache", None)
        reads0 = cache.reads if cache is not None else 0
        t0, c0 = time.perf_counter(), time.process_time()
        for m in range(start, start + count):
            src.batch(m)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        close = getattr(src, "close", None)
        if close is not None:
            close()
    frames = count * clips * clip_len
    return {"frames_per_s": frames / seconds, "frames_per_cpu_s": frames / max(cpu, 1e-9), "seconds": seconds,
            "segment_reads": (cache.reads - reads0) if cache is not None else 0,
            "cache_peak_mb": cache.peak / 2**20 if cache is not None else 0.0}


def pipeline_rates(parquet_spec: str, cfg: SourceBenchConfig) -> dict[str, Any]:
    """Micro-batches/s of the Ray pipeline at the default network, fed from memory and from `parquet_spec`."""
    from pipeline.bench.measure import pipeline_run
    from pipeline.config import TrainConfig
    from pipeline.engines.placement import StageActors
    from pipeline.engines.ray_engine import RayPipeline
    from pipeline.sources import ClipSampler, load_videos, open_source

    total = cfg.pipeline_warmup + cfg.pipeline_steps + 1
    train = TrainConfig(steps=2 * cfg.repeats * total)  # the default network, B, T and size
    streaming = open_source(parquet_spec, train.size, train.clips, train.clip_len, train.seed)
    # From memory: frames of the same dataset (its in-memory sample), so both runs compute on the same shape.
    memory = ClipSampler(load_videos(parquet_spec, train.size, "train"), train.clips, train.clip_len, train.seed)
    spec = train.learner_spec(streaming.frame_shape)
    runs: dict[str, list[float]] = {"memory": [], "parquet": []}
    driver: dict[str, list[float]] = {"memory": [], "parquet": []}  # the driver's CPU ms per micro-batch
    with StageActors(train, spec) as actors:
        pipe = RayPipeline(actors)
        start = 0
        for _ in range(cfg.repeats):  # interleaved, so that a drifting machine reaches both alike
            for name, source in (("memory", memory), ("parquet", streaming)):
                got = pipeline_run(pipe, source, start, cfg.pipeline_warmup, cfg.pipeline_steps)
                runs[name].append(got["rate"])
                driver[name].append(1e3 * got["cores"].get("driver", float("nan")) / got["rate"])
                start += total
    med = statistics.median
    return {"memory": med(runs["memory"]), "parquet": med(runs["parquet"]), "memory_runs": runs["memory"],
            "parquet_runs": runs["parquet"], "driver_cpu_ms": {k: med(v) for k, v in driver.items()},
            "frames_per_micro_batch": train.clips * train.clip_len}


def run_sources(cfg: SourceBenchConfig, workdir: Path | None = None,
                progress: Any = logger.info) -> dict[str, Any]:
    """Every measurement of [Note: the source is not the bottleneck]; Ray must be initialised (the
    pipeline runs need 3 CPUs)."""
    from pipeline.config import TrainConfig
    from pipeline.sources.dataset import PrepareOptions
    from pipeline.sources.prepare import prepare

    train = TrainConfig()
    with tempfile.TemporaryDirectory(prefix="lamina-sources-", dir=workdir) as tmp:
        if cfg.videos:
            videos = cfg.videos
        else:
            progress(f"source bench: generating {cfg.generated} videos of {cfg.generated_frames} frames")
            videos = str(generate_videos(Path(tmp) / "videos", cfg.generated, cfg.generated_frames))
        progress("source bench: lamina prepare")
        prepared = prepare([videos], str(Path(tmp) / "dataset"), PrepareOptions(size=train.size), progress=False)
        dataset = f"parquet:{Path(tmp) / 'dataset'}"
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in range(cfg.repeats):  # interleaved repeats: a drifting machine reaches every source alike
            for kind, spec in (("parquet", dataset), ("video", f"video:{videos}")):
                for mode, cache in (("streaming", 0), ("cached", 512)):
                    progress(f"source bench: {kind} {mode} ({r + 1}/{cfg.repeats})")
                    start = cfg.warmup if mode == "streaming" else cfg.warmup + cfg.batches
                    runs.setdefault((kind, mode), []).append(source_rate(
                        f"{spec},cache={cache}", train.clips, train.clip_len, train.size, start, cfg.batches))
        rows = [{"source": kind, "mode": mode, "runs": got,
                 **{k: statistics.median(g[k] for g in got) for k in got[0]}} for (kind, mode), got in runs.items()]
        progress("source bench: the pipeline fed from memory and from parquet")
        rates = pipeline_rates(f"{dataset},cache=0", cfg)
    consumption = rates["memory"] * rates["frames_per_micro_batch"]
    for row in rows:
        row["x_consumption"] = row["frames_per_s"] / consumption
    return {"config": dataclasses.asdict(cfg), "data": {"videos": prepared.videos, "frames": prepared.frames,
                                                        "source": cfg.videos or "generated"},
            "prepare": {"seconds": prepared.seconds, "frames_per_s": prepared.frames / prepared.seconds},
            "consumption": {"micro_batches_per_s": rates["memory"], "frames_per_s": consumption,
                            "network": train.layers, "clips": train.clips, "clip_len": train.clip_len,
                            "size": train.size},
            "in_situ": {k: rates[k] for k in ("memory", "parquet", "memory_runs", "parquet_runs", "driver_cpu_ms")},
            "rows": rows}


def format_sources(res: dict[str, Any]) -> str:
    c, d = res["consumption"], res["data"]
    lines = [f"## Sources against the pipeline ({d['videos']} videos, {d['frames']} frames: {d['source']})", "",
             (f"The pipeline consumes {c['frames_per_s']:.0f} frames/s ({c['micro_batches_per_s']:.2f} "
              f"micro-batches/s of {c['clips']} x {c['clip_len']} frames at {c['size']}x{c['size']}, "
              f"network {c['network']}, fed from memory). Target: parquet streaming >= 3x."), "",
             ("| source | mode | frames/s | x consumption | frames per CPU-second | segment reads | "
              "cache peak MB |"), "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['source']} | {r['mode']} | {r['frames_per_s']:.0f} | {r['x_consumption']:.1f}x | "
                     f"{r['frames_per_cpu_s']:.0f} | {r['segment_reads']:.0f} | {r['cache_peak_mb']:.1f} |")
    s = res["in_situ"]
    cpu = s["driver_cpu_ms"]
    lines += ["", (f"Medians of {len(s['memory_runs'])} interleaved runs. In situ: the pipeline ran "
                   f"{s['parquet']:.2f} micro-batches/s fed by parquet (streaming) and {s['memory']:.2f} fed from "
                   f"memory ({s['parquet'] / s['memory']:.2f}x); the driver's CPU per micro-batch "
                   f"{cpu['parquet']:.1f} ms against {cpu['memory']:.1f} ms. `lamina prepare` took "
                   f"{res['prepare']['seconds']:.1f} s ({res['prepare']['frames_per_s']:.0f} frames/s, Ray start "
                   f"included).")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import ray

    p = argparse.ArgumentParser(prog="python -m pipeline.bench.sources", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", default="", help="a folder of video files (default: generated ones)")
    p.add_argument("--quick", action="store_true", help="fewer micro-batches and generated videos")
    p.add_argument("--out", default="", help="write sources.json and sources.md here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    cfg = dataclasses.replace(SOURCES_QUICK if args.quick else SOURCES_FULL, videos=args.videos)
    # Workers at niceness 0, as `lamina bench` runs them (pipeline/bench/PERFLOG.md, F3).
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 3), include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=False, _system_config={"worker_niceness": 0})
    try:
        res = run_sources(cfg)
    finally:
        ray.shutdown()
    table = format_sources(res)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sources.json").write_text(json.dumps(res, indent=1) + "\n")
        (out / "sources.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
