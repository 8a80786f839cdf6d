"""docs/protocol.md names what the code defines, and only that: its tables of exchanges, queues,
bindings, headers, statuses, error codes and rule effects are read back and compared with the
code's own (the topology as ``declare_topology`` declares it, ``worker.headers``, the enums),
every broker name or ``x-`` header it mentions anywhere exists, and every "docs/protocol.md §n"
cited in the repository is a section it has."""

from __future__ import annotations

import asyncio
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import aio_pika
from aio_pika.abc import AbstractChannel
from aiormq.abc import FieldTable

from arbiter.schemas import ErrorCode, OutcomeStatus, RuleEffect
from arbiter.worker.headers import CONTRACT_HEADERS
from arbiter.worker.settings import Settings
from arbiter.worker.topology import declare_topology

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "protocol.md"
# The defaults, never the environment: the document states the default names.
DEFAULTS = Settings.model_construct()

_HEADING = re.compile(r"^#{2,3} (\d+(?:\.\d+)?)\.? ")
# "docs/protocol.md §3.4", or as a Markdown link: "[docs/protocol.md](protocol.md) §3.4".
_CITATION = re.compile(r"docs/protocol\.md(?:\]\([^)]*\))? §(\d+(?:\.\d+)?)")


# --- what the document says ---------------------------------------------------------------


