"""The consumer: the one module that acks.

Deliveries are grouped into batches of up to ``ARBITER_BATCH_MAX``, and up to
``ARBITER_CONCURRENCY`` batches run at once (``batching.py`` says when a batch goes).
For each batch the order is fixed: decode → one transaction (lock the runs, orchestrate
each proposal in delivery order, write everything, record outcomes and outboxes, commit)
→ publish every outcome, then its outbox, confirms in flight together → ack each. A
crash anywhere before an ack redelivers the proposal, and the stored outcome and outbox
make the redelivery a replay. Nothing is acked on cancellation.

A proposal does not suffer for its neighbours: a rule's error re-runs the batch with
that proposal answered ABORT; any other failure splits the batch until the culprit is
alone, and only it is retried, requeued, refused or (on its last delivery) given up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aiormq.exceptions import AMQPConnectionError
from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from arbiter.rules.engine import Orchestrator
from arbiter.worker.acks import Acker
from arbiter.worker.answers import Answers, describe
from arbiter.worker.batch import RuleFailed, process_batch
from arbiter.worker.batching import Batcher
from arbiter.worker.broker import ConfirmingChannels
from arbiter.worker.db.store import PgStore, is_transient
from arbiter.worker.db.transaction import HeldConnections, store_transaction
from arbiter.worker.decode import Decoded, Invalid, decode_proposal
from arbiter.worker.diagnostics import describe_tasks
from arbiter.worker.metrics import WorkerMetrics
from arbiter.worker.outage import database_answers, hold_until_database_answers
from arbiter.worker.parking import with_reply_route
from arbiter.worker.publisher import Publisher
from arbiter.worker.settings import Settings
from arbiter.worker.topology import Topology, declare_topology
from arbiter.worker.tracing import ProposalTrace, Tracing, current, trace_context
from arbiter.worker.unit_of_work import Processed

log = logging.getLogger(__name__)

STARTUP_RETRY_S = 60.0  # a broker connection lost while starting: how long to keep trying
CANCEL_TIMEOUT_S = 2.0

# What a transaction gives each proposal: its answer, None when its run was held by another
# transaction (settled alone afterwards), or the exception that failed it alone.
Result = Processed | None | Exception


class Consumer:
    """Consumes proposals in batches and settles each one exactly once."""

    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        orchestrator: Orchestrator,
        connection: AbstractRobustConnection,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.orchestrator = orchestrator
        self.connection = connection
        self.metrics = metrics or WorkerMetrics()
        self.tracing = Tracing(settings.tracing)
        self._batcher = Batcher(
            self._settle,
            concurrency=settings.concurrency,
            batch_max=settings.batch_max,
            wait_s=settings.batch_wait_ms / 1000,
            window_full=lambda: self._unsettled >= settings.prefetch,
        )
        self._unsettled = 0  # delivered and not yet acked or given back
        self.acker = Acker()
        self._held = HeldConnections(engine)  # the batches' connections, kept between them
        self._dispatcher: asyncio.Task[None] | None = None
        self._topology: Topology | None = None
        self._answers: Answers | None = None
        self._consumer_tag: str | None = None

    @property
    def answers(self) -> Answers:
        assert self._answers is not None, "start() first"
        return self._answers

    def _lost_connection(self, exc: BaseException) -> bool:
        # aiormq refuses a channel on a connection that just died with a RuntimeError
        # "<Connection ...> closed", before aio-pika has marked the robust one reconnecting.
        return isinstance(exc, AMQPConnectionError | ConnectionError) or (
            isinstance(exc, RuntimeError)
            and (
                self.connection.is_closed
                or not self.connection.connected.is_set()
                or str(exc).endswith(" closed")
            )
        )

    @property
    def unsettled(self) -> int:
        return self._unsettled

    async def start(self) -> None:
        """Open the channel and find the topology, through a connection lost meanwhile (the
        robust connection is reconnecting: a new try waits for it), then consume."""
        retrying = AsyncRetrying(
            stop=stop_after_delay(STARTUP_RETRY_S),
            wait=wait_random_exponential(multiplier=0.2, max=5),
            retry=retry_if_exception(self._lost_connection),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                channel = await self.connection.channel(publisher_confirms=True)
                await channel.set_qos(prefetch_count=self.settings.prefetch)
                topology = await declare_topology(channel, self.settings)
                publishing = await ConfirmingChannels.open(
                    self.connection, self.settings.publish_channels
                )
        self._topology = topology
        publisher = Publisher(self.settings, topology, publishing)
        self._answers = Answers(
            self.settings,
            self.engine,
            self.metrics,
            publisher,
            self._decode,
            self._settled,
            self.acker,
        )
        self._dispatcher = asyncio.create_task(self._batcher.run())
        self._consumer_tag = await topology.proposals_queue.consume(self._on_delivery)
        log.info(
            "consuming %s (prefetch %d, %d batches of up to %d at once)",
            self.settings.proposals_queue,
            self.settings.prefetch,
            self.settings.concurrency,
            self.settings.batch_max,
        )

    async def consuming(self) -> bool:
        """Whether the broker delivers to us now: not after it cancelled our consumer (its
        queue was deleted, say) until the robust channel consumes again. Readiness asks."""
        if self._topology is None or self._consumer_tag is None:
            return False
        channel = await self._topology.proposals_queue.channel.get_underlay_channel()
        return self._consumer_tag in getattr(channel, "consumers", {})

    async def drain(self) -> None:
        """Stop taking deliveries, then let every delivered one settle."""
        if self._topology is not None and self._consumer_tag is not None:
            # Bounded: on a connection that is down, aio-pika waits for the reconnect to
            # cancel, and a drain stuck there would settle nothing. A broker that cannot be
            # told stops delivering with the connection anyway.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CANCEL_TIMEOUT_S):
                    await self._topology.proposals_queue.cancel(self._consumer_tag)
            self._consumer_tag = None
        await self._batcher.settled()
        await self.close_connections()
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher

    async def close_connections(self) -> None:
        """Return the connections kept between batches to the pool (one still in use goes
        back when its batch ends)."""
        await self._held.close()

    def describe_unsettled(self) -> str:
        """Where each batch still unsettled waits, and every other task of the loop: what a
        drain that timed out waited for."""
        return describe_tasks(self._batcher.in_flight)

    async def _on_delivery(self, message: AbstractIncomingMessage) -> None:
        self._unsettled += 1
        self.acker.delivered(message)
        self.metrics.in_flight.inc()
        self._batcher.put(message)

    def _settled(self, count: int = 1) -> None:
        self._unsettled -= count
        self.metrics.in_flight.dec(count)

    # -- settling a batch ----------------------------------------------------------------------

    async def _settle(self, messages: list[AbstractIncomingMessage]) -> None:
        """Decode, process in one transaction, then answer each delivery."""
        started = time.perf_counter()
        traces = {id(m): self.tracing.begin(m.headers) for m in messages}
        valid: list[tuple[AbstractIncomingMessage, Decoded]] = []
        refusals = []
        for message in messages:
            trace = traces[id(message)]
            try:
                with self.tracing.phase(trace, "decode"):
                    decoded = self._decode(message)
            except Exception as exc:
                refusal = self.answers.unexpected(message, exc)
                refusals.append(self._guarded(message, refusal, trace))
                continue
            self.tracing.identify(trace, decoded)
            if isinstance(decoded, Invalid):
                refusal = self.answers.refuse(message, decoded)
                refusals.append(self._guarded(message, refusal, trace))
            else:
                valid.append((message, decoded))
        await asyncio.gather(*refusals)
        if not valid:
            return
        began = time.time_ns()
        try:
            results: Sequence[Result] = await self._process_many([d for _, d in valid])
        except Exception as exc:  # a bug: no delivery may be stranded unacked
            results = [exc] * len(valid)
        self.tracing.shared_phase([traces[id(m)] for m, _ in valid], began, time.time_ns())
        held = [(m, d) for (m, d), result in zip(valid, results, strict=True) if result is None]
        await asyncio.gather(
            *(
                self._guarded(
                    message, self._conclude(message, decoded, result, started), traces[id(message)]
                )
                for (message, decoded), result in zip(valid, results, strict=True)
                if result is not None
            )
        )
        for message, decoded in held:
            [result] = await self._process_many([decoded])
            concluded = self._conclude(message, decoded, result, started)
            await self._guarded(message, concluded, traces[id(message)])

    def _decode(self, message: AbstractIncomingMessage) -> Decoded | Invalid:
        decoded = decode_proposal(
            message.body,
            content_type=message.content_type,
            message_id=message.message_id,
            max_bytes=self.settings.max_message_bytes,
        )
        if isinstance(decoded, Decoded) and decoded.proposal.follow_waits:
            # Kept with the proposal if it is parked: its final outcome goes there.
            route = (message.reply_to, message.correlation_id, trace_context(message.headers))
            return with_reply_route(decoded, *route)
        return decoded

    async def _guarded(
        self, message: AbstractIncomingMessage, settling: object, trace: ProposalTrace
    ) -> None:
        """Run one delivery's settling, in a task of its own, under its trace (publishes
        carry it, log lines name it); a bug in it requeues (or gives up) that delivery."""
        assert asyncio.iscoroutine(settling)
        current.set(trace)
        try:
            with self.tracing.phase(trace, "publish"):
                await settling
        except Exception as exc:
            await self.answers.unexpected(message, exc)
        finally:
            self.tracing.end(trace)

    async def _conclude(
        self, message: AbstractIncomingMessage, decoded: Decoded, result: Result, started: float
    ) -> None:
        if isinstance(result, Exception):
            await self.answers.failed(message, decoded, result)
        elif result is not None:
            await self.answers.announce(message, result, started)

    async def _process_many(self, batch: list[Decoded]) -> list[Result]:
        """The batch's transaction; held through a database outage; split around failures."""
        while True:
            try:
                return list(await self._attempts(batch))
            except Exception as exc:
                if is_transient(exc) and not await database_answers(self.engine):
                    # An outage, not these proposals' fault: hold them until the database
                    # is back instead of spending their delivery attempts.
                    await hold_until_database_answers(self.engine, self.metrics, len(batch))
                    continue
                if len(batch) == 1:
                    return [exc]
                log.info("a batch of %d failed (%s); splitting it", len(batch), describe(exc))
                half = len(batch) // 2
                return [
                    *await self._process_many(batch[:half]),
                    *await self._process_many(batch[half:]),
                ]

    async def _attempts(self, batch: list[Decoded]) -> list[Processed | None]:
        """A batch of one is retried through transient faults; a larger one is split."""
        if len(batch) > 1:
            return await self._transaction(batch)
        try:  # the first try without tenacity's bookkeeping (most succeed)
            return await self._transaction(batch)
        except Exception as exc:
            if not is_transient(exc) or self.settings.retry_attempts <= 1:
                raise
        await asyncio.sleep(random.uniform(0, 0.05))  # tenacity's first wait, as before
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.settings.retry_attempts - 1),
            wait=wait_random_exponential(multiplier=0.05, max=self.settings.retry_max_wait_s),
            retry=retry_if_exception(is_transient),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._transaction(batch)
        raise AssertionError("unreachable")

    async def _transaction(self, batch: list[Decoded]) -> list[Processed | None]:
        """One transaction for the batch. A rule's own error rolls back and runs the batch
        again with that proposal answered by a stored ABORT."""
        aborts: dict[int, str] = {}
        while True:
            store: PgStore | None = None
            try:
                transaction = store_transaction(self.engine, generic_plans=True, held=self._held)
                async with transaction as store:
                    results = await process_batch(store, self.orchestrator, batch, aborts)
                self.metrics.batch_size.observe(len(batch))
                return results
            except RuleFailed as failure:
                proposal_id = batch[failure.index].proposal.proposal_id
                log.error("orchestration of %s failed", proposal_id, exc_info=failure.cause)
                aborts[failure.index] = f"Aborting orchestration due to error: {failure.cause!r}"
            finally:
                if store is not None:
                    self.metrics.statements.inc(store.statements)
