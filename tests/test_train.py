"""Training runs end to end in-process: run directory, metrics, checkpoint, probe, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.config import TrainConfig, default_deltas
from pipeline.probe import build_learners, format_table, linear_probe, make_split, probe
from pipeline.rundir import RunDir
from pipeline.train import train
from workers.learner import LocalLearner

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
    run = RunDir(train(cfg, progress=False))
    assert run.config() == cfg
    metrics = run.read_metrics().to_pydict()
    layers = [0, 1] if engine == "sequential" else [1]
    assert sorted(set(metrics["layer"])) == layers
    assert len(metrics["step"]) == cfg.steps * len(layers)
    assert np.isfinite(metrics["loss"]).all()
    assert (run.path / "loss.png").stat().st_size > 1000
    ckpt = run.load_checkpoint()
    assert ckpt["step"] == cfg.steps and len(ckpt["learners"]) == (2 if engine == "sequential" else 1)


def test_probe_reports_trained_and_random_twin(tmp_path: Path, seq_npz: str) -> None:
    cfg = TrainConfig(data=f"npz:{seq_npz}", run_dir=str(tmp_path / "run"), **TINY)
    run_dir = train(cfg, progress=False)
    report = probe(run_dir, views=(0, 5))
    assert json.loads((run_dir / "probe.json").read_text()) == report
    assert [r["layer"] for r in report["layers"]] == [1, 2]
    for r in report["layers"]:
        assert set(r) == {"layer", "linear", "knn", "linear_random", "knn_random"}
        assert all(0 <= r[k] <= 1 for k in r if k != "layer")
    assert "layer" in format_table(report)
    # The random twin is exactly the network as initialised, not the trained one.
    ckpt = RunDir(run_dir).load_checkpoint()
    trained, random = build_learners(ckpt, True), build_learners(ckpt, False)
    w_trained = trained[0].blocks[0].conv.weight
    assert not torch.equal(w_trained, random[0].blocks[0].conv.weight)
    fresh = TrainConfig.from_dict(ckpt["config"]).learner_spec(tuple(ckpt["in_shape"]))
    assert torch.equal(LocalLearner(fresh, 0, 1).blocks[0].conv.weight, random[0].blocks[0].conv.weight)


def test_linear_probe_separates_separable_data() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = (x[:, 0] > 0).long()
    assert linear_probe(x[:100], y[:100], x[100:], y[100:]) > 0.95


def test_split_by_views_and_by_fraction(seq_npz: str) -> None:
    from pipeline.data import load_videos

    videos = load_videos(f"npz:{seq_npz}", 8)
    by_views = make_split(videos, (0, 5), None)
    assert by_views.train.sum() == 12 and not (by_views.train & by_views.test).any()
    by_fraction = make_split(videos, None, 0.5)
    assert by_fraction.train.all(dim=1).sum() == 3 and by_fraction.train.any(dim=1).sum() == 3
    with pytest.raises(ValueError, match="--probe-views"):
        make_split(videos, (10,), None)
    with pytest.raises(ValueError, match="--probe-fraction"):
        make_split(videos, None, 1.5)


def test_config_errors_name_the_flag() -> None:
    for kwargs, flag in [({"queue_depth": 0}, "--queue-depth"), ({"steps": 0}, "--steps"),
                         ({"deltas": (0.1,)}, "--deltas"), ({"objective": "x"}, "--objective"),
                         ({"clip_len": 1}, "--clip-len"), ({"layers": "conv:0"}, "--layers"),
                         ({"loss_grid": (2, 2)}, "--loss-grid"), ({"loss_grid": (0,)}, "--loss-grid"),
                         ({"stride": 0}, "--stride"), ({"norm": "batch"}, "--norm")]:
        with pytest.raises(ValueError, match=flag):
            TrainConfig(**kwargs)
    assert default_deltas(3) == (0.0, 0.0, 0.0)
    cfg = TrainConfig(deltas=(0.2, 0.2, 0.2))
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert TrainConfig(loss_grid=(2,)).loss_grid == (2, 2, 2)  # one value: every layer
    assert TrainConfig.from_dict({"loss_grid": 1}).loss_grid == (1, 1, 1)  # a config.json of an older run


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
    (["train", "--data", "video:x"], "--data must be"),
    (["probe", "--run-dir", "/nonexistent-run"], "no checkpoint.pt"),
])
def test_cli_reports_bad_input_clearly(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_study_tables_every_variant_with_its_own_twin_and_resumes(tmp_path: Path, seq_npz: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import study

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
