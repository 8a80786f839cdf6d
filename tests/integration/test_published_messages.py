"""What a worker publishes besides outcomes: state-change events on ``arbiter.events``
and deferred task runs on ``arbiter.task-runs`` (reference §2.3 rule 16, §2.2).

Both come from the transaction's outbox, which is stored with the outcome: they are
published right after the outcome, and published again by a replay, with the written
state's id as ``message_id`` so consumers can drop the copies.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from arbiter.schemas import (
    FlowRunSpec,
    Outcome,
    OutcomeStatus,
    ProposedState,
    StateDetails,
    StateType,
    TaskRunSpec,
)
from arbiter.schemas.states import utcnow
from arbiter.worker.client import ArbiterClient
from arbiter.worker.db.engine import create_engine
from arbiter.worker.db.store import PgStore
from arbiter.worker.settings import Settings
from devtools.devservices import Services
from tests.fixtures.services import isolated_settings, running_worker
from tests.integration.test_worker_roundtrip import OutcomeTap, proposal_body, publish_raw

pytestmark = pytest.mark.integration


@pytest.fixture
async def events(settings: Settings, worker: asyncio.Event) -> AsyncIterator[OutcomeTap]:
    async with OutcomeTap(settings, "prefect.flow-run.#", exchange=settings.events_exchange) as tap:
        yield tap


async def drain(tap: OutcomeTap, settle_s: float = 0.75) -> list[AbstractIncomingMessage]:
    """Everything the tap holds once nothing more arrives for ``settle_s``."""
    received: list[AbstractIncomingMessage] = []
    while True:
        try:
            received.append(await tap.next(timeout_s=settle_s))
        except TimeoutError:
            return received


async def test_each_written_flow_state_is_announced(
    client: ArbiterClient, events: OutcomeTap
) -> None:
    """S → P → R → C: one event per written state, routed by state name, id = state id."""
    run_id = uuid.uuid4()
    spec = FlowRunSpec(name="nightly", flow_name="etl", tags=["db"])
    for state_type in (StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING):
        outcome = await client.propose("flow_run", run_id, ProposedState(type=state_type), run=spec)
        assert outcome.status is OutcomeStatus.ACCEPT
        assert outcome.state is not None
        message = await events.next()
        event = json.loads(message.body)
        assert message.routing_key == f"prefect.flow-run.{outcome.state.name}"
        assert message.message_id == str(outcome.state.id) == event["id"]
        assert message.content_type == "application/json"
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert event["event"] == f"prefect.flow-run.{outcome.state.name}"
        assert event["resource"]["prefect.resource.id"] == f"prefect.flow-run.{run_id}"
        assert event["resource"]["prefect.resource.name"] == "nightly"
        assert event["payload"]["validated_state"]["type"] == state_type.value
        assert {"prefect.resource.id": "prefect.tag.db", "prefect.resource.role": "tag"} in (
            event["related"]
        )
    completed = await client.propose("flow_run", run_id, ProposedState(type=StateType.COMPLETED))
    assert completed.status is OutcomeStatus.ACCEPT
    (last,) = await drain(events)
    assert json.loads(last.body)["payload"]["intended"] == {"from": "RUNNING", "to": "COMPLETED"}


async def test_a_transition_that_writes_nothing_announces_nothing(
    client: ArbiterClient, events: OutcomeTap
) -> None:
    """A WAIT (RUNNING before the scheduled time) and an ABORT (PENDING twice) emit no event."""
    run_id = uuid.uuid4()
    later = utcnow() + dt.timedelta(days=1)
    scheduled = ProposedState(
        type=StateType.SCHEDULED, state_details=StateDetails(scheduled_time=later)
    )
    assert (await client.propose("flow_run", run_id, scheduled, run=FlowRunSpec())).status is (
        OutcomeStatus.ACCEPT
    )
    for state_type, status in [
        (StateType.PENDING, OutcomeStatus.ACCEPT),
        (StateType.RUNNING, OutcomeStatus.WAIT),
        (StateType.PENDING, OutcomeStatus.ABORT),
    ]:
        outcome = await client.propose("flow_run", run_id, ProposedState(type=state_type))
        assert outcome.status is status
    names = [message.routing_key for message in await drain(events)]
    assert names == ["prefect.flow-run.Scheduled", "prefect.flow-run.Pending"]


async def test_a_rejection_announces_the_state_written_instead(
    client: ArbiterClient, events: OutcomeTap
) -> None:
    """A failed run with retries left is rejected to AwaitingRetry, which is announced."""
    run_id = uuid.uuid4()
    spec = FlowRunSpec(empirical_policy={"retries": 1})
    for state_type in (StateType.PENDING, StateType.RUNNING):
        await client.propose("flow_run", run_id, ProposedState(type=state_type), run=spec)
    outcome = await client.propose("flow_run", run_id, ProposedState(type=StateType.FAILED))
    assert outcome.status is OutcomeStatus.REJECT
    assert outcome.state is not None
    assert outcome.state.name == "AwaitingRetry"
    names = [message.routing_key for message in await drain(events)]
    assert names == [
        "prefect.flow-run.Pending",
        "prefect.flow-run.Running",
        "prefect.flow-run.AwaitingRetry",
    ]


async def test_a_deferred_task_run_is_enqueued_by_its_task_key(
    client: ArbiterClient, settings: Settings
) -> None:
    """A written deferred SCHEDULED task state is published to the task-runs exchange."""
    run_id = uuid.uuid4()
    deferred = ProposedState(type=StateType.SCHEDULED, state_details=StateDetails(deferred=True))
    async with OutcomeTap(settings, "reports.build", exchange=settings.task_runs_exchange) as tap:
        outcome = await client.propose(
            "task_run", run_id, deferred, run=TaskRunSpec(task_key="reports.build")
        )
        message = await tap.next()
        undeferred = ProposedState(type=StateType.SCHEDULED)
        other = await client.propose(
            "task_run", uuid.uuid4(), undeferred, run=TaskRunSpec(task_key="reports.build")
        )
        assert await drain(tap) == []
    assert outcome.status is OutcomeStatus.ACCEPT
    assert other.status is OutcomeStatus.ACCEPT
    assert outcome.state is not None
    body = json.loads(message.body)
    assert message.routing_key == "reports.build"
    assert message.message_id == str(outcome.state.id)
    assert body["task_run_id"] == str(run_id)
    assert body["state"]["id"] == str(outcome.state.id)
    assert body["retry"] is False


async def answered_twice(
    settings: Settings, body: bytes, reply_to: str
) -> tuple[AbstractIncomingMessage, AbstractIncomingMessage]:
    """Publish ``body`` and await its answer, twice: the first answer and the replay."""
    async with OutcomeTap(settings, reply_to) as outcomes:
        await publish_raw(settings, body, reply_to=reply_to)
        first = await outcomes.next()
        await publish_raw(settings, body, reply_to=reply_to)
        return first, await outcomes.next()


async def test_a_replay_publishes_the_same_events_again(
    settings: Settings, events: OutcomeTap
) -> None:
    """The same proposal twice: the second answer is a replay, and its event is the stored
    one again (same message id, same body), so a consumer that missed it still gets it."""
    run_id, proposal_id = uuid.uuid4(), uuid.uuid4()
    body = json.dumps(
        proposal_body(run_id, StateType.PENDING, proposal_id=proposal_id, run={"name": "r"})
    ).encode()
    await answered_twice(settings, body, "replay.events")
    first, second = await drain(events)
    assert first.message_id == second.message_id
    assert json.loads(first.body) == json.loads(second.body)
    assert json.loads(first.body)["resource"]["prefect.resource.name"] == "r"


async def test_the_outcome_published_is_the_one_stored_byte_for_byte(
    settings: Settings, worker: asyncio.Event
) -> None:
    """The outcome is serialised once, when it is recorded, and that JSON is what the
    executor receives: on the first answer and on a replay alike."""
    run_id, proposal_id = uuid.uuid4(), uuid.uuid4()
    body = json.dumps(
        proposal_body(run_id, StateType.PENDING, proposal_id=proposal_id, run={"name": "r"})
    ).encode()
    first, replayed = await answered_twice(settings, body, "stored.outcome")
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            stored = await PgStore(conn).find_processed(proposal_id)
    finally:
        await engine.dispose()
    assert stored is not None
    assert Outcome.model_validate_json(first.body).status is OutcomeStatus.ACCEPT
    assert json.loads(first.body) == json.loads(stored.outcome_json)  # JSONB reorders keys
    assert replayed.body == first.body


async def test_events_lost_to_a_failed_publish_come_with_the_redelivery(
    services: Services, database_url: str
) -> None:
    """Commit succeeded and the outcome went out, then the broker refused the event (a full
    queue bound with ``x-overflow: reject-publish``): the proposal is requeued, not acked,
    and each redelivery replays the stored outcome and tries the stored event again. Once
    the queue is gone the event arrives and the proposal is acked. Nothing is written twice.
    """
    settings = isolated_settings(services, database_url, delivery_limit=1000, retry_attempts=2)
    run_id, proposal_id = uuid.uuid4(), uuid.uuid4()
    body = json.dumps(
        proposal_body(run_id, StateType.PENDING, proposal_id=proposal_id, run={})
    ).encode()
    async with running_worker(settings), OutcomeTap(settings, "lost.events") as outcomes:
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            events = await channel.get_exchange(settings.events_exchange)
            full = await channel.declare_queue(
                exclusive=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
            )
            await full.bind(events, routing_key="#")
            await publish_raw(settings, body, reply_to="lost.events")
            first = await outcomes.next()  # the executor is not kept waiting by the event
            replayed = await outcomes.next()  # the event was refused: delivered again
            assert first.body == replayed.body

            async with OutcomeTap(settings, "#", exchange=settings.events_exchange) as tap:
                await full.delete(if_unused=False, if_empty=False)
                event = await tap.next(timeout_s=30)
            await drain(outcomes, settle_s=1.0)  # replays still in flight when the queue went
            with pytest.raises(TimeoutError):
                await outcomes.next(timeout_s=1.5)  # acked at last: no more redeliveries
    outcome = Outcome.model_validate_json(first.body)
    assert outcome.status is OutcomeStatus.ACCEPT
    assert outcome.state is not None
    assert event.message_id == str(outcome.state.id)
    assert event.routing_key == "prefect.flow-run.Pending"
    assert await processed_status(settings, proposal_id) == "ACCEPT"
    assert await state_count(settings, run_id) == 1


async def processed_status(settings: Settings, proposal_id: uuid.UUID) -> str | None:
    """The stored status of a proposal, polled until it has committed (or 15 s pass)."""
    engine = create_engine(settings.database_url)
    try:
        for _ in range(150):
            async with engine.connect() as conn:
                found = await PgStore(conn).find_processed(proposal_id)
            if found is not None:
                return found.status
            await asyncio.sleep(0.1)
        return None
    finally:
        await engine.dispose()


async def state_count(settings: Settings, run_id: uuid.UUID) -> int:
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            return len(await PgStore(conn).read_history("flow_run", run_id))
    finally:
        await engine.dispose()
