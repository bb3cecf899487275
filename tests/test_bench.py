"""`lamina bench` machinery on tiny settings: every measurement present, sane, and written out.

The real quick bench (`lamina bench --quick`, a minute or two) is marked slow; the GPU check is marked gpu.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from support import setup, tiny_config, tiny_npz

from pipeline.bench import report, suite
from pipeline.bench.measure import pipeline_run
from pipeline.bench.transport import KB, MB
from pipeline.engines.placement import StageActors
from pipeline.engines.ray_engine import RayPipeline
from pipeline.errors import ConfigError

pytestmark = pytest.mark.timeout(120)

TINY = suite.BenchConfig(layers="conv:8,conv:8", clips=4, clip_len=3, size=16, stages=(2,), scaling_clips=(4,),
                         warmup=2, steps=3, repeats=1, hop_sizes=(64 * KB, 1 * MB), hop_rounds=2)


def test_bench_measures_everything_side_by_side(ray_local: str, tmp_path: Path) -> None:
    res = suite.run_bench(TINY)
    table = report.write(res, tmp_path)

    head = res["headline"]
    assert head["stages"] == 2 and len(head["t_iso_s"]) == 2 and head["rate"] > 0
    assert all(t > 0 for t in head["t_iso_s"])
    assert 0 < head["efficiency"] < 1.5
    # Three measured micro-batches: the sink's completion window can be shorter than the bottleneck's summed
    # busy time (work queued before the window), so the fraction gets the same sanity bound as efficiency.
    assert 0 < head["bottleneck_busy_fraction"] < 1.5
    assert set(head["baselines"]) == {"sequential 1t", f"sequential {TINY.cores}t", f"e2e {TINY.cores}t"}
    assert all(v > 0 for v in head["baselines"].values())
    assert [(s["stages"], s["clips"]) for s in res["scaling"]] == [(2, 4)]
    assert all(s["rate"] > 0 and 0 < s["efficiency"] < 1.5 for s in res["scaling"])
    memory = res["memory"][4]
    assert set(memory) == {"layers 0-0", "layers 1-1", "layers 0-1", "e2e 0-1"}  # (tiny layers: peaks within allocator slack)
    assert [h["nbytes"] for h in res["hops"]] == [64 * KB, 1 * MB]
    # Every hop measured, beside the memcpy it is compared with in the table (the comparison is the bench's).
    assert all(set(h["ms"]) >= {"numpy-ref", "direct", "compiled-graph", "shm", "shm-in-place", "memcpy"}
               and all(v > 0 for v in h["ms"].values()) for h in res["hops"])
    # The engine's transports side by side, in the same repeats as the headline, with what each costs idle.
    assert set(res["by_transport"]) == {"object-store", "direct", "compiled-graph", "shm"}
    assert all(v["rate"] > 0 and v["idle_cores"] >= 0 for v in res["by_transport"].values())
    assert "## Transports side by side" in table
    # None lost a stage here; one that did says so under the table.
    assert all(v["lost"] == [] for v in res["by_transport"].values()) and "lost a stage" not in table
    direct = {**res["by_transport"]["direct"], "lost": ["stage 1 (x) lost on micro-batch 3: TransferLost"]}
    rerun = report.write({**res, "by_transport": {**res["by_transport"], "direct": direct}}, tmp_path / "rerun")
    assert "direct: 1 repeat(s) lost a stage and ran again on new stage actors (first: stage 1 (x)" in rerun
    # The whole network as one stage of 1 and of 2 replicas.
    assert [r["replicas"] for r in res["replicas"]["rows"]] == [1, 2]
    assert all(r["rate"] > 0 and 0 < r["scaling_efficiency"] < 1.5 for r in res["replicas"]["rows"])
    assert "## Replicas" in table
    # Balance: each split's stages with their measured memory (2 layers in 2 stages: one split only).
    bl = res["balance"]
    assert bl["balanced"] == bl["even"] and len(bl["even_stage_mb"]) == 2 and all(m > 0 for m in bl["even_stage_mb"])
    assert len(bl["even_busy_s"]) == len(bl["balanced_busy_s"]) == 2 and all(t > 0 for t in bl["balanced_busy_s"])
    assert "stage memory (MB)" in table and "stage step in the pipeline (ms)" in table

    on_disk = json.loads((tmp_path / "bench.json").read_text())
    assert on_disk["headline"]["rate"] == pytest.approx(head["rate"])
    assert (tmp_path / "bench.md").read_text().strip() == table.strip()
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert "pipeline efficiency" in table and "| 1 MB |" in table


def test_a_stages_cpu_is_divided_by_the_steps_it_ran_inside_the_metered_window() -> None:
    # A stage below the top runs ahead of it: its steps straddle the window's ends, or fall outside it.
    from pipeline.bench.measure import _steps_within

    steps = [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0), (3.0, 4.0), (9.0, 9.0)]  # the last took no time: left out
    assert _steps_within(steps, 0.5, 3.0) == pytest.approx(2.5)
    assert _steps_within(steps, 4.0, 8.0) == 0.0


def _measured(hop_x: float = 1.6, **head: Any) -> dict[str, Any]:
    """A bench result with only what the targets read: by default the committed quick run's figures."""
    h = {"stages": 2, "efficiency": 0.94, "bottleneck_busy_fraction": 1.0, "compute_slowdown": 1.06,
         "corun_slowdown": 1.07, "cpu_efficiency": 1.0, "cores": {"driver": 0.02, "ray": 0.08, "other": 0.01},
         "t_iso_s": [0.070, 0.042], "baselines": {"sequential 1t": 8.54, "sequential 2t": 10.17},
         "vs_sequential": {"sequential 1t": 1.62, "sequential 2t": 1.36}, **head}
    hop = {"nbytes": MB, "ms": {"shm": 0.10, "shm-in-place": 0.03 * hop_x, "wake": 0.02, "memcpy": 0.03},
           "vs_memcpy": {"shm": 3.5, "shm-in-place": hop_x, "wake": 0.6, "memcpy": 1.0}}
    return {"headline": h, "hops": [hop], "config": {"cores": 2}}


