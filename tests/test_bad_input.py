"""Bad input, case by case, through the command line: every case ends in one line that says what is wrong
(`lamina COMMAND: error: ...`), a non-zero exit, no traceback, and nothing already written is lost.

One row per case: the arguments (`{tmp}` is a fresh directory, `{run}` a finished run in it, `{npz}` a
small archive), the exit code, and words the message must hold.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from pipeline.cli import main
from pipeline.engines.cluster import connect

pytestmark = pytest.mark.timeout(120)

TINY = ["--engine", "sequential", "--layers", "conv:4,conv:4", "--size", "8", "--clips", "3", "--clip-len", "2"]

CASES = [
    # flags
    ("negative-after-flag", ["train", "--deltas", "-1,0", *TINY], 2, ["--deltas must be >= 0", "-1.0"]),
    ("negative-steps", ["train", "--steps", "-5"], 2, ["--steps must be >= 1 (got -5)"]),
    ("inf-lr", ["train", "--lr", "inf"], 2, ["--lr", "must be finite"]),
    ("nan-delta", ["train", "--deltas", "nan,0,0"], 2, ["--deltas", "must be finite"]),
    ("zero-depth", ["train", "--queue-depth", "0"], 2, ["--queue-depth must be >= 1 (got 0)"]),
    ("frames-too-small", ["train", "--size", "8", "--layers", "conv:4,conv:4,conv:4,conv:4"], 2,
     ["too many conv blocks for 8x8 frames", "block 4 would get 1x1"]),
    ("unknown-data-kind", ["train", "--data", "webcam:0"], 2, ["--data must be", "webcam:0"]),
    ("unknown-synthetic-option", ["train", "--data", "synthetic:colour=1"], 2, ["synthetic", "colour=1"]),
    ("synthetic-over-budget", ["train", "--data", "synthetic:sequences=1000000"], 2,
     ["synthetic:sequences=1000000: loading it needs about 152.6 GiB", "more than --memory-budget"]),
    ("no-such-file", ["train", "--data", "npz:{tmp}/missing.npz", *TINY], 2, ["missing.npz: no such file"]),
    ("directory-as-npz", ["train", "--data", "npz:{tmp}", *TINY], 2, ["is a directory, not an .npz archive"]),
    ("archive-over-budget", ["train", "--data", "npz:{big}", "--memory-budget", "0.01", *TINY], 2,
     ["needs about", "GiB of memory", "'frames' (40, 50, 64, 64) uint8", "--memory-budget 0.0 GiB"]),
    ("more-clips-than-sequences", ["train", "--data", "npz:{npz}", "--clips", "7", *TINY[:-4], "--clip-len", "2"],
     2, ["--clips 7 is more than the 6 sequences"]),
    ("run-dir-is-a-file", ["train", "--data", "npz:{npz}", "--run-dir", "{tmp}/afile", *TINY], 2,
     ["--run-dir", "afile exists and is not a directory"]),
    ("run-dir-holds-a-run", ["train", "--data", "npz:{npz}", "--run-dir", "{run}", *TINY], 2,
     ["already holds a run", "--resume"]),
    ("store-holds-checkpoints", ["train", "--data", "npz:{npz}", "--run-dir", "{tmp}/new", "--checkpoint-uri",
                                 "{run}/checkpoints", *TINY], 2, ["already holds checkpoints"]),
    ("unknown-filesystem", ["train", "--data", "npz:{npz}", "--run-dir", "{tmp}/fs", "--checkpoint-uri",
                            "nosuchfs://bucket/x", *TINY], 1, ["nosuchfs://bucket/x"]),
    ("hdfs-unavailable", ["train", "--data", "npz:{npz}", "--run-dir", "{tmp}/h", "--checkpoint-uri",
                          "hdfs://127.0.0.1:1/x", *TINY], 1, ["checkpoint store 'hdfs://127.0.0.1:1/x'"]),
    # resume
    ("resume-other-flags", ["train", "--resume", "{run}", "--lr", "0.1", "--clips", "3"], 2,
     ["only --steps may change", "--lr 0.1 (the run has 0.001)"]),
    ("resume-fewer-steps", ["train", "--resume", "{run}", "--steps", "2"], 2, ["--steps 2", "already applied 4"]),
    ("resume-not-a-run", ["train", "--resume", "{tmp}"], 2, ["not a lamina run directory"]),
    ("resume-config-wrong-types", ["train", "--resume", "{bad_config}"], 2, ["config.json: 'steps' must be int"]),
    ("resume-config-not-json", ["train", "--resume", "{broken_config}"], 2, ["config.json: not readable JSON"]),
    # probe
    ("probe-every-view", ["probe", "--run-dir", "{run}", "--probe-views", "0,1,2,3,4,5,6,7,8,9"], 2,
     ["label every frame", "nothing is left to test on"]),
    ("probe-bad-view", ["probe", "--run-dir", "{run}", "--probe-views", "0,99"], 2, ["--probe-views", "[0, 10)"]),
    ("probe-one-sequence", ["probe", "--run-dir", "{run}", "--data", "npz:{one}", "--probe-fraction", "0.5"], 2,
     ["needs at least 2 sequences"]),
    ("probe-classes-on-one-side", ["probe", "--run-dir", "{run}", "--data", "npz:{per_label}"], 2,
     ["labels none of the classes it tests on", "--probe-views"]),
    ("probe-other-frames", ["probe", "--run-dir", "{run}", "--data", "npz:{rgb}"], 2,
     ["(3, 8, 8) do not match the run's (1, 8, 8)"]),
    ("probe-no-checkpoint", ["probe", "--run-dir", "{empty_run}"], 1, ["no complete checkpoint"]),
    # the control plane
    ("control-not-running", ["control", "--run-dir", "{run}", "status"], 2, ["not running"]),
    ("control-stale", ["control", "--run-dir", "{stale}", "status"], 2,
     ["not running", "is gone", "--resume"]),
    # a cluster that is not there
    ("dead-address", ["train", "--data", "npz:{npz}", "--run-dir", "{tmp}/dead", "--address", "127.0.0.1:1",
                      "--layers", "conv:4", "--size", "8", "--clips", "3", "--clip-len", "2"], 1,
     ["no Ray cluster at 127.0.0.1:1"]),
    ("report-no-metrics", ["report", "--run-dir", "{empty_run}"], 2, ["no metrics to plot"]),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished run, a run with nothing in it, broken config files, a stale control file."""
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    np.savez(root / "tiny.npz", frames=rng.integers(0, 256, (6, 10, 8, 8), dtype=np.uint8), labels=np.arange(6) % 3)
    np.savez(root / "one.npz", frames=rng.integers(0, 256, (1, 10, 8, 8), dtype=np.uint8), labels=np.zeros(1, int))
    np.savez_compressed(root / "big.npz", frames=np.zeros((40, 50, 64, 64), np.uint8), labels=np.arange(40))
    np.savez(root / "rgb.npz", frames=rng.integers(0, 256, (6, 10, 8, 8, 3), dtype=np.uint8), labels=np.arange(6))
    np.savez(root / "per_label.npz", frames=rng.integers(0, 256, (6, 10, 8, 8), dtype=np.uint8), labels=np.arange(6))
    run = root / "run"
    assert main(["train", "--data", f"npz:{root / 'tiny.npz'}", "--steps", "4", "--run-dir", str(run), *TINY]) == 0
    empty = root / "empty_run"
    empty.mkdir()
    shutil.copy(run / "config.json", empty / "config.json")
    bad = root / "bad_config"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**json.loads((run / "config.json").read_text()), "steps": "abc"}))
    broken = root / "broken_config"
    broken.mkdir()
    (broken / "config.json").write_text('{"steps": 3,')
    stale = root / "stale"
    shutil.copytree(run, stale)
    dead_pid = _dead_pid()
    (stale / "control.json").write_text(json.dumps({"address": "127.0.0.1:1", "token": "x", "pid": dead_pid}))
    return {"run": run, "npz": root / "tiny.npz", "one": root / "one.npz", "rgb": root / "rgb.npz", "big": root / "big.npz",
            "per_label": root / "per_label.npz",
            "empty_run": empty, "bad_config": bad,
            "broken_config": broken, "stale": stale}


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["serve", "--data", "npz:x.npz"], "unrecognized arguments: --data npz:x.npz"),  # the data is what is pushed
    (["probe", "--run-dir", "x", "--objective", "vicreg"], "unrecognized arguments: --objective vicreg"),
    (["train", "--objective", "nope"], "argument --objective: invalid choice: 'nope'"),
], ids=["unknown-flag", "serve-data", "train-flag-on-probe", "bad-choice"])
def test_a_flag_argparse_refuses_ends_in_a_line_naming_the_command(argv: list[str], message: str,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"lamina {argv[0]}: error: {message}"), last


