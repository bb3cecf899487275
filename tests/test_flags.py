"""Every training flag is described once (pipeline/config.py): argparse and the README table come from it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from pipeline.cli import parser
from pipeline.config import TrainConfig
from pipeline.flags import config_from_args, flag_table, option, train_fields

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_flag_table_is_the_one_the_config_writes() -> None:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- flags: python -m pipeline\.flags -->\n(.*?)\n<!-- /flags -->", readme, re.DOTALL)
    assert found, "README.md lost its flag table markers"
    assert found[1] == flag_table(), "README.md's flag table differs: regenerate it with python -m pipeline.flags"


def test_every_field_is_a_flag_with_help_and_its_default() -> None:
    train = parser().parse_args(["train"])
    assert config_from_args(train) == TrainConfig()  # no flag given: the config's own defaults
    text = parser()._subparsers._group_actions[0].choices["train"].format_help()  # type: ignore[union-attr]
    for f in train_fields():
        assert option(f.name) in text and f.metadata["help"], f.name
    table = flag_table()
    assert all(f"| `{option(f.name)}` |" in table for f in dataclasses.fields(TrainConfig) if f.init)


@pytest.mark.parametrize(("argv", "field", "value"), [
    (["--deltas", "0.5,0.3,0.1"], "deltas", (0.5, 0.3, 0.1)), (["--head", "none"], "head", None),
    (["--head", "32,8"], "head", (32, 8)), (["--loss-grid", "4"], "loss_grid", (4, 4, 4)),
    (["--gpus-per-stage", "0.5"], "gpus_per_stage", 0.5), (["--gpus-per-stage", "auto"], "gpus_per_stage", None),
    (["--address", "10.0.0.1:6379"], "address", "10.0.0.1:6379"), (["--cpus-per-stage", "2"], "cpus_per_stage", 2.0),
])
def test_flags_parse_to_the_config(argv: list[str], field: str, value: object) -> None:
    assert getattr(config_from_args(parser().parse_args(["train", *argv])), field) == value


def test_study_takes_the_same_flags_with_its_own_defaults() -> None:
    args = parser().parse_args(["study", "settings", "--out", "x", "--deltas", "0.1,0.1,0.1"])
    cfg = config_from_args(args)
    assert (cfg.steps, cfg.engine, cfg.deltas) == (1500, "sequential", (0.1, 0.1, 0.1))


def test_compute_holds_no_command_line_wording() -> None:
    for path in (ROOT / "workers").glob("*.py"):
        assert not re.search(r"--[a-z]", path.read_text()), f"{path.name} names a command-line flag"
