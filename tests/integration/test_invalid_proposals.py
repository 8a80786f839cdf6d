"""Every INVALID code of docs/protocol.md §3.4: an INVALID outcome, the message in the
dead-letter queue, nothing written, and the worker keeps serving valid proposals."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest

from arbiter.schemas import (
    ErrorCode,
    FlowRunSpec,
    Outcome,
    OutcomeStatus,
    ProposedState,
    StateType,
    TaskRunSpec,
)
from arbiter.worker.client import ArbiterClient
from arbiter.worker.settings import Settings
from devtools.devservices import Services
from tests.fixtures.services import isolated_settings
from tests.integration.test_worker_roundtrip import (
    OutcomeTap,
    history_of,
    proposal_body,
    publish_raw,
)

pytestmark = pytest.mark.integration

MAX_BYTES = 2048


@pytest.fixture
def settings(services: Services, database_url: str) -> Settings:
    return isolated_settings(services, database_url, max_message_bytes=MAX_BYTES)


@pytest.fixture
async def tap(settings: Settings, worker: asyncio.Event) -> AsyncIterator[OutcomeTap]:
    async with OutcomeTap(settings, "invalid.key") as opened:
        yield opened


async def dead_letters(
    settings: Settings, count: int, timeout_s: float = 10
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(settings.amqp_url)
    found: list[aio_pika.abc.AbstractIncomingMessage] = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(settings.dead_queue, passive=True)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(found) < count and asyncio.get_running_loop().time() < deadline:
            message = await queue.get(fail=False, no_ack=True)
            if message is None:
                await asyncio.sleep(0.05)
            else:
                found.append(message)
    return found


async def refused(
    settings: Settings,
    tap: OutcomeTap,
    body: bytes,
    *,
    content_type: str = "application/json",
    message_id: str | None = None,
) -> tuple[Outcome, aio_pika.abc.AbstractIncomingMessage]:
    await publish_raw(
        settings, body, reply_to="invalid.key", content_type=content_type, message_id=message_id
    )
    outcome = Outcome.model_validate_json((await tap.next()).body)
    [dead] = await dead_letters(settings, 1)
    assert dead.body == body
    return outcome, dead


def assert_invalid(
    outcome: Outcome, dead: aio_pika.abc.AbstractIncomingMessage, code: ErrorCode
) -> None:
    assert outcome.status is OutcomeStatus.INVALID
    assert outcome.error is not None
    assert outcome.error.code is code
    assert outcome.state is None
    assert dead.headers["x-arbiter-error-code"] == code.value


async def test_malformed_json(settings: Settings, tap: OutcomeTap) -> None:
    """A body that is not JSON is refused as malformed_json."""
    outcome, dead = await refused(settings, tap, b"{not json")
    assert_invalid(outcome, dead, ErrorCode.MALFORMED_JSON)


async def test_schema_violation(settings: Settings, tap: OutcomeTap) -> None:
    """A proposal without a state is refused as schema_violation, naming the field."""
    body = proposal_body(uuid.uuid4(), StateType.PENDING)
    del body["state"]
    outcome, dead = await refused(settings, tap, json.dumps(body).encode())
    assert_invalid(outcome, dead, ErrorCode.SCHEMA_VIOLATION)
    assert "state" in outcome.error.message  # type: ignore[union-attr]


async def test_wrong_content_type_is_a_schema_violation(
    settings: Settings, tap: OutcomeTap
) -> None:
    """A body sent as text/plain is refused even though it is valid JSON."""
    body = json.dumps(proposal_body(uuid.uuid4(), StateType.PENDING, run={})).encode()
    outcome, dead = await refused(settings, tap, body, content_type="text/plain")
    assert_invalid(outcome, dead, ErrorCode.SCHEMA_VIOLATION)


async def test_unsupported_version(settings: Settings, tap: OutcomeTap) -> None:
    """schema_version 2 is refused as unsupported_version."""
    body = {**proposal_body(uuid.uuid4(), StateType.PENDING, run={}), "schema_version": 2}
    outcome, dead = await refused(settings, tap, json.dumps(body).encode())
    assert_invalid(outcome, dead, ErrorCode.UNSUPPORTED_VERSION)


async def test_unknown_run(settings: Settings, tap: OutcomeTap) -> None:
    """A proposal for an unseen run without a `run` description is refused as unknown_run."""
    run_id = uuid.uuid4()
    outcome, dead = await refused(
        settings, tap, json.dumps(proposal_body(run_id, StateType.PENDING)).encode()
    )
    assert_invalid(outcome, dead, ErrorCode.UNKNOWN_RUN)
    assert outcome.run_id == run_id


async def test_nan_is_malformed_json(settings: Settings, tap: OutcomeTap) -> None:
    """`"data": NaN` is not JSON: refused up front, not left to fail the transaction."""
    run_id = uuid.uuid4()
    document = proposal_body(run_id, StateType.COMPLETED, run={})
    raw = json.dumps(document).replace('"type": "COMPLETED"', '"type": "COMPLETED", "data": NaN')
    outcome, dead = await refused(settings, tap, raw.encode())
    assert_invalid(outcome, dead, ErrorCode.MALFORMED_JSON)
    assert await history_of(settings, run_id) == []


async def test_a_nul_character_is_a_schema_violation(settings: Settings, tap: OutcomeTap) -> None:
    """A NUL in the run's name (PostgreSQL cannot store it) is refused with a message naming
    it, and the outcome still reaches its run's executor."""
    run_id = uuid.uuid4()
    document = proposal_body(run_id, StateType.PENDING, run={"name": "bad\x00name"})
    outcome, dead = await refused(settings, tap, json.dumps(document).encode())
    assert_invalid(outcome, dead, ErrorCode.SCHEMA_VIOLATION)
    assert outcome.run_id == run_id
    assert "NUL" in outcome.error.message  # type: ignore[union-attr]
    assert await history_of(settings, run_id) == []


