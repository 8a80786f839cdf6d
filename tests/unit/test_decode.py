"""Decoding a delivery: every refusal has its code, and a valid body decodes losslessly."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest

from schemas import ErrorCode, FlowRunSpec, StateType, TaskRunSpec
from worker.decode import Decoded, Invalid, body_digest, decode_proposal

MAX = 4096


def body(**overrides: object) -> dict[str, object]:
    document: dict[str, object] = {
        "schema_version": 1,
        "proposal_id": str(uuid.uuid4()),
        "run_kind": "task_run",
        "run_id": str(uuid.uuid4()),
        "state": {"type": "RUNNING"},
    }
    document.update(overrides)
    return document


def decode(
    document: object, *, content_type: str = "application/json", message_id: str | None = None
) -> Decoded | Invalid:
    raw = document if isinstance(document, bytes) else json.dumps(document).encode()
    return decode_proposal(raw, content_type=content_type, message_id=message_id, max_bytes=MAX)


def test_a_valid_proposal_decodes() -> None:
    """A minimal body decodes into a Proposal with its digest."""
    document = body()
    decoded = decode(document)
    assert isinstance(decoded, Decoded)
    assert decoded.proposal.state.type is StateType.RUNNING
    assert decoded.body_sha256 == body_digest(document)


def test_the_run_description_is_read_by_run_kind() -> None:
    """`run` is decoded as the spec of `run_kind`, not by its shape."""
    flow = decode(body(run_kind="flow_run", run={"name": "x", "tags": ["a"]}))
    task = decode(body(run_kind="task_run", run={"name": "x", "tags": ["a"]}))
    assert isinstance(flow, Decoded)
    assert isinstance(flow.proposal.run, FlowRunSpec)
    assert isinstance(task, Decoded)
    assert isinstance(task.proposal.run, TaskRunSpec)


def test_a_task_field_in_a_flow_run_description_is_a_schema_violation() -> None:
    """Unknown fields are refused, so a task description cannot pass as a flow run."""
    decoded = decode(body(run_kind="flow_run", run={"task_key": "k"}))
    assert isinstance(decoded, Invalid)
    assert decoded.code is ErrorCode.SCHEMA_VIOLATION
    assert "run.task_key" in decoded.message


def test_digest_ignores_key_order_and_whitespace() -> None:
    """Re-serialising the same document does not make it a different proposal."""
    document = body()
    reordered = json.loads(json.dumps(dict(reversed(list(document.items())))))
    assert body_digest(document) == body_digest(reordered)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        pytest.param(b"{nope", ErrorCode.MALFORMED_JSON, id="malformed-json"),
        pytest.param(b"\xff\xfe", ErrorCode.MALFORMED_JSON, id="not-utf8"),
        pytest.param(b"[1, 2]", ErrorCode.SCHEMA_VIOLATION, id="not-an-object"),
        pytest.param(b"x" * (MAX + 1), ErrorCode.TOO_LARGE, id="too-large"),
    ],
)
def test_raw_bodies_that_are_refused(raw: bytes, code: ErrorCode) -> None:
    """Bodies that cannot be a proposal are refused with their code."""
    decoded = decode(raw)
    assert isinstance(decoded, Invalid)
    assert decoded.code is code


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        pytest.param({"schema_version": 2}, ErrorCode.UNSUPPORTED_VERSION, id="version-2"),
        pytest.param({"schema_version": "1"}, ErrorCode.SCHEMA_VIOLATION, id="version-string"),
        pytest.param({"run_kind": "deployment"}, ErrorCode.SCHEMA_VIOLATION, id="bad-kind"),
        pytest.param({"state": {"type": "SLEEPING"}}, ErrorCode.SCHEMA_VIOLATION, id="bad-type"),
        pytest.param({"proposal_id": "nope"}, ErrorCode.SCHEMA_VIOLATION, id="bad-uuid"),
        pytest.param({"extra": 1}, ErrorCode.SCHEMA_VIOLATION, id="unknown-field"),
        pytest.param(
            {"state": {"type": "RUNNING", "state_details": {"typo": 1}}},
            ErrorCode.SCHEMA_VIOLATION,
            id="unknown-detail",
        ),
    ],
)
def test_documents_that_are_refused(overrides: dict[str, object], code: ErrorCode) -> None:
    """Well-formed JSON that breaks the schema is refused with its code."""
    decoded = decode(body(**overrides))
    assert isinstance(decoded, Invalid)
    assert decoded.code is code


@pytest.mark.parametrize("depth", [3_000, 100_000])
def test_a_body_nested_too_deeply_is_malformed_json(depth: int) -> None:
    """Deep nesting makes Python's parser raise RecursionError; it is a refusal instead."""
    raw = json.dumps(body(state={"type": "COMPLETED", "data": 0})).replace(
        '"data": 0', '"data": ' + "[" * depth + "]" * depth
    )
    decoded = decode_proposal(
        raw.encode(), content_type="application/json", message_id=None, max_bytes=len(raw)
    )
    assert isinstance(decoded, Invalid)
    assert decoded.code is ErrorCode.MALFORMED_JSON
    assert "nested too deeply" in decoded.message


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_json_numbers_are_malformed_json(constant: str) -> None:
    """Python's json module reads NaN and Infinity; JSON and PostgreSQL's JSONB do not."""
    raw = json.dumps(body(state={"type": "COMPLETED", "data": 0})).replace(
        '"data": 0', f'"data": {constant}'
    )
    decoded = decode(raw.encode())
    assert isinstance(decoded, Invalid)
    assert decoded.code is ErrorCode.MALFORMED_JSON
    assert f"{constant} is not a JSON value" in decoded.message


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        pytest.param({"run": {"name": "a\x00b"}}, "NUL", id="nul-in-run-name"),
        pytest.param({"run": {"tags": ["\x00"]}}, "NUL", id="nul-in-a-tag"),
        pytest.param(
            {"state": {"type": "COMPLETED", "data": {"k\x00": 1}}}, "NUL", id="nul-in-a-data-key"
        ),
        pytest.param(
            {"state": {"type": "RUNNING", "message": "\ud800"}}, "surrogate", id="lone-surrogate"
        ),
    ],
)
def test_strings_postgresql_cannot_store_are_refused(
    overrides: dict[str, object], named: str
) -> None:
    """NUL characters and lone surrogates anywhere in the body are a schema violation that
    names the problem, refused before any rule runs (the database would refuse them later)."""
    decoded = decode(body(**overrides))
    assert isinstance(decoded, Invalid)
    assert decoded.code is ErrorCode.SCHEMA_VIOLATION
    assert named in decoded.message
    assert decoded.proposal_id is not None


