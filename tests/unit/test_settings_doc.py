"""The README's settings table names every setting the worker reads, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

from arbiter.worker.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def documented_settings() -> set[str]:
    """The ``ARBITER_``-less names in the first column of the table under ``## Settings``."""
    section = README.read_text().split("\n## Settings\n", 1)[1].split("\n### ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        first_column = line.split("|")[1]
        names.update(re.findall(r"`([A-Z0-9_]+)`", first_column))
    return names


def model_settings() -> set[str]:
    return {name.upper() for name in Settings.model_fields}


def test_every_setting_of_the_model_is_documented() -> None:
    """A setting added to the model without a row in the README fails here."""
    assert model_settings() - documented_settings() == set()


def test_every_documented_setting_exists() -> None:
    """A row for a setting the model no longer has (or misspells) fails here."""
    assert documented_settings() - model_settings() == set()


def test_documented_defaults_match_the_model() -> None:
    """Where a row names one setting, its default column states the model's default."""
    section = README.read_text().split("\n## Settings\n", 1)[1].split("\n### ", 1)[0]
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        names = re.findall(r"`([A-Z0-9_]+)`", cells[0]) if cells else []
        if len(names) != 1:
            continue
        default = Settings.model_fields[names[0].lower()].default
        if isinstance(default, bool) or default is None:
            continue
        shown = cells[1].strip("`")
        if isinstance(default, float) and default.is_integer():
            assert shown in (str(default), str(int(default))), (names[0], shown, default)
        else:
            assert shown == str(default), (names[0], shown, default)
