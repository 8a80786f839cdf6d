"""Everything a worker publishes: outcomes, outboxes and dead letters, each confirmed by the
broker and retried through brief faults."""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable

from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, FieldValue
from aiormq import spec
from tenacity import AsyncRetrying, stop_after_attempt, wait_random_exponential

from arbiter.rules.context import OutboxMessage
from arbiter.schemas import Outcome
from arbiter.worker import headers
from arbiter.worker.broker import PERSISTENT, ConfirmingChannels
from arbiter.worker.settings import Settings
from arbiter.worker.topology import Topology
from arbiter.worker.tracing import trace_headers

__all__ = ["Publisher"]


class Publisher:
    """Publishes on the worker's confirming channel; every method raises once retries
    are spent, and the caller then requeues the delivery. Outcomes and outboxes carry the
    trace headers of the proposal being answered (``worker/tracing.py``)."""

    def __init__(
        self,
        settings: Settings,
        topology: Topology,
        channels: ConfirmingChannels | None = None,
    ) -> None:
        """``channels``: the confirming channels to publish on in turn
        (ARBITER_PUBLISH_CHANNELS); by default the one the topology was declared on."""
        self.settings = settings
        self.topology = topology
        self.channels = channels or ConfirmingChannels([topology.channel])

    async def outcome(
        self, message: AbstractIncomingMessage, outcome: Outcome, outcome_json: str | None = None
    ) -> None:
        """The answer to ``message``: to its reply_to, else ``outcome.<kind>.<status>``.
        ``outcome_json``: the outcome already serialised (as stored), sent as is."""
        body = (outcome_json or outcome.model_dump_json()).encode()
        properties = spec.Basic.Properties(
            content_type="application/json",
            delivery_mode=PERSISTENT,
            correlation_id=message.correlation_id,
            message_id=str(outcome.proposal_id) if outcome.proposal_id else message.message_id,
            headers={headers.STATUS: outcome.status.value, **trace_headers()},
        )
        routing_key = message.reply_to or outcome.routing_key()
        exchange = self.topology.outcomes_exchange
        await self._with_retries(lambda: self.send(exchange, body, properties, routing_key))

    async def outbox(self, outbox: list[OutboxMessage]) -> None:
        """A transaction's events and enqueued task runs, in order."""
        traced: dict[str, FieldValue] | None = {**trace_headers()} or None
        for item in outbox:
            exchange = (
                self.topology.events_exchange
                if item.channel == "event"
                else self.topology.task_runs_exchange
            )
            properties = spec.Basic.Properties(
                content_type="application/json",
                delivery_mode=PERSISTENT,
                message_id=item.message_id,
                headers=traced,
            )
            body = json.dumps(item.body, default=str).encode()
            # An event nobody subscribes to is dropped by the broker; as mandatory, it would
            # come back as a Basic.Return for nothing (returns are not acted on).
            await self._with_retries(
                functools.partial(
                    self.send,
                    exchange,
                    body,
                    properties,
                    item.routing_key,
                    mandatory=item.channel != "event",
                )
            )

    async def dead_letter(self, message: AbstractIncomingMessage, code: str, why: str) -> None:
        """A copy of the delivery to the dead-letter exchange, saying why it is there."""
        properties = spec.Basic.Properties(
            content_type=message.content_type,
            delivery_mode=PERSISTENT,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            headers={
                **(message.headers or {}),
                headers.ERROR_CODE: code,
                headers.ERROR_MESSAGE: why[:1000],
            },
        )
        exchange = self.topology.dead_exchange
        await self._with_retries(lambda: self.send(exchange, message.body, properties, ""))

    async def send(
        self,
        exchange: AbstractExchange,
        body: bytes,
        properties: spec.Basic.Properties,
        routing_key: str,
        *,
        mandatory: bool = True,
    ) -> None:
        """Publish once, confirmed, on the next of the worker's channels."""
        await self.channels.publish(
            exchange.name, body, properties, routing_key, mandatory=mandatory
        )

    async def _with_retries(self, publish: Callable[[], Awaitable[object]]) -> None:
        """Publish; through a brief fault, again with backoff. The first try goes without
        tenacity's bookkeeping, which costs more CPU than the publish on the hot path."""
        try:
            await publish()
            return
        except Exception:
            if self.settings.retry_attempts <= 1:
                raise
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(self.settings.retry_attempts - 1),
            wait=wait_random_exponential(multiplier=0.05, max=self.settings.retry_max_wait_s),
            reraise=True,
        ):
            with attempt:
                await publish()