def test_paired_surrogates_and_other_unicode_are_kept() -> None:
    """An emoji sent as a surrogate-pair escape and accented text decode unchanged."""
    raw = json.dumps(body(state={"type": "RUNNING", "message": "caf\u00e9 \U0001f600"}))
    decoded = decode(raw.encode())
    assert isinstance(decoded, Decoded)
    assert decoded.proposal.state.message == "caf\u00e9 \U0001f600"


def test_refusals_keep_what_identity_they_can() -> None:
    """An unsupported version still reports the proposal id, kind and run id."""
    document = body(schema_version=9)
    decoded = decode(document)
    assert isinstance(decoded, Invalid)
    assert str(decoded.proposal_id) == document["proposal_id"]
    assert decoded.run_kind == "task_run"
    assert str(decoded.run_id) == document["run_id"]


def test_wrong_content_type_is_refused() -> None:
    """Only application/json bodies are read."""
    decoded = decode(body(), content_type="text/plain")
    assert isinstance(decoded, Invalid)
    assert decoded.code is ErrorCode.SCHEMA_VIOLATION


def test_message_id_must_equal_the_proposal_id() -> None:
    """A message_id that disagrees with the body is refused; an equal one is fine."""
    document = body()
    assert isinstance(decode(document, message_id=str(uuid.uuid4())), Invalid)
    assert isinstance(decode(document, message_id=str(document["proposal_id"])), Decoded)


def test_a_library_stamped_message_id_is_not_the_executors() -> None:
    """aiormq's random hex message_id (set when the publisher gave none) is ignored."""
    assert isinstance(decode(body(), message_id=uuid.uuid4().hex), Decoded)


def test_naive_times_are_read_as_utc() -> None:
    """A client's naive timestamp or scheduled time means UTC, so rules can compare it."""
    decoded = decode(
        body(
            state={
                "type": "SCHEDULED",
                "timestamp": "2026-01-01T10:00:00",
                "state_details": {"scheduled_time": "2026-01-01T11:00:00"},
            }
        )
    )
    assert isinstance(decoded, Decoded)
    state = decoded.proposal.state
    assert state.timestamp is not None
    assert state.timestamp.utcoffset() == dt.timedelta(0)
    scheduled = state.state_details.scheduled_time
    assert scheduled is not None
    assert scheduled.utcoffset() == dt.timedelta(0)