def sections(text: str) -> dict[str, list[str]]:
    """Each numbered section ("1", "1.1") with its lines up to the next heading; a ``#`` inside
    a fenced code block is no heading."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        heading = None if fenced else _HEADING.match(line)
        if heading is not None:
            current = found.setdefault(heading.group(1), [])
        elif not fenced and line.startswith("#"):
            current = None
        elif current is not None:
            current.append(line)
    return found


def table(number: str) -> list[list[str]]:
    """The body rows of the one table in section ``number``, as stripped cells."""
    lines = sections(DOC.read_text(encoding="utf-8"))[number]
    rows = [line for line in lines if line.startswith("|")]
    assert len(rows) >= 3, f"§{number} has no table"
    assert set(rows[1]) <= set("|-: "), f"§{number}: the table's second row is no separator"
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def first_name(cell: str) -> str:
    """The first backticked token of a cell, or "" when it has none."""
    names = ticked(cell)
    return names[0] if names else ""


def first_column(number: str) -> list[str]:
    return [first_name(row[0]) for row in table(number)]


# --- what the code defines ----------------------------------------------------------------


@dataclass(frozen=True)
class _Exchange:
    name: str


@dataclass
class _Queue:
    name: str
    bindings: set[tuple[str, str, str]]

    async def bind(self, exchange: _Exchange, routing_key: str) -> None:
        self.bindings.add((exchange.name, self.name, routing_key))


@dataclass
class RecordingChannel:
    """Stands in for an aio-pika channel and records what ``declare_topology`` declares."""

    exchanges: dict[str, str] = field(default_factory=dict)
    queues: dict[str, FieldTable] = field(default_factory=dict)
    bindings: set[tuple[str, str, str]] = field(default_factory=set)

    async def declare_exchange(
        self, name: str, type: aio_pika.ExchangeType, *, durable: bool
    ) -> _Exchange:
        assert durable, name
        self.exchanges[name] = type.value
        return _Exchange(name)

    async def declare_queue(self, name: str, *, durable: bool, arguments: FieldTable) -> _Queue:
        assert durable, name
        self.queues[name] = arguments
        return _Queue(name, self.bindings)


@functools.cache
def declared() -> RecordingChannel:
    channel = RecordingChannel()
    asyncio.run(declare_topology(cast(AbstractChannel, channel), DEFAULTS))
    return channel


def setting_defaults(suffix: str) -> set[str]:
    return {
        str(info.default) for name, info in Settings.model_fields.items() if name.endswith(suffix)
    }


def queue_arguments() -> set[str]:
    return {str(key) for arguments in declared().queues.values() for key in arguments}


# --- the specification --------------------------------------------------------------------


def test_the_topology_the_code_declares_is_named_by_the_settings() -> None:
    """The recording stands for the real thing: it saw every exchange and queue setting."""
    assert set(declared().exchanges) == setting_defaults("_exchange")
    assert set(declared().queues) == setting_defaults("_queue")


def test_the_exchanges_table_gives_every_exchange_with_its_type() -> None:
    rows = table("1.1")
    documented = {first_name(row[0]): first_name(row[2]) for row in rows}
    assert documented == declared().exchanges
    assert len(rows) == len(documented), "an exchange is listed twice"


def test_the_queues_table_gives_every_queue_with_its_arguments() -> None:
    documented = {
        first_name(row[0]): dict(re.findall(r"`(x-[a-z0-9-]+): ([^`]+)`", row[2]))
        for row in table("1.2")
    }
    assert documented == {
        name: {str(key): str(value) for key, value in arguments.items()}
        for name, arguments in declared().queues.items()
    }


def test_each_topology_name_is_the_default_of_the_setting_beside_it() -> None:
    for number in ("1.1", "1.2"):
        for row in table(number):
            setting = first_name(row[1]).removeprefix("ARBITER_").lower()
            assert Settings.model_fields[setting].default == first_name(row[0]), row


def test_the_bindings_table_is_what_the_topology_binds() -> None:
    documented = {
        (first_name(row[0]), first_name(row[1]), first_name(row[2])) for row in table("1.3")
    }
    assert documented == declared().bindings


def test_the_headers_table_names_exactly_the_contract_headers() -> None:
    assert set(first_column("8.2")) == CONTRACT_HEADERS


def test_the_statuses_table_names_exactly_the_outcome_statuses() -> None:
    assert set(first_column("3.3")) == {status.value for status in OutcomeStatus}


def test_the_error_codes_table_names_exactly_the_error_codes() -> None:
    assert set(first_column("3.4")) == {code.value for code in ErrorCode}


def test_the_rule_effects_table_names_exactly_the_rule_effects() -> None:
    assert set(first_column("3.5")) == {effect.value for effect in RuleEffect}


def test_every_exchange_or_queue_the_document_mentions_exists() -> None:
    """Prose too: a misspelt or retired name anywhere in the document fails here."""
    mentioned = set(re.findall(r"`(arbiter\.[a-z0-9.-]+)`", DOC.read_text(encoding="utf-8")))
    assert mentioned - setting_defaults("_exchange") - setting_defaults("_queue") == set()


def test_every_x_header_or_queue_argument_the_document_mentions_exists() -> None:
    mentioned = set(re.findall(r"`(x-[a-z0-9-]+)(?:`|: )", DOC.read_text(encoding="utf-8")))
    assert mentioned - CONTRACT_HEADERS - queue_arguments() == set()


def test_every_cited_section_exists() -> None:
    """Code, tests and documents cite "docs/protocol.md §n"; the document's own "§n" too."""
    numbers = set(sections(DOC.read_text(encoding="utf-8")))
    cited: dict[str, set[str]] = {}
    for path in citing_files():
        for number in _CITATION.findall(path.read_text(encoding="utf-8")):
            cited.setdefault(number, set()).add(str(path.relative_to(ROOT)))
    for number in re.findall(r"§(\d+(?:\.\d+)?)", DOC.read_text(encoding="utf-8")):
        cited.setdefault(number, set()).add("docs/protocol.md")
    assert cited, "nothing cites the protocol: the search is broken"
    assert {number: where for number, where in cited.items() if number not in numbers} == {}


def citing_files() -> list[Path]:
    """The repository's Python and Markdown files, without tool caches and vendored trees."""
    skipped = {".venv", ".git", "node_modules", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
    found: list[Path] = []
    for directory, subdirectories, files in os.walk(ROOT):
        subdirectories[:] = [name for name in subdirectories if name not in skipped]
        found += [Path(directory, name) for name in files if name.endswith((".py", ".md"))]
    return found