def _shortfalls(res: dict[str, Any]) -> dict[str, str]:
    return {target: why for target, _, met, why in report.targets(res) if not met}


def test_a_run_that_loses_a_stage_runs_again_once_on_new_stage_actors(ray_local: str, tmp_path: Path) -> None:
    # What a transfer Ray gave up on looks like to the bench: a stage gone in the middle of its run.
    cfg = tiny_config(tiny_npz(tmp_path), transport="object-store")
    spec, sampler = setup(cfg)
    lost: list[str] = []
    with contextlib.ExitStack() as stack:
        def fresh() -> RayPipeline:
            return RayPipeline(stack.enter_context(StageActors(cfg, spec)))

        first = fresh()
        ray.kill(first.actors.handles[1], no_restart=True)
        pipe, got = suite.run_or_rerun(first, fresh, lost, lambda p: pipeline_run(p, sampler, 0, 1, 3))
        assert pipe is not first and first.actors.handles == [] and got["rate"] > 0
        assert len(lost) == 1 and "stage 1" in lost[0]


def test_each_missed_target_names_where_its_shortfall_comes_from() -> None:
    # The committed run: only efficiency missed, and all of it is the machine's co-run.
    assert _shortfalls(_measured()) == {"pipeline efficiency >= 0.95": "machine: the stages at once, no transport, "
                                        "no driver, step 1.07x slower than alone"}
    met = _measured(efficiency=0.96, compute_slowdown=1.0, corun_slowdown=1.0)
    assert _shortfalls(met) == {} and len(report.targets(met)) == 4
    # The bottleneck waiting is the pipeline's own loss (transport or driver).
    waits = _shortfalls(_measured(efficiency=0.9, bottleneck_busy_fraction=0.9, compute_slowdown=1.0, corun_slowdown=1.0))
    assert waits["pipeline efficiency >= 0.95"] == "transport or driver: the slowest stage waited 10% of the time"
    # A slowdown beyond the co-run: the stage's process working harder, or the stage waiting for a core.
    slow = _shortfalls(_measured(efficiency=0.75, compute_slowdown=1.3, corun_slowdown=1.0, cpu_efficiency=0.8))
    assert "the slowest stage's process: 1.25x its CPU per step alone (1.30x beyond the co-run)" in slow[
        "pipeline efficiency >= 0.95"]
    # ... told apart by thread: the step's own thread slower, or other threads of the process taking CPU.
    step = _shortfalls(_measured(efficiency=0.75, compute_slowdown=1.3, corun_slowdown=1.0, cpu_efficiency=0.8,
                                 step_cpu_efficiency=0.8, other_threads_cpu_per_mb_s=0.001))
    assert step["pipeline efficiency >= 0.95"].endswith("beyond the co-run): the step's thread 1.25x")
    spun = _shortfalls(_measured(efficiency=0.75, compute_slowdown=1.3, corun_slowdown=1.0, cpu_efficiency=0.8,
                                 step_cpu_efficiency=1.0, other_threads_cpu_per_mb_s=0.0175))
    assert spun["pipeline efficiency >= 0.95"].endswith(": other threads 17.5 ms per micro-batch, the step's thread 1.00x")
    queued = _shortfalls(_measured(efficiency=0.8, compute_slowdown=1.2, corun_slowdown=1.0))
    assert queued["pipeline efficiency >= 0.95"].startswith("waiting for a core: 1.20x beyond the co-run (driver 0.02")
    timed = _shortfalls(_measured(efficiency=0.8, compute_slowdown=1.2, corun_slowdown=1.0, step_wait_per_mb_s=0.012))
    assert timed["pipeline efficiency >= 0.95"].endswith("; the step's thread waited 12.0 ms per micro-batch)")
    # Slower than a loop: imbalance when even a perfect pipeline of this split could not beat it.
    lopsided = _shortfalls(_measured(t_iso_s=[0.12, 0.02], vs_sequential={"sequential 1t": 1.1, "sequential 2t": 0.8}))
    assert lopsided["S = 2 faster than the sequential 2t loop"] == ("imbalance: at efficiency 1 the slowest stage "
                                                                    "(120 ms) gives 0.82x")
    behind = _shortfalls(_measured(vs_sequential={"sequential 1t": 1.1, "sequential 2t": 0.95}))
    assert behind["S = 2 faster than the sequential 2t loop"] == "the efficiency above: at efficiency 1 this split gives 1.40x"
    # A hop over 2 memcpys: the fixed cost per message beyond the copy.
    hop = _shortfalls(_measured(hop_x=2.3))["best transport per hop at 1 MB <= 2x memcpy"]
    assert hop == "transport: 0.039 ms per message beyond the copy; the FIFO wake-up alone 0.020 ms"


