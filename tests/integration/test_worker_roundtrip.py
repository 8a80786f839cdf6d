"""A worker on real RabbitMQ and PostgreSQL: round trips, replays, outcome properties, routing."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from arbiter.schemas import (
    FlowRunSpec,
    Outcome,
    OutcomeStatus,
    ProposedState,
    StateType,
    TaskRunSpec,
)
from arbiter.worker.client import ArbiterClient
from arbiter.worker.db.engine import create_engine
from arbiter.worker.db.store import PgStore
from arbiter.worker.settings import Settings

pytestmark = pytest.mark.integration


def proposal_body(
    run_id: uuid.UUID,
    state_type: StateType,
    *,
    proposal_id: uuid.UUID | None = None,
    run_kind: str = "flow_run",
    run: dict[str, object] | None = None,
) -> dict[str, object]:
    body: dict[str, object] = {
        "schema_version": 1,
        "proposal_id": str(proposal_id or uuid.uuid4()),
        "run_kind": run_kind,
        "run_id": str(run_id),
        "state": {"type": state_type.value},
    }
    if run is not None:
        body["run"] = run
    return body


async def publish_raw(
    settings: Settings,
    body: bytes,
    *,
    reply_to: str | None = None,
    message_id: str | None = None,
    correlation_id: str | None = None,
    content_type: str = "application/json",
    headers: Mapping[str, str] | None = None,
) -> None:
    """One proposal body as any executor could send it, with whatever properties."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(settings.proposals_exchange)
        await exchange.publish(
            aio_pika.Message(
                body=body,
                content_type=content_type,
                message_id=message_id,
                correlation_id=correlation_id,
                reply_to=reply_to,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers={**headers} if headers else None,
            ),
            routing_key=settings.proposals_routing_key,
        )


