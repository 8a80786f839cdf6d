"""docs/parity.md stays true: every Arbiter test it names exists, and no row is left open."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARITY = (ROOT / "docs" / "parity.md").read_text()

# `tests/…/file.py::Class::test_name` or `tests/…/file.py::test_name`
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(?:(\w+)::)?(\w+)`")


def references() -> list[tuple[str, str | None, str]]:
    return sorted(set(REFERENCE.findall(PARITY)))


def test_the_table_names_tests() -> None:
    """The pattern below finds the table's references at all (a guard for the others)."""
    assert len(references()) > 150


@pytest.mark.parametrize(
    ("path", "cls", "name"),
    references(),
    ids=["::".join(part for part in ref if part) for ref in references()],
)
def test_each_named_test_exists(path: str, cls: str | None, name: str) -> None:
    """The file exists, defines the test, and inside the named class when one is given."""
    source = (ROOT / path).read_text()
    definition = re.search(rf"^(\s*)(?:async )?def {name}\(", source, re.MULTILINE)
    assert definition is not None, f"{path} defines no {name}"
    if cls:
        owner = re.search(rf"^class {cls}\b", source, re.MULTILINE)
        assert owner is not None, f"{path} defines no class {cls}"
        later_classes = [
            m.start()
            for m in re.finditer(r"^class \w+", source, re.MULTILINE)
            if m.start() > owner.start()
        ]
        end = later_classes[0] if later_classes else len(source)
        inside = [
            m
            for m in re.finditer(rf"^\s+(?:async )?def {name}\(", source, re.MULTILINE)
            if owner.start() < m.start() < end
        ]
        assert inside, f"{name} is not a method of {cls} in {path}"


def test_no_row_is_left_unported() -> None:
    """Every Prefect test is covered or says why it does not apply."""
    rows = [line for line in PARITY.splitlines() if line.startswith("| ") and "---" not in line]
    open_rows = [row for row in rows if "not ported" in row]
    assert open_rows == []
