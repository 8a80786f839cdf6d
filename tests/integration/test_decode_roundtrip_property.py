"""What ``decode_proposal`` accepts, PostgreSQL stores and returns equal; what it refuses, it
refuses with a reason.

Hypothesis puts arbitrary JSON into the fields of an otherwise valid proposal: non-finite
floats, integers past Python's digit limit, NUL characters, lone surrogates, and literals
``json.dumps`` cannot write (``1e400``). Hypothesis does not drive async tests, and the
session's event loop belongs to pytest-asyncio, so the database half draws its examples
in a synchronous, derandomized run and then checks them all in one async test.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from arbiter.schemas import ErrorCode, FlowRun, FlowRunSpec, Proposal, TaskRun, TaskRunSpec
from arbiter.worker.db.batch_store import BatchStore
from arbiter.worker.db.store import PgStore
from arbiter.worker.decode import Decoded, Invalid, decode_proposal

pytestmark = pytest.mark.integration

MAX_BYTES = 1 << 20


class Raw:
    """A number literal written into the body as is (``json.dumps`` cannot write these)."""

    def __init__(self, literal: str) -> None:
        self.literal = literal


# Literals at the edges of what Python reads, which it reads as finite values ...
EDGE_LITERALS = st.sampled_from(
    ["1e-400", "4.9e-324", "1.7976931348623157e308", "-0", "-0.0", "0.1e1", "9" * 4300]
).map(Raw)
# ... and literals it reads as infinite or cannot read at all.
BAD_INTEGERS = st.integers(4301, 4400).map(lambda digits: Raw("-" + "9" * digits))
BAD_LITERALS = st.one_of(
    st.sampled_from(["1e400", "-1E+309", "1" + "0" * 400 + ".5", "1" * 4400 + "e-4390"]).map(Raw),
    BAD_INTEGERS,
)
STORABLE_TEXT = st.text(st.characters(exclude_characters="\x00"), max_size=10)
# Every code point, NUL and lone surrogates included (hypothesis leaves surrogates out unless
# told to).
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=10)
STORABLE_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    STORABLE_TEXT,
    EDGE_LITERALS,
)
ANY_SCALARS = st.one_of(STORABLE_SCALARS, st.floats(), ANY_TEXT, BAD_LITERALS)


def json_values(scalars: st.SearchStrategy[object], keys: st.SearchStrategy[str]) -> Any:
    """Nested arrays and objects of ``scalars``, small enough to generate quickly."""
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
        max_leaves=12,
    )


STORABLE_JSON = json_values(STORABLE_SCALARS, STORABLE_TEXT)
ANY_JSON = json_values(ANY_SCALARS, ANY_TEXT)
STORABLE_NUMBERS = st.one_of(
    st.integers(min_value=0), st.floats(min_value=0, allow_infinity=False), EDGE_LITERALS
)
ANY_NUMBERS = st.one_of(STORABLE_NUMBERS, st.floats(), BAD_LITERALS)
OFFSETS = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(
    lambda m: dt.timezone(dt.timedelta(minutes=m))
)
FIRST, LAST = dt.datetime.min, dt.datetime.max
# Times near the ends of Python's range, where an offset can push UTC outside it.
MOMENTS = st.one_of(
    st.datetimes(FIRST, LAST),
    st.sampled_from([FIRST, LAST]),
    st.datetimes(max_value=FIRST + dt.timedelta(days=1)),
    st.datetimes(min_value=LAST - dt.timedelta(days=1)),
)
TIMESTAMPS = st.builds(
    lambda moment, zone, separator: moment.replace(tzinfo=zone).isoformat(separator),
    MOMENTS,
    st.none() | OFFSETS,
    st.sampled_from("T "),
)


@st.composite
def proposals(draw: st.DrawFn) -> bytes:
    """A valid first proposal for a new run, with generated values in the fields whose content
    is the executor's: data, parameters or inputs, names, messages, tags, timestamps, delays.

    A third have storable values, a third values of the right JSON type that may not be
    storable (NaN, 1e400, NUL...), a third anything at all in those fields.
    """
    mode = draw(st.sampled_from(["storable", "hostile", "any type"]))
    text = STORABLE_TEXT if mode == "storable" else ANY_TEXT
    json_value = STORABLE_JSON if mode == "storable" else ANY_JSON

    def typed(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return strategy | ANY_JSON if mode == "any type" else strategy

    kind = draw(st.sampled_from(["flow_run", "task_run"]))
    state: dict[str, Any] = {"type": draw(st.sampled_from(["PENDING", "RUNNING", "COMPLETED"]))}
    state |= draw(
        st.fixed_dictionaries(
            {},
            optional={
                "data": json_value,
                "name": typed(text),
                "message": typed(text),
                "timestamp": typed(TIMESTAMPS),
                "state_details": st.fixed_dictionaries({"scheduled_time": TIMESTAMPS}),
            },
        )
    )
    inputs = "parameters" if kind == "flow_run" else "task_inputs"
    number: st.SearchStrategy[Any]
    delays: st.SearchStrategy[Any]
    if kind == "flow_run":
        number = st.integers(min_value=0) | (BAD_INTEGERS if mode != "storable" else st.nothing())
        delays = number
    else:
        number = STORABLE_NUMBERS if mode == "storable" else ANY_NUMBERS
        delays = number | st.lists(number, max_size=4)
    run = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "name": text,
                "tags": typed(st.lists(text, max_size=4)),
                inputs: typed(st.dictionaries(text, json_value, max_size=4)),
                "empirical_policy": st.fixed_dictionaries({"retry_delay": typed(delays)}),
            },
        )
    )
    document = {
        "schema_version": 1,
        "proposal_id": str(uuid.uuid4()),
        "run_kind": kind,
        "run_id": str(uuid.uuid4()),
        "state": state,
        "run": run,
    }
    return dump(document, ensure_ascii=draw(st.booleans()))


def dump(document: object, *, ensure_ascii: bool) -> bytes:
    """JSON text with each ``Raw`` written as its literal; lone surrogates make invalid UTF-8
    when not escaped, as a careless executor's would."""
    literals: dict[str, str] = {}

    def placeholders(value: object) -> object:
        if isinstance(value, Raw):
            token = f"@raw-{len(literals)}-{uuid.uuid4().hex}@"
            literals[token] = value.literal
            return token
        if isinstance(value, dict):
            return {key: placeholders(item) for key, item in value.items()}
        if isinstance(value, list):
            return [placeholders(item) for item in value]
        return value

    text = json.dumps(placeholders(document), ensure_ascii=ensure_ascii)
    for token, literal in literals.items():
        text = text.replace(f'"{token}"', literal)
    return text.encode("utf-8", "surrogatepass")