@pytest.mark.parametrize("state_type", [StateType.PENDING, StateType.RUNNING], ids=str)
async def test_a_task_run_of_a_flow_run_that_does_not_exist_is_an_unknown_run(
    settings: Settings, tap: OutcomeTap, state_type: StateType
) -> None:
    """A new task run must belong to a flow run that exists (Prefect: a foreign key, 404):
    its `run.flow_run_id` naming nothing is refused as unknown_run and creates nothing."""
    run_id, flow_run_id = uuid.uuid4(), uuid.uuid4()
    body = proposal_body(
        run_id, state_type, run_kind="task_run", run={"flow_run_id": str(flow_run_id)}
    )
    outcome, dead = await refused(settings, tap, json.dumps(body).encode())
    assert_invalid(outcome, dead, ErrorCode.UNKNOWN_RUN)
    assert outcome.error is not None
    assert outcome.error.message == (
        f"task run {run_id} names flow run {flow_run_id}, which does not exist"
    )
    assert await history_of(settings, run_id, "task_run") == []


async def test_a_task_run_whose_flow_run_is_a_task_run_is_an_unknown_run(
    settings: Settings, tap: OutcomeTap, worker: asyncio.Event
) -> None:
    """`run.flow_run_id` naming a task run is refused too: it names no flow run."""
    other = uuid.uuid4()
    async with ArbiterClient.connect(settings=settings) as client:
        await client.propose(
            "task_run", other, ProposedState(type=StateType.PENDING), run=TaskRunSpec()
        )
    run_id = uuid.uuid4()
    body = proposal_body(
        run_id, StateType.PENDING, run_kind="task_run", run={"flow_run_id": str(other)}
    )
    outcome, dead = await refused(settings, tap, json.dumps(body).encode())
    assert_invalid(outcome, dead, ErrorCode.UNKNOWN_RUN)
    assert outcome.error is not None
    assert outcome.error.message.endswith(f"names flow run {other}, which is a task run")


async def test_kind_mismatch(settings: Settings, tap: OutcomeTap, worker: asyncio.Event) -> None:
    """A task_run proposal for an id that is a flow run is refused as kind_mismatch."""
    run_id = uuid.uuid4()
    async with ArbiterClient.connect(settings=settings) as client:
        await client.propose(
            "flow_run", run_id, ProposedState(type=StateType.PENDING), run=FlowRunSpec()
        )
    body = proposal_body(run_id, StateType.RUNNING, run_kind="task_run", run={})
    outcome, dead = await refused(settings, tap, json.dumps(body).encode())
    assert_invalid(outcome, dead, ErrorCode.KIND_MISMATCH)
    assert await history_of(settings, run_id) == ["Pending"]


async def test_too_large(settings: Settings, tap: OutcomeTap) -> None:
    """A body over the size limit is refused as too_large."""
    body = proposal_body(uuid.uuid4(), StateType.PENDING, run={"name": "x" * MAX_BYTES})
    outcome, dead = await refused(settings, tap, json.dumps(body).encode())
    assert_invalid(outcome, dead, ErrorCode.TOO_LARGE)


async def test_proposal_id_conflict(settings: Settings, tap: OutcomeTap) -> None:
    """A known proposal id with another body is refused; the first outcome stands."""
    run_id, proposal_id = uuid.uuid4(), uuid.uuid4()
    first = json.dumps(
        proposal_body(run_id, StateType.PENDING, proposal_id=proposal_id, run={})
    ).encode()
    await publish_raw(settings, first, reply_to="invalid.key")
    assert Outcome.model_validate_json((await tap.next()).body).status is OutcomeStatus.ACCEPT
    second = json.dumps(proposal_body(run_id, StateType.RUNNING, proposal_id=proposal_id)).encode()
    outcome, dead = await refused(settings, tap, second)
    assert_invalid(outcome, dead, ErrorCode.PROPOSAL_ID_CONFLICT)
    assert await history_of(settings, run_id) == ["Pending"]


async def test_message_id_must_match_the_body(settings: Settings, tap: OutcomeTap) -> None:
    """A message_id property that differs from the body's proposal_id is a schema_violation."""
    body = json.dumps(proposal_body(uuid.uuid4(), StateType.PENDING, run={})).encode()
    outcome, dead = await refused(settings, tap, body, message_id=str(uuid.uuid4()))
    assert_invalid(outcome, dead, ErrorCode.SCHEMA_VIOLATION)


async def test_bad_input_never_costs_a_valid_proposal(settings: Settings, tap: OutcomeTap) -> None:
    """Garbage interleaved with valid proposals: every valid one is still accepted."""
    run_ids = [uuid.uuid4() for _ in range(5)]
    for run_id in run_ids:
        await publish_raw(settings, b"\xff\xfe garbage", reply_to="invalid.key")
        await publish_raw(
            settings,
            json.dumps(proposal_body(run_id, StateType.PENDING, run={})).encode(),
            reply_to="invalid.key",
        )
    statuses = sorted(
        [Outcome.model_validate_json((await tap.next()).body).status.value for _ in range(10)]
    )
    assert statuses == ["ACCEPT"] * 5 + ["INVALID"] * 5
    for run_id in run_ids:
        assert await history_of(settings, run_id) == ["Pending"]