def test_bench_config_rejects_uneven_splits() -> None:
    with pytest.raises(ValueError, match="divide"):
        suite.BenchConfig(layers="conv:8,conv:8,conv:8", stages=(2,))


def test_bench_flags_choose_the_transports_the_repeats_and_the_sections() -> None:
    cfg = suite.bench_config(True, "object-store, shm", 7, headline_only=True)
    assert cfg.pipeline_transports == ("object-store", "shm") and cfg.repeats == 7
    assert (cfg.stages, cfg.scaling_clips, cfg.balance, cfg.replicas, cfg.sources) == ((2,), (16,), False, (), None)
    assert suite.bench_config(True) == suite.QUICK and suite.bench_config(False) == suite.FULL
    with pytest.raises(ConfigError, match="--transports: unknown \\['pigeon'\\]"):
        suite.bench_config(True, "shm,pigeon")
    with pytest.raises(ConfigError, match="--repeats"):
        suite.bench_config(True, repeats=-1)


@pytest.mark.slow
@pytest.mark.timeout(660)  # the quick bench takes about 4 minutes here, the default limit is 300 s
def test_quick_bench_end_to_end(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "--quick", "--out", str(tmp_path)],
                         check=False, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "bench.json").read_text())["headline"]["efficiency"] > 0


