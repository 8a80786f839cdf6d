"""Wire types are read strictly, so another language's executor need not know Python's coercions.

A boolean is not an integer, 1.0 and "1" are not 1, an enum is one of its strings, and a
timestamp is an RFC 3339 string. The fields are found by walking the wire models' annotations
from ``Proposal`` down, so a field added later is covered without editing this module.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import re
import types
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pytest
from pydantic import BaseModel

from arbiter.schemas import ErrorCode, FlowRunSpec, Proposal, TaskRunSpec
from arbiter.worker.decode import Decoded, Invalid, decode_proposal

Kind = Literal["integer", "number", "boolean", "enum", "timestamp"]

# How Proposal reads `run`: by `run_kind`, not by shape.
RUN_KIND_OF_SPEC: dict[type[BaseModel], str] = {FlowRunSpec: "flow_run", TaskRunSpec: "task_run"}
TIMESTAMP = "2026-01-01T10:00:00Z"


@dataclass(frozen=True)
class WireField:
    """A field of one of the five strict kinds, where it sits and a valid value for it."""

    owner: type[BaseModel]
    path: tuple[str, ...]
    kind: Kind
    example: object
    run_kind: str
    in_list: bool  # the field takes a list of this kind (as retry_delay does, besides a number)

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


def alternatives(annotation: object) -> list[object]:
    """A union's members without None, Annotated metadata stripped."""
    if get_origin(annotation) is Annotated:
        return alternatives(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        return [
            m for arg in get_args(annotation) if arg is not type(None) for m in alternatives(arg)
        ]
    return [annotation]


def scalar_kind(annotation: object) -> tuple[Kind, object] | None:
    """The strict kind of a scalar annotation and a valid value, or None (str, UUID, JSON...)."""
    if annotation is bool:
        return "boolean", True
    if annotation is int:
        return "integer", 3
    if annotation is float:
        return "number", 2.5
    if annotation is dt.datetime:
        return "timestamp", TIMESTAMP
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "enum", next(iter(annotation)).value
    if get_origin(annotation) is Literal:
        value = get_args(annotation)[0]
        return ("integer", value) if type(value) is int else ("enum", value)
    return None


def combined(kinds: list[tuple[Kind, object]]) -> tuple[Kind, object] | None:
    """One kind for a union's scalar members: int | float is a number."""
    names = {kind for kind, _ in kinds}
    if names == {"integer", "number"}:
        return "number", 2.5
    assert len(names) <= 1, f"a union of unrelated kinds needs its own cases: {names}"
    return kinds[0] if kinds else None


def walk(
    model: type[BaseModel],
    path: tuple[str, ...] = (),
    run_kind: str = "task_run",
    visited: set[type[BaseModel]] | None = None,
) -> Iterator[WireField]:
    """Every strict-kind field under ``model``, through nested models, lists and unions."""
    if visited is not None:
        visited.add(model)
    for name, info in model.model_fields.items():
        here = (*path, name)
        scalars: list[tuple[Kind, object]] = []
        in_lists: list[tuple[Kind, object]] = []
        for member in alternatives(info.annotation):
            if isinstance(member, type) and issubclass(member, BaseModel):
                yield from walk(member, here, RUN_KIND_OF_SPEC.get(member, run_kind), visited)
            elif get_origin(member) in (list, set):
                in_lists.extend(filter(None, map(scalar_kind, alternatives(get_args(member)[0]))))
            elif (kind := scalar_kind(member)) is not None:
                scalars.append(kind)
        for found, in_list in ((combined(scalars), False), (combined(in_lists), True)):
            if found is not None:
                yield WireField(model, here, found[0], found[1], run_kind, in_list)


FIELDS = list(walk(Proposal))

WRONG: dict[Kind, list[object]] = {
    "integer": [True, 1.0, "1"],
    "number": [True, "1", "2.5"],
    "boolean": [1, "true"],
    "enum": [1, "not-a-member"],
    "timestamp": [1767261600, True, "1767261600", "2026-01-01", "2026-01-01T10:00"],
}


def valid_values(field: WireField) -> list[object]:
    extra: dict[Kind, list[object]] = {
        "number": [3],  # a number field takes an integer literal
        "enum": [],
        "integer": [],
        "boolean": [False],
        "timestamp": ["2026-01-01T10:00:00.5+05:30", "2026-01-01 10:00:00"],
    }
    return [field.example, *extra[field.kind]]


def proposal_with(field: WireField, value: object) -> bytes:
    """A valid proposal with ``value`` (in a list where the field takes one) at the field."""
    document: dict[str, Any] = {
        "schema_version": 1,
        "proposal_id": str(uuid.uuid4()),
        "run_kind": field.run_kind,
        "run_id": str(uuid.uuid4()),
        "state": {"type": "RUNNING"},
    }
    node = document
    for key in field.path[:-1]:
        node = node.setdefault(key, {})
    if field.path[-2:-1] == ("deployment",):
        node["id"] = str(uuid.uuid4())  # a deployment is named by its id
        if field.path[-1] == "grace_period_seconds" and value == 3:
            value = 600  # the right type, within the 60 to 86400 s allowed
    node[field.path[-1]] = [value] if field.in_list else value
    return json.dumps(document).encode()


def decode(raw: bytes) -> Decoded | Invalid:
    return decode_proposal(raw, content_type="application/json", message_id=None, max_bytes=65536)


def case_id(field: WireField, value: object) -> str:
    shown = json.dumps([value] if field.in_list else value)
    return f"{field.dotted}({field.run_kind})={shown}"


WRONG_CASES = [
    pytest.param(field, value, id=case_id(field, value))
    for field in FIELDS
    for value in WRONG[field.kind]
]
VALID_CASES = [
    pytest.param(field, value, id=case_id(field, value))
    for field in FIELDS
    for value in valid_values(field)
]


def test_the_walk_reaches_every_wire_model_and_every_kind() -> None:
    """A guard on the walk itself: nested models are entered and all five kinds are found."""
    visited: set[type[BaseModel]] = set()
    list(walk(Proposal, visited=visited))
    assert {model.__name__ for model in visited} == {
        "Proposal",
        "ProposedState",
        "StateDetails",
        "FlowRunSpec",
        "FlowRunPolicy",
        "DeploymentSpec",
        "TaskRunSpec",
        "TaskRunPolicy",
    }
    assert {field.kind for field in FIELDS} == {"integer", "number", "boolean", "enum", "timestamp"}


@pytest.mark.parametrize(("field", "value"), WRONG_CASES)
def test_a_value_of_the_wrong_json_type_is_refused_naming_the_field(
    field: WireField, value: object
) -> None:
    """true, 1.0 or "1" for an integer, 1 or "true" for a boolean, a number or a non-RFC 3339
    string for a timestamp: a schema violation that names the field."""
    decoded = decode(proposal_with(field, value))
    assert isinstance(decoded, Invalid)
    assert decoded.code is ErrorCode.SCHEMA_VIOLATION
    assert field.dotted in decoded.message


@pytest.mark.parametrize(("field", "value"), VALID_CASES)
def test_a_value_of_the_right_json_type_is_accepted(field: WireField, value: object) -> None:
    """Strictness refuses only wrong types: 3 is a valid float, a naive time means UTC."""
    decoded = decode(proposal_with(field, value))
    assert isinstance(decoded, Decoded), decoded


# --- the JSON Schema says the same -----------------------------------------------------------

JSON_TYPES: dict[Kind, set[str]] = {
    "integer": {"integer"},
    "number": {"integer", "number"},
    "boolean": {"boolean"},
    "enum": {"string"},
    "timestamp": {"string"},
}


def schema_alternatives(node: dict[str, Any], defs: dict[str, Any]) -> list[dict[str, Any]]:
    """A JSON Schema node's alternatives, references followed and null dropped."""
    if "$ref" in node:
        return schema_alternatives(defs[node["$ref"].rsplit("/", 1)[1]], defs)
    if "anyOf" in node:
        return [alt for n in node["anyOf"] for alt in schema_alternatives(n, defs)]
    return [] if node.get("type") == "null" else [node]


@pytest.mark.parametrize("field", FIELDS, ids=lambda field: f"{field.dotted}({field.run_kind})")
def test_the_json_schema_gives_each_field_its_json_type(field: WireField) -> None:
    """Executors validate against the committed schema: it must allow the same JSON types."""
    schema = field.owner.model_json_schema(mode="validation")
    defs = schema.get("$defs", {})
    nodes = schema_alternatives(schema["properties"][field.path[-1]], defs)
    if field.in_list:
        arrays = [node for node in nodes if node.get("type") == "array"]
        nodes = [alt for array in arrays for alt in schema_alternatives(array["items"], defs)]
    else:
        nodes = [node for node in nodes if node.get("type") != "array"]
    assert nodes
    assert {node["type"] for node in nodes} <= JSON_TYPES[field.kind]
    for node in nodes:
        if field.kind == "enum":
            assert "enum" in node or "const" in node
        if field.kind == "timestamp":
            assert node["format"] == "date-time"
            assert "pattern" in node


@pytest.mark.parametrize(
    "timestamp",
    [TIMESTAMP, "2026-01-01t10:00:00.123z", "2026-01-01T10:00:00", "1767261600", "2026-01-01"],
)
def test_the_schemas_timestamp_pattern_agrees_with_the_decoder(timestamp: str) -> None:
    """The pattern an executor checks accepts exactly the strings the worker reads."""
    schema = Proposal.model_json_schema(mode="validation")
    [node] = schema_alternatives(schema["$defs"]["ProposedState"]["properties"]["timestamp"], {})
    field = next(field for field in FIELDS if field.path == ("state", "timestamp"))
    accepted = isinstance(decode(proposal_with(field, timestamp)), Decoded)
    assert (re.search(node["pattern"], timestamp) is not None) is accepted
