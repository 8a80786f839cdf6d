"""deploy/rabbitmq/definitions.json on a real broker: the worker settles proposals with its
narrow user, declaring nothing; an executor may only publish proposals and read its own
outcomes; nobody but the admin touches the topology; KEDA's user may only look."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiormq.exceptions import ChannelAccessRefused

from arbiter.schemas import (
    FlowRunSpec,
    OutcomeStatus,
    ProposedState,
    StateDetails,
    StateType,
    TaskRunSpec,
)
from arbiter.worker.client import ArbiterClient
from arbiter.worker.runtime import ServiceError
from arbiter.worker.service import run_worker
from arbiter.worker.settings import Settings
from arbiter.worker.topology import declare_topology
from devtools.devservices import Services
from tests.fixtures.services import isolated_settings, running_worker
from tests.integration.deploy.conftest import Broker, Roles
from tests.integration.test_worker_roundtrip import OutcomeTap

pytestmark = pytest.mark.integration


def as_user(broker: Broker, user: str, **overrides: object) -> Settings:
    """The default topology names, on the broker's vhost, as ``user``, declaring nothing."""
    return Settings(
        amqp_url=broker.url(user),
        declare_topology=False,
        retry_max_wait_s=0.2,
        **overrides,  # type: ignore[arg-type]
    )


async def refused(
    broker: Broker, user: str, act: Callable[[AbstractChannel], Awaitable[object]]
) -> str:
    """What the broker said when ``user`` tried ``act``; fails if it was allowed."""
    connection = await aio_pika.connect(broker.url(user))
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        with pytest.raises(ChannelAccessRefused) as refusal:
            await act(channel)
    return str(refusal.value)


async def test_a_worker_settles_proposals_with_its_narrow_user_and_role(
    broker: Broker, roles: Roles
) -> None:
    """Outcomes, a flow run's events, a deferred task run and a dead letter are each
    published by arbiter-worker as arbiter_worker; the executor proposes as arbiter-executor."""
    worker = as_user(broker, "arbiter-worker", database_url=roles.worker)
    executor = as_user(broker, "arbiter-executor")
    admin = as_user(broker, "arbiter-admin")
    flow_id, task_id = uuid.uuid4(), uuid.uuid4()
    deferred = ProposedState(type=StateType.SCHEDULED, state_details=StateDetails(deferred=True))
    async with (
        running_worker(worker),
        ArbiterClient.connect(settings=executor) as client,
        OutcomeTap(admin, "prefect.flow-run.*", exchange=admin.events_exchange) as events,
        OutcomeTap(admin, "nightly-task", exchange=admin.task_runs_exchange) as task_runs,
    ):
        for state in (StateType.PENDING, StateType.RUNNING):
            outcome = await client.propose(
                "flow_run", flow_id, ProposedState(type=state), run=FlowRunSpec(name="nightly")
            )
            assert outcome.status is OutcomeStatus.ACCEPT
        spec = TaskRunSpec(flow_run_id=flow_id, task_key="nightly-task")
        outcome = await client.propose("task_run", task_id, deferred, run=spec)
        assert outcome.status is OutcomeStatus.ACCEPT
        published = [await asyncio.wait_for(events.messages.get(), 10) for _ in range(2)]
        assert [m.routing_key for m in published] == [
            "prefect.flow-run.Pending",
            "prefect.flow-run.Running",
        ]
        enqueued = await asyncio.wait_for(task_runs.messages.get(), 10)
        assert json.loads(enqueued.body)["task_run_id"] == str(task_id)
        reply_key = f"reply.{uuid.uuid4()}"
        async with OutcomeTap(executor, reply_key) as replies:
            connection = await aio_pika.connect(executor.amqp_url)
            async with connection:
                channel = await connection.channel(publisher_confirms=True)
                exchange = await channel.get_exchange(executor.proposals_exchange)
                message = aio_pika.Message(b"not json", content_type="application/json")
                message.reply_to = reply_key
                await exchange.publish(message, routing_key=executor.proposals_routing_key)
            answer = await asyncio.wait_for(replies.messages.get(), 10)
        assert json.loads(answer.body)["status"] == "INVALID"
        admin_connection = await aio_pika.connect(admin.amqp_url)
        async with admin_connection:
            channel = await admin_connection.channel()
            for _ in range(100):
                dead = await channel.declare_queue(admin.dead_queue, passive=True)
                if dead.declaration_result.message_count == 1:
                    break
                await asyncio.sleep(0.05)
            assert dead.declaration_result.message_count == 1


async def ignore(message: AbstractIncomingMessage) -> None:
    """A consumer that would drop what it got, were it allowed to consume."""


async def test_an_executor_may_not_consume_proposals(broker: Broker) -> None:
    async def consume(channel: AbstractChannel) -> object:
        queue = await channel.get_queue("arbiter.proposals", ensure=False)
        return await queue.consume(ignore)

    assert "ACCESS_REFUSED" in await refused(broker, "arbiter-executor", consume)


