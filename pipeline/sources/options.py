"""Options of a data spec, `KIND:[PATH,]key=value,key=value`: parsed and range-checked once, so that every
source's options read (and fail) the same way. Numbers are range-checked; words are one of a few choices."""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.errors import DataError

OptionSpec = Mapping[str, tuple[type, float, float]]  # key -> (type, min, max)
Choices = Mapping[str, tuple[str, ...]]  # key -> the words it may be


def parse_options(options: str, spec: OptionSpec, source: str,
                  choices: Choices | None = None) -> dict[str, int | float | str]:
    """Parse `key=value,key=value` against spec (numbers) and choices (words); a bad item raises DataError
    naming key and value."""
    choices = choices or {}
    known = ", ".join([*spec, *choices])
    parsed: dict[str, int | float | str] = {}
    for item in options.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep:
            raise DataError(f"{source}: option {item!r} must be key=value (known keys: {known})")
        if key not in spec and key not in choices:
            raise DataError(f"{source}: unknown option {key}={raw} (known keys: {known})")
        if key in parsed:
            raise DataError(f"{source}: option {key} given twice (second value {raw})")
        if key in choices:
            if raw not in choices[key]:
                raise DataError(f"{source}: option {key}={raw} must be one of {', '.join(choices[key])}")
            parsed[key] = raw
            continue
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