def decode(body: bytes) -> Decoded | Invalid:
    return decode_proposal(
        body, content_type="application/json", message_id=None, max_bytes=MAX_BYTES
    )


def same_json(left: object, right: object) -> bool:
    """JSON equality: key order aside, and numbers by value (JSONB keeps numbers as decimals,
    so 1e16 comes back as the integer 10000000000000000)."""
    if isinstance(left, bool) or isinstance(right, bool):
        return type(left) is type(right) and left == right
    if isinstance(left, int | float) and isinstance(right, int | float):
        if isinstance(left, int) and isinstance(right, int):
            return left == right
        return float(left) == float(right)
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(same_json(left[k], right[k]) for k in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(map(same_json, left, right))
    return type(left) is type(right) and left == right


SETTINGS = settings(
    max_examples=400,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@SETTINGS
@given(proposals())
def test_a_refused_proposal_gets_a_reason(body: bytes) -> None:
    """Decoding never raises; a refusal is malformed JSON or a schema violation, with a reason."""
    decoded = decode(body)
    if isinstance(decoded, Invalid):
        assert decoded.code in (ErrorCode.MALFORMED_JSON, ErrorCode.SCHEMA_VIOLATION)
        assert decoded.message.strip()


def canonical(value: object) -> str:
    """Exact JSON identity: key order aside, 1 and 1.0 differ."""
    return json.dumps(value, sort_keys=True)


@SETTINGS
@given(proposals())
def test_an_accepted_proposal_holds_the_values_python_reads_in_the_body(body: bytes) -> None:
    """pydantic's parser (which builds the proposal) and Python's (which the checks and the
    digest read) agree on every value the decoder accepts."""
    decoded = decode(body)
    if isinstance(decoded, Decoded):
        sent = json.loads(body)
        proposal, run = decoded.proposal, decoded.proposal.run
        assert isinstance(run, FlowRunSpec | TaskRunSpec)
        inputs = "parameters" if isinstance(run, FlowRunSpec) else "task_inputs"
        assert canonical(proposal.state.data) == canonical(sent["state"].get("data"))
        assert proposal.state.name == sent["state"].get("name")
        assert proposal.state.message == sent["state"].get("message")
        assert run.tags == sent["run"].get("tags", [])
        assert canonical(getattr(run, inputs)) == canonical(sent["run"].get(inputs, {}))


def accepted_examples(count: int) -> list[tuple[bytes, Proposal]]:
    """Proposals the decoder accepts, drawn the same way on every run."""
    found: list[tuple[bytes, Proposal]] = []

    @settings(SETTINGS, max_examples=count, phases=[Phase.generate])
    @given(proposals())
    def collect(body: bytes) -> None:
        decoded = decode(body)
        if isinstance(decoded, Decoded):
            found.append((body, decoded.proposal))

    collect()
    return found


async def round_trip_mismatches(store: PgStore, proposal: Proposal) -> list[str]:
    """Write the run and its state as the worker does, read them back, say what differs."""
    kind, spec = proposal.run_kind, proposal.run
    run: FlowRun | TaskRun
    if isinstance(spec, FlowRunSpec):
        run = FlowRun.from_spec(proposal.run_id, spec)
    else:
        assert isinstance(spec, TaskRunSpec)
        run = TaskRun.from_spec(proposal.run_id, spec)
    state = proposal.state.to_state(dt.datetime.now(dt.UTC))
    # As a batch writes them: a new run and its first state in the batch's one statement.
    batch = BatchStore(store, {(kind, run.id): run}, {(kind, run.id): 0})
    await batch.insert_state(kind, run, state)
    run.state = state
    await batch.save_run(kind, run)
    await batch.flush()
    [stored] = await store.read_history(kind, proposal.run_id)
    read = await (store.read_flow_run if kind == "flow_run" else store.read_task_run)(run.id)
    assert read is not None
    inputs = "parameters" if kind == "flow_run" else "task_inputs"
    pairs: dict[str, tuple[object, object]] = {
        "state.data": (stored.data, state.data),
        "state.name": (stored.name, state.name),
        "state.message": (stored.message, state.message),
        "state.timestamp": (stored.timestamp, state.timestamp),
        "state.state_details": (stored.state_details, state.state_details),
        "run.name": (read.name, run.name),
        "run.tags": (read.tags, run.tags),
        f"run.{inputs}": (getattr(read, inputs), getattr(run, inputs)),
        "run.retry_delay": (read.empirical_policy.retry_delay, run.empirical_policy.retry_delay),
    }
    return [
        f"{name}: read {got!r}, wrote {sent!r}"
        for name, (got, sent) in pairs.items()
        if not same_json(got, sent)
    ]


async def test_what_the_decoder_accepts_postgresql_stores_and_returns_equal(
    pg_store: PgStore,
) -> None:
    """Each accepted example is written (in a transaction rolled back after the test) and
    read back equal: nothing the decoder lets through fails, or changes, in the database."""
    examples = accepted_examples(500)
    assert len(examples) >= 200, "the strategies should mostly make storable proposals"
    for body, proposal in examples:
        try:
            mismatches = await round_trip_mismatches(pg_store, proposal)
        except Exception as exc:
            pytest.fail(f"{body!r} was accepted but could not be stored: {exc!r}")
        assert not mismatches, (body, mismatches)