async def test_an_executor_may_not_publish_outcomes(broker: Broker) -> None:
    async def publish(channel: AbstractChannel) -> object:
        exchange = await channel.get_exchange("arbiter.outcomes", ensure=False)
        return await exchange.publish(aio_pika.Message(b"{}"), routing_key=f"reply.{uuid.uuid4()}")

    assert "ACCESS_REFUSED" in await refused(broker, "arbiter-executor", publish)


@pytest.mark.parametrize("binding_key", ["#", "reply.*", "outcome.flow_run.accept"])
async def test_an_executor_may_not_listen_to_other_executors_outcomes(
    broker: Broker, binding_key: str
) -> None:
    """Its own server-named queue, yes; bound by any key but a reply.<uuid>, no."""

    async def bind(channel: AbstractChannel) -> object:
        queue = await channel.declare_queue(exclusive=True)
        assert queue.name.startswith("amq.gen-")
        exchange = await channel.get_exchange("arbiter.outcomes", ensure=False)
        await queue.bind(exchange, routing_key=f"reply.{uuid.uuid4()}")  # its own: allowed
        return await queue.bind(exchange, routing_key=binding_key)

    reason = await refused(broker, "arbiter-executor", bind)
    assert f"access to topic '{binding_key}'" in reason


@pytest.mark.parametrize("user", ["arbiter-executor", "arbiter-worker", "arbiter-monitor"])
@pytest.mark.parametrize(
    "act",
    [
        pytest.param(lambda ch: ch.queue_delete("arbiter.proposals"), id="delete-queue"),
        pytest.param(lambda ch: ch.exchange_delete("arbiter.outcomes"), id="delete-exchange"),
        pytest.param(lambda ch: ch.declare_queue("mine", durable=True), id="declare-queue"),
        pytest.param(
            lambda ch: declare_topology(ch, Settings()), id="declare-the-topology-actively"
        ),
    ],
)
async def test_nobody_but_the_admin_changes_the_topology(
    broker: Broker, user: str, act: Callable[[AbstractChannel], Awaitable[object]]
) -> None:
    assert "ACCESS_REFUSED" in await refused(broker, user, act)


@pytest.mark.parametrize("user", ["arbiter-executor", "arbiter-monitor"])
async def test_only_a_consumer_of_proposals_may_purge_them(broker: Broker, user: str) -> None:
    """Purging needs read, as consuming does: the worker may (it could as well consume and
    ack everything), an executor or the monitor may not."""

    async def purge(channel: AbstractChannel) -> object:
        return await (await channel.get_queue("arbiter.proposals", ensure=False)).purge()

    assert "ACCESS_REFUSED" in await refused(broker, user, purge)


async def test_the_admin_may_declare_the_topology_the_definitions_hold(broker: Broker) -> None:
    """An active declare with the worker's own arguments succeeds: the file and the code agree
    (RabbitMQ refuses a redeclare whose arguments differ, PRECONDITION_FAILED)."""
    connection = await aio_pika.connect(broker.url("arbiter-admin"))
    async with connection:
        await declare_topology(await connection.channel(), Settings())


async def test_the_monitor_reads_the_queue_depth_without_any_right(broker: Broker) -> None:
    """KEDA's rabbitmq scaler (protocol amqp) asks the depth with a passive declare."""
    async with ArbiterClient.connect(settings=as_user(broker, "arbiter-executor")) as client:
        for _ in range(3):
            await client.publish("flow_run", uuid.uuid4(), ProposedState(type=StateType.PENDING))
    connection = await aio_pika.connect(broker.url("arbiter-monitor"))
    async with connection:
        queue = await (await connection.channel()).declare_queue("arbiter.proposals", passive=True)
        assert queue.declaration_result.message_count == 3


@pytest.mark.parametrize(
    ("missing", "named"),
    [("exchanges", "exchange 't"), ("proposals queue", "queue 't")],
)
async def test_a_worker_that_may_not_declare_stops_when_the_topology_is_missing(
    services: Services, database_url: str, missing: str, named: str
) -> None:
    """One line names the setting and what to load (the CLI prints it and exits 2)."""
    settings = isolated_settings(services, database_url, declare_topology=False)
    if missing == "proposals queue":
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            for name in (
                settings.proposals_exchange,
                settings.outcomes_exchange,
                settings.dead_exchange,
                settings.events_exchange,
                settings.task_runs_exchange,
            ):
                await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=False)
    try:
        with pytest.raises(ServiceError) as stopped:
            await asyncio.wait_for(run_worker(settings), 30)
    finally:
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            for name in (settings.proposals_exchange, settings.outcomes_exchange):
                await channel.exchange_delete(name)
            for name in (settings.dead_exchange, settings.events_exchange):
                await channel.exchange_delete(name)
            await channel.exchange_delete(settings.task_runs_exchange)
    message = str(stopped.value)
    assert message.startswith("ARBITER_DECLARE_TOPOLOGY=false and the broker has no ")
    assert named in message
    assert "deploy/rabbitmq/definitions.json" in message
