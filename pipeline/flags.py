"""Flags from config fields: argparse arguments, and the README's flag table, from one description.

Every `lamina train` flag is a TrainConfig field written with `pipeline.config.flag` (type, default, help).
`add_flags` turns fields into argparse arguments (other commands take a subset, with their own defaults),
`config_from_args` turns parsed arguments back into a config, and `flag_table` writes the markdown table the
README carries between `<!-- flags -->` markers; tests/test_flags.py fails when the two differ.

    python -m pipeline.flags        prints the table, to paste into the README
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable
from typing import Any

from pipeline.config import TrainConfig

SECTIONS = {"": "training", "ray": "the Ray pipeline", "checkpoints": "checkpoints"}
_BASIC = {"int": int, "float": float, "str": str, "str | None": str}


def train_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainConfig) if f.init]


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def shown(f: dataclasses.Field, default: Any = dataclasses.MISSING) -> str:
    """How a field's default reads: the field's own words where the value would not say it."""
    value = f.default if default is dataclasses.MISSING else default
    if default is dataclasses.MISSING and f.metadata.get("shown"):
        return str(f.metadata["shown"])
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_flags(parser: argparse.ArgumentParser, names: Iterable[str] | None = None,
              defaults: dict[str, Any] | None = None) -> None:
    """Add the flags of these TrainConfig fields (all by default); `defaults` overrides some defaults.
    An argument left out stays out of the namespace (argparse.SUPPRESS), so the config's own default holds."""
    defaults = defaults or {}
    wanted = set(names) if names is not None else None
    for f in train_fields():
        if wanted is not None and f.name not in wanted:
            continue
        meta = f.metadata
        parse = meta.get("parse") or _BASIC[str(f.type)]
        default = defaults.get(f.name, dataclasses.MISSING)
        parser.add_argument(option(f.name), dest=f.name, type=arg_type(parse, option(f.name)),
                            choices=meta.get("choices"), metavar=meta.get("metavar"),
                            default=argparse.SUPPRESS if default is dataclasses.MISSING else default,
                            help=f"{meta['help']} (default: {shown(f, default)})".replace("%", "%%"))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the parsed flags describe (fields not given keep their defaults)."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in train_fields() if hasattr(args, f.name)})


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given on the command line, as parsed (flags not given are left out)."""
    return {f.name: getattr(args, f.name) for f in train_fields() if hasattr(args, f.name)}


def flag_table() -> str:
    """The README's flag table, one section per group of flags."""
    lines = ["| flag | meaning | default |", "|---|---|---|"]
    for key, title in SECTIONS.items():
        fields = [f for f in train_fields() if f.metadata.get("section", "") == key]
        if key:
            lines.append(f"| **{title}** | | |")
        for f in fields:
            lines.append(f"| `{option(f.name)}` | {f.metadata['help']} | {shown(f)} |")
    return "\n".join(lines)


def arg_type(parse: Any, flag: str) -> Any:
    """`parse` with errors that argparse prints as `argument --flag: ...` rather than `invalid value`."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e) if str(e).startswith("expected") else
                                             f"expected {getattr(parse, '__name__', 'a value')} (got {text!r})")
    convert.__name__ = getattr(parse, "__name__", flag)
    return convert


if __name__ == "__main__":
    print(flag_table())
