"""What a checkpoint can and cannot do to the one who loads it ([Note: the checkpoint store] in
pipeline/checkpoints/store.py): its format holds tensors and plain data exactly; a crafted file never runs
code on `probe` or `--resume`, even with its hashes updated; every refusal is one line, no traceback."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import state_differences, tiny_npz

from pipeline.checkpoints import tensorfile
from pipeline.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def test_the_format_holds_a_state_exactly() -> None:
    layer = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(layer.parameters(), betas=(0.8, 0.9))
    layer(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"modules": layer.state_dict(), "optimizer": opt.state_dict(), "steps": 7, "first": 0,
             "rng": torch.get_rng_state(), "odd": {(1, 2): [None, True, -0.0, float("inf"), "s"], "$x": 1},
             "dtypes": [torch.arange(6).reshape(2, 3).to(d) for d in (torch.int64, torch.uint8, torch.bool,
                                                                       torch.bfloat16, torch.float16)],
             "empty": torch.empty(0, 4), "scalar": torch.tensor(2.5, dtype=torch.float64)}
    back = tensorfile.loads(tensorfile.dumps(state))
    assert state_differences(back, state) == []
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.9)  # a tuple stays a tuple
    assert back["odd"][(1, 2)][3] == float("inf") and list(back["odd"]) == [(1, 2), "$x"]
    with pytest.raises(TypeError, match="plain data, not function"):
        tensorfile.dumps({"f": lambda: 0})


class _RunsCode:
    """Unpickling this runs `touch <marker>`: the attack a pickle-based checkpoint format is open to."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _crafted(tree: object, tensors: list[dict], body: bytes = b"") -> bytes:
    header = json.dumps({"tree": tree, "tensors": tensors}).encode()
    return tensorfile.MAGIC + len(header).to_bytes(8, "little") + header + body


F32 = {"dtype": "float32", "shape": [256], "offset": 0, "nbytes": 1024}


@pytest.mark.parametrize(("tensors", "problem"), [
    ([F32] * 300, "is not 1024 bytes at 1024"),  # 300 views of one KB: 300 KB of memory from a 1 KB file
    ([{**F32, "dtype": ["float32"]}], "unknown dtype"),
    ([{**F32, "shape": [0, 1 << 70], "nbytes": 0}], "bad shape"),
    ([{**F32, "shape": [0, 1 << 30, 1 << 30], "nbytes": 0}], "bad shape"),  # strides that overflow
    ([{**F32, "shape": [1] * 40, "nbytes": 4}], "bad shape"),
    ([{**F32, "shape": [128], "nbytes": 512}], "bytes after the last tensor"),
])
def test_a_header_that_lies_is_refused_before_anything_is_allocated(tensors: list[dict], problem: str) -> None:
    with pytest.raises(CheckpointError, match=problem):
        tensorfile.loads(_crafted({"$tensor": 0}, tensors, bytes(1024)), "stage-0.state")


@pytest.mark.parametrize("make", ["pickle", "torch.save", "truncated", "header-lies", "bad-tree"])
def test_anything_but_the_format_is_refused(tmp_path: Path, make: str) -> None:
    marker = tmp_path / "pwned"
    good = tensorfile.dumps({"w": torch.ones(3)})
    if make == "pickle":
        data = pickle.dumps(_RunsCode(marker))
    elif make == "torch.save":
        path = tmp_path / "x.pt"
        torch.save({"w": _RunsCode(marker)}, path)
        data = path.read_bytes()
    elif make == "truncated":
        data = good[:-5]
    elif make == "header-lies":
        header = json.dumps({"tree": {"$tensor": 0}, "tensors": [
            {"dtype": "float32", "shape": [1 << 20], "offset": 0, "nbytes": 4 << 20}]}).encode()
        data = tensorfile.MAGIC + len(header).to_bytes(8, "little") + header
    else:
        header = json.dumps({"tree": {"$eval": "__import__('os')"}, "tensors": []}).encode()
        data = tensorfile.MAGIC + len(header).to_bytes(8, "little") + header
    with pytest.raises(CheckpointError, match="stage-0.state: "):
        tensorfile.loads(data, "stage-0.state")
    assert not marker.exists()


def _train(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--engine", "sequential",
                    "--data", tiny_npz(tmp_path, size=8), "--layers", "conv:4,conv:4", "--size", "8", "--clips", "4",
                    "--clip-len", "3", "--steps", "6", "--checkpoint-every", "3", "--run-dir", str(run_dir)],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    return run_dir


def _forge(path: Path, data: bytes) -> None:
    """Replace a part of a complete checkpoint, and update its size and sha256 in COMPLETE as anyone who can
    write the store could."""
    path.write_bytes(data)
    marker = path.parent / "COMPLETE"
    record = json.loads(marker.read_text())
    for entry in record["stages"]:
        if entry["file"] == path.name:
            entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    marker.write_text(json.dumps(record))


@pytest.mark.parametrize("target", ["every-part", "COMPLETE", "config.json"])
def test_a_crafted_run_directory_never_runs_code_on_probe_or_resume(tmp_path: Path, target: str) -> None:
    run_dir = _train(tmp_path)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_RunsCode(marker))
    expected = {"probe": "no complete checkpoint", "train": "none of its 3 checkpoints"}
    if target == "every-part":  # so that no older checkpoint is left to fall back on
        for part in run_dir.glob("checkpoints/step-*/stage-0.state"):
            _forge(part, payload)
    elif target == "COMPLETE":
        for marker_file in run_dir.glob("checkpoints/step-*/COMPLETE"):
            marker_file.write_bytes(payload)
    else:
        (run_dir / "config.json").write_bytes(payload)
        expected = {"probe": "config.json: not readable JSON", "train": "config.json: not readable JSON"}
    for command in (["probe", "--run-dir", str(run_dir)], ["train", "--resume", str(run_dir)]):
        out = subprocess.run([sys.executable, "-m", "pipeline.cli", *command], check=False, cwd=ROOT,
                             capture_output=True,
                             text=True, timeout=120)
        assert not marker.exists(), "loading a checkpoint ran code from it"
        assert out.returncode != 0, out.stdout
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith(f"lamina {command[0]}: error:") and expected[command[0]] in last, out.stderr
        assert "Traceback" not in out.stderr


def test_a_part_with_updated_hashes_is_refused_and_an_older_checkpoint_used(tmp_path: Path) -> None:
    run_dir = _train(tmp_path)
    marker = tmp_path / "pwned"
    _forge(run_dir / "checkpoints" / "step-000006" / "stage-0.state", pickle.dumps(_RunsCode(marker)))
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "probe", "--run-dir", str(run_dir)], check=False,
                         cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and not marker.exists()
    assert "not a lamina state file (a pickle: lamina never unpickles)" in out.stderr
    assert "after 3 micro-batches" in out.stdout  # the newest checkpoint that loads
