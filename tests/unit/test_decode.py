"""Decoding a delivery: every refusal has its code, and a valid body decodes losslessly."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest

from arbiter.schemas import ErrorCode, FlowRunSpec, StateType, TaskRunSpec
from arbiter.worker.db.storable import unstorable
from arbiter.worker.decode import Decoded, Invalid, body_digest, decode_proposal

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


def with_literal(literal: str) -> Decoded | Invalid:
    """Decode a valid body whose ``state.data.x[3]`` is ``literal``, written as is."""
    document = body(state={"type": "COMPLETED", "data": {"x": [0, 1, 2, "@"]}})
    raw = json.dumps(document).replace('"@"', literal).encode()
    return decode_proposal(raw, content_type="application/json", message_id=None, max_bytes=10**6)


@pytest.mark.parametrize(
    ("literal", "shown"),
    [
        ("1e400", "1e400"),
        ("-1E+400", "-1E+400"),
        ("1" + "0" * 400 + ".5", "100000000000...000000.5"),
    ],
)
def test_a_number_past_a_doubles_range_is_refused_where_it_is(literal: str, shown: str) -> None:
    """Python reads 1e400 as infinity, which JSONB cannot store: refused before any
    transaction, with its path and the literal as written (shortened if long)."""
    decoded = with_literal(literal)
    assert isinstance(decoded, Invalid)
    assert decoded.code is ErrorCode.SCHEMA_VIOLATION
    assert decoded.message == f"state.data.x[3]: numbers must be finite (got {shown})"


@pytest.mark.parametrize("digits", [4301, 20_000])
def test_an_integer_past_pythons_digit_limit_is_refused_where_it_is(digits: int) -> None:
    """Python refuses to read an integer of more than 4300 digits (a plain ValueError): a
    refusal naming the path, not an exception out of the decoder."""
    decoded = with_literal("9" * digits)
    assert isinstance(decoded, Invalid)
    assert decoded.code is ErrorCode.SCHEMA_VIOLATION
    assert decoded.message == (
        f"state.data.x[3]: integers may have at most 4300 digits (got {digits})"
    )


def test_a_number_with_too_many_digits_for_the_validator_is_refused_where_it_is() -> None:
    """pydantic's parser refuses a literal of over 4300 digits before its point even where
    Python reads a modest float; that too is a refusal with a path, not a parse error."""
    decoded = with_literal("1" * 4400 + "e-4390")
    assert isinstance(decoded, Invalid)
    assert decoded.code is ErrorCode.SCHEMA_VIOLATION
    assert decoded.message == (
        "state.data.x[3]: numbers may have at most 4300 digits before the point"
    )


def test_the_largest_double_and_the_widest_readable_integer_are_kept() -> None:
    """Numbers at the edge of what Python reads are values, not refusals."""
    decoded = with_literal("[1.7976931348623157e308, " + "9" * 4300 + "]")
    assert isinstance(decoded, Decoded)
    assert decoded.proposal.state.data == {"x": [0, 1, 2, [1.7976931348623157e308, 10**4300 - 1]]}


@pytest.mark.parametrize("delay", ["[0.5, " + "9" * 400 + "]", "[0.5, " + "9" * 4300 + "]"])
def test_an_integer_too_large_for_a_float_field_is_refused_not_made_infinite(delay: str) -> None:
    """A float field given an integer past a double's range would read as infinity, which
    JSONB cannot store (found by the round-trip property test): a refusal naming the field."""
    document = body(
        run_kind="task_run",
        state={"type": "PENDING"},
        run={"empirical_policy": {"retry_delay": "@"}},
    )
    raw = json.dumps(document).replace('"@"', delay).encode()
    decoded = decode_proposal(
        raw, content_type="application/json", message_id=None, max_bytes=10**6
    )
    assert isinstance(decoded, Invalid)
    assert decoded.code is ErrorCode.SCHEMA_VIOLATION
    assert "run.empirical_policy.retry_delay" in decoded.message


def test_a_refused_key_is_named_in_json_escapes() -> None:
    """The path shows a key that is not a plain name as JSON, so a NUL or surrogate in the key
    cannot make the message itself unstorable."""
    decoded = decode(body(state={"type": "COMPLETED", "data": {"a b": [{"k\x00": 1}]}}))
    assert isinstance(decoded, Invalid)
    assert decoded.message == (
        'state.data["a b"][0]["k\\u0000"]: strings may not contain the NUL character (\\u0000)'
    )


def test_a_body_nested_past_the_validators_limit_is_malformed_json() -> None:
    """pydantic's parser stops at 200 levels, before Python's does: still a refusal."""
    decoded = with_literal("[" * 250 + "]" * 250)
    assert isinstance(decoded, Invalid)
    assert decoded.code is ErrorCode.MALFORMED_JSON
    assert "nested too deeply" in decoded.message


@pytest.mark.parametrize(
    "timestamp", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59.999999-00:01"]
)
def test_a_timestamp_outside_utcs_years_is_refused(timestamp: str) -> None:
    """The driver stores timestamps in UTC, where these fall outside years 1 to 9999."""
    decoded = decode(body(state={"type": "RUNNING", "timestamp": timestamp}))
    assert isinstance(decoded, Invalid)
    assert decoded.code is ErrorCode.SCHEMA_VIOLATION
    assert decoded.message.startswith("state.timestamp: ")
    assert "years 1 to 9999 in UTC" in decoded.message


def test_unstorable_names_the_path_inside_the_value_it_is_given() -> None:
    """The store passes a list of column values; the path starts at that list."""
    assert unstorable(["ok", None, {"a": [1.5, float("nan")]}]) == (
        "[2].a[1]: numbers must be finite (got nan)"
    )


def test_unstorable_finds_nothing_in_json_postgresql_stores() -> None:
    """Unicode, huge integers, tiny and negative-zero floats are all storable."""
    assert unstorable({"caf\u00e9": ["\U0001f600", 10**4000, 5e-324, -0.0, True, None]}) is None