@pytest.mark.gpu
def test_gpu_check_runs() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    out = subprocess.run([sys.executable, "-m", "pipeline.bench.gpu_check", "--steps", "10"], check=False,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "efficiency" in out.stdout


def test_gpu_check_fails_clearly_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    out = subprocess.run([sys.executable, "-m", "pipeline.bench.gpu_check"], check=False, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "no CUDA device" in out.stderr


def test_the_replica_breakdown_times_alone_halves_and_replicas(capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.bench import replicas

    assert replicas.main(["--clips", "4", "--steps", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["alone, the whole micro-batch", "2 processes, a share each, no group",
                                                       "2 replicas"]
    gathers = [float(v) for v in rows[2].split("|")[3].split("/")]
    assert len(gathers) == 2 and all(v > 0 for v in gathers)  # both replicas spent time inside the gathers


def test_the_layout_bench_times_every_stage_range_in_both_layouts_with_the_same_outputs() -> None:
    from pipeline.bench import layout

    cfg = suite.BenchConfig(layers="conv:4,conv:4,conv:4,mlp:8", size=16, clip_len=3)
    rows = layout.run(cfg, rounds=1, steps=1, warmup=1)
    ranges = {(0, 4), (0, 2), (2, 4), (0, 1), (1, 2), (2, 3), (3, 4)}  # every stage of S = 1, 2 and 4
    assert {r["range"] for r in rows} == ranges and {r["clips"] for r in rows} == {4, 16}
    assert all(r["ms"]["default"] > 0 and r["ms"]["channels-last"] > 0 for r in rows)
    assert all(r["max_diff"] < 1e-4 for r in rows)  # rounding only: the same computation in either layout
    assert layout.table(rows).count("\n") == len(rows) + 1


def test_the_huge_pages_bench_steps_the_first_stage_in_fresh_processes_with_and_without() -> None:
    import os

    from pipeline.bench import hugepages

    rows = hugepages.run(rounds=1, steps=5)
    measured = rows[0]
    assert set(measured) == set(hugepages.SETTINGS) and all(r["alone_ms"] > 0 for r in measured.values())
    if len(os.sched_getaffinity(0)) > 1:
        assert all(r["beside_ms"] > 0 for r in measured.values())
        assert "beside the second stage:" in hugepages.table(rows)
    assert "huge pages" in hugepages.SETTINGS and "GLIBC_TUNABLES" not in hugepages.SETTINGS["4 KiB pages"]


def test_the_slack_bench_runs_pairs_with_and_without_giving_way(ray_local: str) -> None:
    from pipeline.bench import slack

    rows = slack.run(TINY, 1, 3, "shm", 2)  # the plumbing: tests/test_slack.py has a stage give way
    assert len(rows) == 1 and rows[0]["t_iso_s"] > 0
    for way in ("on", "off"):
        assert rows[0][way]["rate"] > 0 and len(rows[0][way]["giving_way"]) == 2
        assert all(0 <= g <= 1 for g in rows[0][way]["giving_way"])
    assert rows[0]["off"]["giving_way"] == [0, 0]  # off: never
    text = slack.table(rows, TINY, "shm", 2)
    assert "| 1 |" in text and "on / off: median" in text


def test_the_driver_bench_fits_the_paced_drivers_cost_per_stage(ray_local: str, tmp_path: Path) -> None:
    from pipeline.bench import driver

    a, b = driver.fit([(2, 1.0e-3), (4, 1.5e-3), (8, 2.5e-3)])
    assert (a, b) == pytest.approx((0.5e-3, 0.25e-3))
    got = driver.paced(2, "shm", 6, 3, driver.tiny_data(str(tmp_path)))
    assert got["wall_per_mb_s"] > 0 and got["cpu_per_mb_s"] > 0
    assert got["awake_per_mb_s"] > 0  # the driver's sleeps fell inside the window, and were taken out of it
    more = {**got, "cpu_per_mb_s": got["cpu_per_mb_s"] + 1e-3}  # 1 ms more at S = 4: b = 0.5 ms per stage
    text = driver.table({"shm": {2: got, 4: more}}, 6)
    assert "| shm | 2 |" in text and "| shm | 4 |" in text
    a = got["cpu_per_mb_s"] - 1e-3
    assert text.splitlines()[-1] == f"| shm | {a * 1e3:.2f} | 0.500 | {1 / (a + 4e-3):.0f} / {1 / (a + 32e-3):.0f} / {1 / (a + 128e-3):.0f} |"
