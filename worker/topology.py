"""The broker topology of docs/protocol.md §1: declared idempotently by workers and clients,
or, with ``ARBITER_DECLARE_TOPOLOGY=false``, only checked (an admin declared it; see
deploy/rabbitmq)."""

from __future__ import annotations

from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue
from aiormq.abc import FieldTable
from aiormq.exceptions import ChannelNotFoundEntity

from arbiter.worker.settings import Settings


class TopologyMissing(Exception):
    """A passive declare found no such exchange or queue; the message says what to load."""


@dataclass(frozen=True)
class Topology:
    """The declared exchanges and queues a worker or client publishes to and consumes from,
    and the channel they were declared on (publishes go through it)."""

    channel: AbstractChannel
    proposals_exchange: AbstractExchange
    proposals_queue: AbstractQueue
    outcomes_exchange: AbstractExchange
    dead_exchange: AbstractExchange
    events_exchange: AbstractExchange
    task_runs_exchange: AbstractExchange


def proposals_queue_arguments(settings: Settings) -> FieldTable:
    """The quorum queue's arguments; a client declaring them must use the same ones."""
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": settings.dead_exchange,
        "x-delivery-limit": settings.delivery_limit,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


async def declare_topology(channel: AbstractChannel, settings: Settings) -> Topology:
    """Declare every exchange and queue with the contract's arguments (safe to repeat); with
    ``declare_topology`` off, look each one up passively instead (no configure permission)."""
    if not settings.declare_topology:
        return await _look_up_topology(channel, settings)
    proposals_exchange = await channel.declare_exchange(
        settings.proposals_exchange, aio_pika.ExchangeType.DIRECT, durable=True
    )
    outcomes_exchange = await channel.declare_exchange(
        settings.outcomes_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    dead_exchange = await channel.declare_exchange(
        settings.dead_exchange, aio_pika.ExchangeType.FANOUT, durable=True
    )
    events_exchange = await channel.declare_exchange(
        settings.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    task_runs_exchange = await channel.declare_exchange(
        settings.task_runs_exchange, aio_pika.ExchangeType.DIRECT, durable=True
    )
    dead_queue = await channel.declare_queue(
        settings.dead_queue, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dead_queue.bind(dead_exchange, routing_key="")
    proposals_queue = await channel.declare_queue(
        settings.proposals_queue, durable=True, arguments=proposals_queue_arguments(settings)
    )
    await proposals_queue.bind(proposals_exchange, routing_key=settings.proposals_routing_key)
    return Topology(
        channel=channel,
        proposals_exchange=proposals_exchange,
        proposals_queue=proposals_queue,
        outcomes_exchange=outcomes_exchange,
        dead_exchange=dead_exchange,
        events_exchange=events_exchange,
        task_runs_exchange=task_runs_exchange,
    )


async def _look_up_topology(channel: AbstractChannel, settings: Settings) -> Topology:
    """Passive declares: RabbitMQ checks no permission for them, and they create nothing."""
    kind = "exchange"
    name = settings.proposals_exchange
    try:
        exchanges = []
        for name in (
            settings.proposals_exchange,
            settings.outcomes_exchange,
            settings.dead_exchange,
            settings.events_exchange,
            settings.task_runs_exchange,
        ):
            exchanges.append(await channel.declare_exchange(name, passive=True))
        kind, name = "queue", settings.proposals_queue
        proposals_queue = await channel.declare_queue(name, passive=True)
    except ChannelNotFoundEntity:
        raise TopologyMissing(
            f"ARBITER_DECLARE_TOPOLOGY=false and the broker has no {kind} {name!r}: load the"
            " topology first (deploy/rabbitmq/definitions.json)"
        ) from None
    proposals, outcomes, dead, events, task_runs = exchanges
    return Topology(
        channel=channel,
        proposals_exchange=proposals,
        proposals_queue=proposals_queue,
        outcomes_exchange=outcomes,
        dead_exchange=dead,
        events_exchange=events,
        task_runs_exchange=task_runs,
    )
