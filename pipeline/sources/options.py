"""Options of a generated source's data spec, `KIND:key=value,key=value`: parsed and range-checked once,
so that every source's options read (and fail) the same way."""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.errors import DataError

OptionSpec = Mapping[str, tuple[type, float, float]]  # key -> (type, min, max)


def parse_options(options: str, spec: OptionSpec, source: str) -> dict[str, int | float]:
    """Parse `key=value,key=value` against spec; a bad item raises DataError naming key and value."""
    parsed: dict[str, int | float] = {}
    for item in options.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep:
            raise DataError(f"{source}: option {item!r} must be key=value (known keys: {', '.join(spec)})")
        if key not in spec:
            raise DataError(f"{source}: unknown option {key}={raw} (known keys: {', '.join(spec)})")
        if key in parsed:
            raise DataError(f"{source}: option {key} given twice (second value {raw})")
        kind, lo, hi = spec[key]
        try:
            value = kind(raw)
        except ValueError:
            raise DataError(f"{source}: option {key}={raw} must be {'an integer' if kind is int else 'a number'}"
                             ) from None
        if not lo <= value <= hi:
            raise DataError(f"{source}: option {key}={raw} must be between {lo:g} and {hi:g}")
        parsed[key] = value
    return parsed
