"""The README's measured numbers come from committed result files, so they cannot drift from them.

A result file is `.results/NAME.md`; its first line is `<!-- command: ... -->`, the command that wrote it
(the README names that command too). The README quotes result files inside regions

    <!-- results: .results/a.md [.results/b.md ...] -->
    ... tables and prose ...
    <!-- /results -->

and every decimal number in a region must occur in one of its files. Outside the regions every decimal
number, in a table or in prose, must be one of the settings below (a default, a version, a threshold), not
a measurement; inside them the settings are allowed too (a table's row may be named by its tolerance).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
REGION = re.compile(r"<!-- results: (?P<files>[^>]*?) -->\n(?P<body>.*?)<!-- /results -->", re.DOTALL)
NUMBER = re.compile(r"(?<![\d.])\d+\.\d+(?![\d.])")
# Decimal numbers that are settings, versions or thresholds, not measurements.
SETTINGS = {
    "3.10", "3.11", "2.60",  # Python and Ray versions
    "0.1", "0.3", "0.5",  # tolerances, the probe's fraction, the NCE temperature
    "0.35",  # the collapse alarm's threshold (pipeline/telemetry/collapse.py)
    "0.95",  # the efficiency target
    "0.001",  # the default learning rate, in the flag table
    "3.00", "9.00",  # seconds in a quoted error message (a truncated video)
}


def _prose(text: str) -> str:
    """The README without its code blocks and its results regions."""
    return REGION.sub("", re.sub(r"```.*?```", "", text, flags=re.DOTALL))


def _regions() -> list[tuple[list[str], str]]:
    return [(m["files"].split(), m["body"]) for m in REGION.finditer(README)]


def test_the_readme_quotes_result_files() -> None:
    assert len(_regions()) >= 3, "README.md lost its results regions"


def _missing(files: list[str], body: str) -> list[str]:
    """The decimal numbers of `body` (code blocks aside) that none of `files` holds."""
    text = ""
    for name in files:
        path = ROOT / name
        assert path.is_file() and path.parent.name == ".results", name
        text += path.read_text()
    held = set(NUMBER.findall(text))
    return [n for n in NUMBER.findall(re.sub(r"```.*?```", "", body, flags=re.DOTALL))
            if n not in held and n not in SETTINGS]


@pytest.mark.parametrize("files,body", _regions(), ids=lambda v: v[0] if isinstance(v, list) else "")
def test_every_number_in_a_region_is_in_its_result_files(files: list[str], body: str) -> None:
    assert not _missing(files, body), f"numbers in README.md that {files} do not hold: {_missing(files, body)}"


@pytest.mark.parametrize("path", sorted((ROOT / ".results").glob("*.md")), ids=lambda p: p.name)
def test_every_result_file_names_the_commands_that_wrote_it_and_the_readme_names_them_too(path: Path) -> None:
    """Its first lines are `<!-- command: ... -->`, one a command (a result put together from several runs
    names each), and the README shows every one of them."""
    lines = path.read_text().splitlines()
    commands = [m[1] for line in lines if (m := re.fullmatch(r"<!-- command: (.+) -->", line))]
    assert commands and lines[0] == f"<!-- command: {commands[0]} -->", \
        f"{path.name}: the first line must be <!-- command: ... --> (got {lines[0]!r})"
    readme = " ".join(README.replace("\\\n", " ").split())
    for command in commands:
        assert command.startswith(("lamina ", "python -m pipeline.")), command  # lamina's own commands only
        assert " ".join(command.split()) in readme, command


def test_no_measured_number_outside_a_region() -> None:
    prose = _prose(README)
    rows = [line for line in prose.splitlines()
            if line.startswith("|") and set(NUMBER.findall(line)) - SETTINGS]
    assert not rows, f"table rows with numbers outside a results region: {rows}"
    loose = sorted({n for n in NUMBER.findall(prose) if n not in SETTINGS})
    assert not loose, f"numbers in README.md's prose that no result file holds: {loose}"


def test_a_number_that_drifted_is_caught() -> None:
    """The check is sharp: a quoted number with one digit changed is reported."""
    files, body = next((f, b) for f, b in _regions() if NUMBER.search(b))
    held = set(NUMBER.findall("".join((ROOT / name).read_text() for name in files)))
    number = next(n for n in NUMBER.findall(body))
    drifted = next(d for k in range(1, 10) if (d := number[:-1] + str((int(number[-1]) + k) % 10)) not in held)
    assert _missing(files, body.replace(number, drifted, 1)) == [drifted]


def test_the_main_job_is_as_long_as_the_run_its_numbers_come_from() -> None:
    main_job = re.search(r"pip install -e \. && lamina train --steps (\d+)\n", README)
    assert main_job, "README.md's command 1 must end in lamina train --steps N"
    measured = (ROOT / ".results" / "synthetic-main-job.md").read_text().splitlines()[0]
    assert f"lamina study seeds --steps {main_job[1]} " in measured, measured