class OutcomeTap:
    """A private queue bound with one binding key to the outcomes exchange (or another)."""

    def __init__(self, settings: Settings, binding_key: str, *, exchange: str = "") -> None:
        self.settings = settings
        self.binding_key = binding_key
        self.exchange = exchange or settings.outcomes_exchange
        self.messages: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def __aenter__(self) -> OutcomeTap:
        self.connection = await aio_pika.connect(self.settings.amqp_url)
        channel = await self.connection.channel()
        exchange = await channel.get_exchange(self.exchange)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, routing_key=self.binding_key)
        await queue.consume(self.messages.put, no_ack=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.connection.close()

    async def next(self, timeout_s: float = 15) -> AbstractIncomingMessage:
        return await asyncio.wait_for(self.messages.get(), timeout_s)


async def history_of(settings: Settings, run_id: uuid.UUID, kind: str = "flow_run") -> list[str]:
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            states = await PgStore(conn).read_history(kind, run_id)  # type: ignore[arg-type]
        return [s.name for s in states]
    finally:
        await engine.dispose()


async def test_a_flow_run_goes_through_its_lifecycle(
    client: ArbiterClient, settings: Settings
) -> None:
    """SCHEDULED → PENDING → RUNNING → COMPLETED are each accepted and written once."""
    run_id = uuid.uuid4()
    spec = FlowRunSpec(name="nightly", flow_name="etl", tags=["a"])
    first = await client.propose(
        "flow_run", run_id, ProposedState(type=StateType.SCHEDULED), run=spec
    )
    assert first.status is OutcomeStatus.ACCEPT
    assert first.state is not None
    assert first.state.name == "Scheduled"
    for state_type in (StateType.PENDING, StateType.RUNNING, StateType.COMPLETED):
        outcome = await client.propose("flow_run", run_id, ProposedState(type=state_type))
        assert outcome.status is OutcomeStatus.ACCEPT, outcome.details
    assert outcome.run is not None
    assert outcome.run.state_type is StateType.COMPLETED
    assert outcome.run.run_count == 1
    assert outcome.run.end_time is not None
    assert await history_of(settings, run_id) == ["Scheduled", "Pending", "Running", "Completed"]


async def test_a_rule_decision_comes_back_with_its_reason_and_trace(client: ArbiterClient) -> None:
    """A second PENDING is aborted by PreventPendingTransitions, named in the rule trace."""
    run_id = uuid.uuid4()
    await client.propose(
        "flow_run", run_id, ProposedState(type=StateType.PENDING), run=FlowRunSpec()
    )
    outcome = await client.propose("flow_run", run_id, ProposedState(type=StateType.PENDING))
    assert outcome.status is OutcomeStatus.ABORT
    assert outcome.details.reason == (
        "This run is in a PENDING state and cannot transition to a PENDING state."
    )
    assert [(t.rule, t.effect.value) for t in outcome.rule_trace] == [
        ("PreventPendingTransitions", "abort")
    ]
    assert outcome.state is not None
    assert outcome.state.type is StateType.PENDING


async def test_a_task_run_is_created_on_its_first_proposal(client: ArbiterClient) -> None:
    """A task run's first proposal creates it and runs it from no state."""
    run_id = uuid.uuid4()
    outcome = await client.propose(
        "task_run", run_id, ProposedState(type=StateType.PENDING), run=TaskRunSpec(task_key="k")
    )
    assert outcome.status is OutcomeStatus.ACCEPT
    assert outcome.state is not None
    assert outcome.state.state_details.task_run_id == run_id


async def test_a_replayed_proposal_gets_the_identical_outcome_and_writes_nothing(
    settings: Settings, worker: asyncio.Event
) -> None:
    """The same proposal published twice: two identical outcomes, one state row."""
    run_id, proposal_id = uuid.uuid4(), uuid.uuid4()
    body = json.dumps(
        proposal_body(run_id, StateType.PENDING, proposal_id=proposal_id, run={"name": "r"})
    ).encode()
    async with OutcomeTap(settings, "replay.key") as tap:
        await publish_raw(settings, body, reply_to="replay.key", message_id=str(proposal_id))
        first = await tap.next()
        await publish_raw(settings, body, reply_to="replay.key", message_id=str(proposal_id))
        second = await tap.next()
    assert first.body == second.body
    assert Outcome.model_validate_json(first.body).status is OutcomeStatus.ACCEPT
    assert await history_of(settings, run_id) == ["Pending"]


async def test_outcome_properties_echo_the_proposal(
    settings: Settings, worker: asyncio.Event
) -> None:
    """correlation_id is echoed, message_id is the proposal id, x-arbiter-status is the status."""
    run_id, proposal_id = uuid.uuid4(), uuid.uuid4()
    body = json.dumps(
        proposal_body(run_id, StateType.RUNNING, proposal_id=proposal_id, run={})
    ).encode()
    async with OutcomeTap(settings, "props.key") as tap:
        await publish_raw(settings, body, reply_to="props.key", correlation_id="corr-42")
        message = await tap.next()
    assert message.correlation_id == "corr-42"
    assert message.message_id == str(proposal_id)
    assert message.headers["x-arbiter-status"] == "ACCEPT"
    assert message.content_type == "application/json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT


async def test_outcomes_without_reply_to_are_routed_by_kind_and_status(
    settings: Settings, worker: asyncio.Event
) -> None:
    """No reply_to: the routing key is outcome.<run_kind>.<status>, INVALID included."""
    run_id = uuid.uuid4()
    async with OutcomeTap(settings, "outcome.task_run.*") as tap:
        await publish_raw(
            settings,
            json.dumps(
                proposal_body(run_id, StateType.PENDING, run_kind="task_run", run={})
            ).encode(),
        )
        message = await tap.next()
        assert message.routing_key == "outcome.task_run.accept"
        unknown = proposal_body(uuid.uuid4(), StateType.PENDING, run_kind="task_run")
        await publish_raw(settings, json.dumps(unknown).encode())
        message = await tap.next()
        assert message.routing_key == "outcome.task_run.invalid"