def _dead_pid() -> int:
    """A pid no process has: a child that has exited and been reaped."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


@pytest.mark.parametrize(("name", "argv", "code", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_ends_in_one_clear_line(name: str, argv: list[str], code: int, words: list[str],
                                          files: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    if name == "dead-address" and ray.is_initialized():
        ray.shutdown()  # as a fresh `lamina` process finds it (another module's Ray may be up in this one)
    (tmp_path / "afile").write_text("not a directory")
    names = {k: str(v) for k, v in files.items()} | {"tmp": str(tmp_path)}
    before = {p: p.stat().st_mtime_ns for p in files["run"].rglob("*") if p.is_file()}
    t0 = time.monotonic()
    assert main([a.format(**names) for a in argv]) == code
    took = time.monotonic() - t0
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"lamina {argv[0]}: error: "), err
    assert all(word in last for word in words), (words, last)
    assert "Traceback" not in err
    # Nothing the finished run wrote was changed by a refused command.
    assert {p: p.stat().st_mtime_ns for p in files["run"].rglob("*") if p.is_file()} == before
    assert took < 60, took


def test_an_address_other_than_the_cluster_already_joined_is_refused(ray_local: str, files: dict[str, Path],
                                                                    tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # A program that called ray.init itself and then asks lamina for another cluster: refused, not run
    # on the one it is connected to.
    argv = ["train", "--data", f"npz:{files['npz']}", "--run-dir", str(tmp_path / "r"), "--address", "127.0.0.1:1",
            "--layers", "conv:4", "--size", "8", "--clips", "3", "--clip-len", "2"]
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"connected to the Ray cluster at {ray_local} already" in last and "ray.shutdown()" in last, last
    connect(ray_local)  # the cluster it is connected to: fine
    connect("127.0.0.1:" + ray_local.rpartition(":")[2])  # the same, by another of its host's names


def test_a_resume_may_lengthen_the_run(files: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "longer"
    shutil.copytree(files["run"], run)
    assert main(["train", "--resume", str(run), "--steps", "6", "--lr", "0.001"]) == 0  # an equal flag is fine
    assert json.loads((run / "config.json").read_text())["steps"] == 6
    from pipeline.rundir import RunDir

    assert RunDir(run).read_metrics().column("step").to_pylist() == [m for m in range(6) for _ in range(2)]


def test_a_run_resumes_from_another_working_directory(files: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(files["npz"].parent)
    assert main(["train", "--data", "npz:tiny.npz", "--steps", "2", "--run-dir", str(tmp_path / "r"), *TINY]) == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["data"] == f"npz:{files['npz']}"
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", str(tmp_path / "r"), "--steps", "3"]) == 0
