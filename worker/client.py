"""An async executor client: publish a proposal, await its outcome.

Outcomes are matched by proposal id (the outcome's ``message_id``), and
repeated deliveries of one outcome (at-least-once) are dropped. An outcome
published while the client's connection was down is lost with its private reply
queue, so after a reconnect the client publishes every unanswered proposal again:
the same proposal id is processed at most once, so the worker answers a replay. With
``follow_waits`` the proposal asks the pool to follow its WAITs (docs/protocol.md §4.8):
the client sends one proposal and receives one final outcome.

    async with ArbiterClient.connect(amqp_url) as client:
        outcome = await client.propose("flow_run", run_id, ProposedState(type=StateType.RUNNING))
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import TypeAlias

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractRobustConnection,
    FieldValue,
)
from aiormq import spec

from arbiter.schemas import FlowRunSpec, Outcome, ProposedState, RunKind, StateType, TaskRunSpec
from arbiter.worker.broker import PERSISTENT, ClosingRobustConnection, ConfirmingChannels
from arbiter.worker.settings import Settings
from arbiter.worker.topology import Topology, declare_topology
from arbiter.worker.tracing import client_span, inject_current

_SEEN_OUTCOMES = 10_000
Properties: TypeAlias = spec.Basic.Properties


class OutcomeTimeoutError(TimeoutError):
    """No outcome arrived in time; the proposal may still be processed later."""


class ArbiterClient:
    """One connection, one private reply queue, any number of concurrent proposals."""

    def __init__(self, connection: AbstractConnection, settings: Settings) -> None:
        self._connection = connection
        self._settings = settings
        self._reply_key = f"reply.{uuid.uuid4()}"
        # Each unanswered proposal: the future its outcome resolves, and the message (body
        # and properties), kept to publish again after a reconnect.
        self._pending: dict[uuid.UUID, tuple[asyncio.Future[Outcome], bytes, Properties]] = {}
        self._proposals: ConfirmingChannels | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.republished = 0
        self._seen: OrderedDict[uuid.UUID, None] = OrderedDict()
        self._channel: AbstractChannel | None = None
        self._topology: Topology | None = None
        self.duplicates_dropped = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls, amqp_url: str | None = None, settings: Settings | None = None
    ) -> AsyncIterator[ArbiterClient]:
        settings = settings or Settings()
        connection = await aio_pika.connect_robust(
            amqp_url or settings.amqp_url, connection_class=ClosingRobustConnection
        )
        client = cls(connection, settings)
        try:
            await client._start()
            yield client
        finally:
            await connection.close()

    async def _start(self) -> None:
        if isinstance(self._connection, AbstractRobustConnection):
            self._connection.reconnect_callbacks.add(self._on_reconnect)
        self._channel = await self._connection.channel(publisher_confirms=True)
        self._topology = await declare_topology(self._channel, self._settings)
        queue = await self._channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(self._topology.outcomes_exchange, routing_key=self._reply_key)
        await queue.consume(self._on_outcome, no_ack=True)
        # Proposals of concurrent executors leave together (``ConfirmingChannels``).
        self._proposals = await ConfirmingChannels.open(
            self._connection, self._settings.publish_channels
        )

    async def _on_outcome(self, message: AbstractIncomingMessage) -> None:
        outcome = Outcome.model_validate_json(message.body)
        proposal_id = outcome.proposal_id
        if proposal_id is None:
            return
        if proposal_id in self._seen:
            self.duplicates_dropped += 1
            return
        pending = self._pending.pop(proposal_id, None)
        if pending is None:
            return
        future = pending[0]
        self._seen[proposal_id] = None
        if len(self._seen) > _SEEN_OUTCOMES:
            self._seen.popitem(last=False)
        if not future.done():
            future.set_result(outcome)

    async def publish(
        self,
        run_kind: RunKind,
        run_id: uuid.UUID,
        state: ProposedState,
        *,
        run: FlowRunSpec | TaskRunSpec | None = None,
        force: bool = False,
        proposal_id: uuid.UUID | None = None,
        follow_waits: bool = False,
        max_wait_s: float | None = None,
        renew_leases: bool = False,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> asyncio.Future[Outcome]:
        """Publish one proposal (confirmed by the broker); the future resolves with its outcome
        (with ``follow_waits``, the final one: the pool follows the WAITs).

        ``traceparent``/``tracestate`` (W3C) go on as headers; without them, and with
        OpenTelemetry installed, the current span's context does."""
        assert self._topology is not None, "use ArbiterClient.connect()"
        proposal_id = proposal_id or uuid.uuid4()
        body: dict[str, object] = {
            "schema_version": 1,
            "proposal_id": str(proposal_id),
            "run_kind": run_kind,
            "run_id": str(run_id),
            "state": state.model_dump(mode="json", exclude_none=True),
            "force": force,
        }
        if run is not None:
            body["run"] = run.model_dump(mode="json")
        if follow_waits:
            body["follow_waits"] = True
            if max_wait_s is not None:
                body["max_wait_s"] = max_wait_s
        if renew_leases:
            body["renew_leases"] = True
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        traced: dict[str, FieldValue] = (
            {"traceparent": traceparent} if traceparent else {**inject_current()}
        )
        if traceparent and tracestate:
            traced["tracestate"] = tracestate
        encoded = json.dumps(body, separators=(",", ":")).encode()
        properties = Properties(
            content_type="application/json",
            delivery_mode=PERSISTENT,
            message_id=str(proposal_id),
            correlation_id=str(proposal_id),
            reply_to=self._reply_key,
            headers=traced or None,
        )
        self._pending[proposal_id] = (future, encoded, properties)
        try:
            await self._send(encoded, properties)
        except BaseException:
            self._pending.pop(proposal_id, None)
            raise
        return future

    @property
    def unanswered(self) -> int:
        """Proposals published and still waiting for their outcome."""
        return len(self._pending)

    def _on_reconnect(self, *_: object) -> None:
        task = asyncio.get_running_loop().create_task(self._republish_unanswered())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _republish_unanswered(self) -> None:
        """Publish again what is still waiting for an outcome (replays if already processed)."""
        assert self._topology is not None
        for proposal_id, (_, body, properties) in list(self._pending.items()):
            if proposal_id not in self._pending:
                continue  # answered meanwhile
            with contextlib.suppress(Exception):  # down again: the next reconnect retries
                await self._send(body, properties)
                self.republished += 1

    async def _send(self, body: bytes, properties: Properties) -> None:
        """Publish a proposal; returns once the broker has confirmed it."""
        assert self._topology is not None
        assert self._proposals is not None
        await self._proposals.publish(
            self._topology.proposals_exchange.name,
            body,
            properties,
            self._settings.proposals_routing_key,
        )

    async def propose(
        self,
        run_kind: RunKind,
        run_id: uuid.UUID,
        state: ProposedState,
        *,
        run: FlowRunSpec | TaskRunSpec | None = None,
        force: bool = False,
        timeout_s: float = 30.0,
        follow_waits: bool = False,
        max_wait_s: float = 60.0,
    ) -> Outcome:
        """Fire a proposal and await its outcome. With ``follow_waits`` the pool parks the
        proposal after a WAIT and answers once, with the final outcome (or, after
        ``max_wait_s`` in all, the last WAIT): the wait adds to ``timeout_s``.

        With OpenTelemetry installed, a span ``arbiter propose`` covers it, the parent of
        the worker's span for the proposal."""
        proposal_id = uuid.uuid4()
        identity = {"arbiter.run_kind": run_kind, "arbiter.run_id": str(run_id)}
        with client_span("arbiter propose", identity) as span:
            future = await self.publish(
                run_kind,
                run_id,
                state,
                run=run,
                force=force,
                proposal_id=proposal_id,
                follow_waits=follow_waits,
                max_wait_s=max_wait_s if follow_waits else None,
            )
            wait_s = timeout_s + (max_wait_s if follow_waits else 0)
            try:
                outcome = await asyncio.wait_for(future, wait_s)
            except TimeoutError:
                self._pending.pop(proposal_id, None)
                raise OutcomeTimeoutError(
                    f"no outcome for a {run_kind} {run_id} proposal within {wait_s} s"
                ) from None
            if span is not None:
                span.set_attribute("arbiter.proposal_id", str(proposal_id))
                span.set_attribute("arbiter.status", outcome.status.value)
            return outcome

    async def renew_leases(
        self, run_kind: RunKind, run_id: uuid.UUID, *, timeout_s: float = 30.0
    ) -> Outcome:
        """Renew the leases of the slots the run holds (a task working longer than
        ``ARBITER_SLOT_LEASE_TTL_S`` without a transition): ACCEPT, nothing written."""
        proposal_id = uuid.uuid4()
        state = ProposedState(type=StateType.RUNNING)  # not read
        future = await self.publish(
            run_kind, run_id, state, proposal_id=proposal_id, renew_leases=True
        )
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            self._pending.pop(proposal_id, None)
            raise OutcomeTimeoutError(
                f"no answer to a lease renewal of {run_kind} {run_id} within {timeout_s} s"
            ) from None
