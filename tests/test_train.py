"""Training runs end to end in-process: run directory, metrics, checkpoint, probe, study, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.config import TrainConfig
from pipeline.errors import ConfigError
from pipeline.evaluation.probe import build_learners, format_table, linear_probe, load_run, make_split, probe
from pipeline.run import train
from pipeline.rundir import RunDir
from pipeline.sources import load_videos
from workers.learner import Learner

TINY = {"layers": "conv:4,conv:8", "size": 8, "clips": 4, "clip_len": 3, "steps": 6, "head": (16, 8),
        "engine": "sequential"}


@pytest.fixture()
def seq_npz(tmp_path: Path) -> str:
    """A sequence archive: 6 sequences of 10 frames, a blob drifting right, label = blob row band."""
    frames = np.zeros((6, 10, 12, 12), np.uint8)
    for s in range(6):
        for t in range(10):
            frames[s, t, 2 * (s % 3) + 1: 2 * (s % 3) + 5, t: t + 3] = 200
    path = tmp_path / "seq.npz"
    np.savez(path, frames=frames, labels=np.arange(6) % 3)
    return str(path)


@pytest.mark.parametrize("engine", ["sequential", "e2e"])
def test_train_writes_a_complete_run_directory(tmp_path: Path, seq_npz: str, engine: str) -> None:
    cfg = TrainConfig(data=f"npz:{seq_npz}", run_dir=str(tmp_path / "run"), **{**TINY, "engine": engine})
    run = RunDir(train(cfg, progress=False).path)
    assert run.config() == cfg
    metrics = run.read_metrics().to_pydict()
    layers = [0, 1] if engine == "sequential" else [1]
    assert sorted(set(metrics["layer"])) == layers
    assert len(metrics["step"]) == cfg.steps * len(layers)
    assert np.isfinite(metrics["loss"]).all()
    assert all(s <= e for s, e in zip(metrics["busy_start"], metrics["busy_end"], strict=True))
    assert (run.path / "loss.png").stat().st_size > 1000
    saved_cfg, in_shape, ckpt = load_run(run.path)
    assert (saved_cfg, in_shape) == (cfg, (1, 8, 8))
    assert ckpt.step == cfg.steps and len(ckpt.learners) == (2 if engine == "sequential" else 1)


def test_probe_reports_trained_and_random_twin(tmp_path: Path, seq_npz: str) -> None:
    cfg = TrainConfig(data=f"npz:{seq_npz}", run_dir=str(tmp_path / "run"), **TINY)
    run_dir = train(cfg, progress=False).path
    report = probe(run_dir, views=(0, 5))
    assert json.loads((run_dir / "probe.json").read_text()) == report
    assert [r["layer"] for r in report["layers"]] == [1, 2] and report["steps"] == cfg.steps
    for r in report["layers"]:
        assert set(r) == {"layer", "linear", "knn", "linear_random", "knn_random"}
        assert all(0 <= r[k] <= 1 for k in r if k != "layer")
    assert f"after {cfg.steps} micro-batches" in format_table(report)
    # The random twin is exactly the network as initialised, not the trained one.
    cfg_, in_shape, ckpt = load_run(run_dir)
    trained, random = (build_learners(cfg_, in_shape, ckpt.learners, t) for t in (True, False))
    w_trained = trained[0].blocks[0].conv.weight
    assert not torch.equal(w_trained, random[0].blocks[0].conv.weight)
    fresh = cfg.learner_spec(in_shape)
    assert torch.equal(Learner(fresh, 0, 1).blocks[0].conv.weight, random[0].blocks[0].conv.weight)


def test_linear_probe_separates_separable_data() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = (x[:, 0] > 0).long()
    assert linear_probe(x[:100], y[:100], x[100:], y[100:]) > 0.95


def test_split_by_views_and_by_fraction(seq_npz: str) -> None:
    videos = load_videos(f"npz:{seq_npz}", 8)
    by_views = make_split(videos, (0, 5), None)
    assert by_views.train.sum() == 12 and not (by_views.train & by_views.test).any()
    by_fraction = make_split(videos, None, 0.5)
    assert by_fraction.train.all(dim=1).sum() == 3 and by_fraction.train.any(dim=1).sum() == 3
    with pytest.raises(ConfigError, match="--probe-views"):
        make_split(videos, (10,), None)
    with pytest.raises(ConfigError, match="nothing is left to test on"):
        make_split(videos, tuple(range(10)), None)
    with pytest.raises(ConfigError, match="--probe-fraction"):
        make_split(videos, None, 1.5)


def test_a_split_that_labels_none_of_the_tested_classes_is_refused(tmp_path: Path) -> None:
    """One sequence per label split by sequences: the probe would score 0 % whatever it learned."""
    path = tmp_path / "one-per-label.npz"
    np.savez(path, frames=np.zeros((4, 6, 8, 8), np.uint8), labels=np.arange(4))
    videos = load_videos(f"npz:{path}", 8)
    with pytest.raises(ConfigError, match="labels none of the classes it tests on.*--probe-views"):
        make_split(videos, None, 0.5)
    assert make_split(videos, (0, 3), None).test.sum() == 16  # views label every sequence: fine


def test_config_errors_name_the_flag() -> None:
    for kwargs, flag in [({"queue_depth": 0}, "--queue-depth"), ({"steps": 0}, "--steps"),
                         ({"deltas": (0.1,)}, "--deltas"), ({"objective": "x"}, "--objective"),
                         ({"clip_len": 1}, "--clip-len"), ({"layers": "conv:0"}, "--layers"),
                         ({"loss_grid": (2, 2)}, "--loss-grid"), ({"loss_grid": (0,)}, "--loss-grid"),
                         ({"stride": 0}, "--stride"), ({"norm": "batch"}, "--norm"),
                         ({"lr": float("inf")}, "--lr"), ({"deltas": (0, float("nan"), 0)}, "--deltas")]:
        with pytest.raises(ConfigError, match=flag):
            TrainConfig(**kwargs)
    cfg = TrainConfig(deltas=(0.2, 0.2, 0.2))
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert TrainConfig(loss_grid=(2,)).loss_grid == (2, 2, 2)  # one value: every layer
    assert TrainConfig.from_dict({"loss_grid": 1}).loss_grid == (1, 1, 1)  # a config.json of an older run
    for bad, message in [({"steps": "abc"}, "'steps' must be int"), ([1], "expected a JSON object"),
                         ({"head": [1]}, "--head"), ({"nope": 1}, "unknown settings")]:
        with pytest.raises(ConfigError, match=message):
            TrainConfig.from_dict(bad, "run/config.json")


def test_cli_train_and_probe(tmp_path: Path, seq_npz: str, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "cli"
    argv = ["train", "--data", f"npz:{seq_npz}", "--layers", "conv:4", "--size", "8", "--clips", "3",
            "--clip-len", "2", "--steps", "3", "--run-dir", str(run_dir), "--engine", "sequential"]
    assert main(argv) == 0
    assert main(["probe", "--run-dir", str(run_dir), "--probe-fraction", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "random" in out and (run_dir / "probe.json").is_file()


@pytest.mark.parametrize("argv, message", [
    (["train", "--queue-depth", "0"], "--queue-depth must be >= 1 (got 0)"),
    (["train", "--data", "npz:/nonexistent.npz", "--engine", "sequential"], "/nonexistent.npz: no such file"),
    (["train", "--data", "webcam:x"], "--data must be"),
    (["train", "--layers", "conv:4," * 6 + "conv:4", "--engine", "sequential"], "too many conv blocks for 32x32"),
    (["train", "--resume", "/nonexistent-run", "--steps", "5"], "not a lamina run directory"),
    (["probe", "--run-dir", "/nonexistent-run"], "not a lamina run directory"),
])
def test_cli_reports_bad_input_in_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv, code", [(["--lr", "x"], 2), (["--deltas", "a,0"], 2), (["--head", "3"], 2)])
def test_cli_flag_types_name_the_flag(argv: list[str], code: int, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["train", *argv])
    assert exit_.value.code == code
    assert f"argument {argv[0]}: expected" in capsys.readouterr().err


def test_cli_runtime_failures_are_one_line_and_debug_shows_the_traceback(
        tmp_path: Path, seq_npz: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--data", f"npz:{seq_npz}", "--layers", "conv:4", "--size", "8", "--clips", "3",
            "--clip-len", "2", "--steps", "3", "--engine", "sequential", "--lr", "1e30"]
    assert main([*argv, "--run-dir", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("lamina train: error: stage 0 failed on micro-batch")
    assert "Traceback" not in err
    assert main(["--debug", *argv, "--run-dir", str(tmp_path / "b")]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_lamina_alone_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    out = capsys.readouterr().out
    assert all(command in out for command in ("train", "probe", "report", "study", "control", "bench"))


def test_study_tables_every_variant_with_its_own_twin_and_resumes(tmp_path: Path, seq_npz: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.evaluation import study

    variants = [("a", {"loss_grid": (1,)}), ("grid-2", {"loss_grid": (2,)}), ("deep", {"layers": "conv:4,conv:8,conv:8"}),
                ("channel", {"norm": "channel"})]
    monkeypatch.setitem(study.STUDIES, "tiny", variants)
    base = {**TINY, "data": f"npz:{seq_npz}", "steps": 3}
    results = study.run_study("tiny", tmp_path, base, views=(0, 5), fraction=None)
    assert [r["label"] for r in results] == ["a", "grid-2", "deep", "channel"]
    assert results[1]["config"]["loss_grid"] == (2, 2)
    table = (tmp_path / "study.md").read_text()
    # Three networks, so three random-init rows; the deep one has a third column the others leave empty.
    assert "| random init (conv:4,conv:8) |" in table and "| random init (conv:4,conv:8,conv:8) |" in table
    assert "| random init (conv:4,conv:8, norm channel) |" in table
    assert table.count("\n| ") == 1 + 3 + 4  # header, the twins, the variants
    assert (tmp_path / "study.png").stat().st_size > 0
    stamp = (tmp_path / "a" / "probe.json").stat().st_mtime_ns
    study.run_study("tiny", tmp_path, base, views=(0, 5), fraction=None)  # resumes: nothing is retrained
    assert (tmp_path / "a" / "probe.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="unknown variants"):
        study.run_study("tiny", tmp_path, base, views=(0, 5), fraction=None, only=["nope"])


def test_a_study_over_seeds_gives_each_seed_its_own_twin_and_names_its_command(tmp_path: Path, seq_npz: str,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.evaluation import study

    monkeypatch.setitem(study.STUDIES, "seeds", [("seed-0", {"seed": 0}), ("seed-1", {"seed": 1})])
    base = {**TINY, "data": f"npz:{seq_npz}", "steps": 3}
    results = study.run_study("seeds", tmp_path, base, views=(0, 5), fraction=None, command="lamina study seeds")
    lines = (tmp_path / "study.md").read_text().splitlines()
    assert lines[0] == "<!-- command: lamina study seeds -->"
    # The same network at two initialisations: two random-init rows, each with its own seed's numbers.
    twins = {line.split(" | ")[0]: line for line in lines if line.startswith("| random init")}
    assert set(twins) == {"| random init (conv:4,conv:8, seed 0)", "| random init (conv:4,conv:8, seed 1)"}
    for r in results:
        cells = [f"{100 * x['linear_random']:.1f}" for x in r["probe"]["layers"]]
        assert twins[f"| random init (conv:4,conv:8, seed {r['config']['seed']})"].split(" | ")[1:] == \
            [*cells[:-1], cells[-1] + " |"]
