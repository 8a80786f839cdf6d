"""The consumer: the one module that acks.

For each delivery the order is fixed: decode → (transaction: lock, orchestrate,
write, record outcome and outbox, commit) → publish the outcome, then the outbox
(events, enqueued task runs), each confirmed by the broker → ack. A crash
anywhere before the ack redelivers the proposal, and the stored outcome and
outbox make the redelivery a replay that publishes both again. Nothing is acked
on cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Callable

import aio_pika
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustConnection,
    DeliveryMode,
)
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from rules.context import OutboxMessage
from rules.engine import Orchestrator
from schemas import ErrorCode, Outcome
from worker.db.errors import refused_content
from worker.db.store import PgStore, ProcessedProposal, is_transient
from worker.decode import Decoded, Invalid, decode_proposal
from worker.metrics import WorkerMetrics
from worker.outcomes import given_up_outcome, invalid_outcome
from worker.settings import Settings
from worker.topology import Topology, declare_topology
from worker.unit_of_work import Processed, purge_cutoff, replay, run_in_transaction

log = logging.getLogger(__name__)

PURGE_INTERVAL_S = 600.0
OUTAGE_PROBE_TIMEOUT_S = 2.0
OUTAGE_FIRST_PROBE_S = 0.5
OUTAGE_MAX_PROBE_S = 5.0


class Consumer:
    """Consumes proposals with bounded concurrency and settles each one exactly once."""

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
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._topology: Topology | None = None
        self._consumer_tag: str | None = None

    async def start(self) -> None:
        channel = await self.connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=self.settings.prefetch)
        self._topology = await declare_topology(channel, self.settings)
        self._consumer_tag = await self._topology.proposals_queue.consume(self._on_delivery)
        log.info(
            "consuming %s (prefetch %d, concurrency %d)",
            self.settings.proposals_queue,
            self.settings.prefetch,
            self.settings.concurrency,
        )

    async def drain(self) -> None:
        """Stop taking deliveries, then let the in-flight ones finish and settle."""
        if self._topology is not None and self._consumer_tag is not None:
            with contextlib.suppress(Exception):
                await self._topology.proposals_queue.cancel(self._consumer_tag)
            self._consumer_tag = None
        while self._in_flight:
            await asyncio.gather(*list(self._in_flight), return_exceptions=True)

    async def _on_delivery(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        try:
            async with self._slots:
                with self.metrics.in_flight.track_inprogress():
                    try:
                        await self.handle(message)
                    except Exception as exc:
                        # A bug must not strand the delivery unacked (and its prefetch slot
                        # with it): give it back, or answer it on its last allowed delivery.
                        await self._unexpected(message, exc)
        finally:
            if task is not None:
                self._in_flight.discard(task)

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """Decode, process, publish, settle: the whole life of one delivery."""
        started = time.perf_counter()
        decoded = decode_proposal(
            message.body,
            content_type=message.content_type,
            message_id=message.message_id,
            max_bytes=self.settings.max_message_bytes,
        )
        if isinstance(decoded, Invalid):
            await self._refuse(message, decoded)
            return
        try:
            processed = await self._process(decoded)
        except Exception as exc:
            await self._failed(message, decoded, exc)
            return
        await self._announce(message, processed, started)

    async def _announce(
        self, message: AbstractIncomingMessage, processed: Processed, started: float
    ) -> None:
        """Publish a committed (or replayed) outcome and its outbox, then ack."""
        if processed.invalid is not None:
            await self._refuse(message, processed.invalid)
            return
        try:
            # The outcome first: an executor waiting on it must not depend on the events
            # exchange. If the outbox then fails, the redelivery publishes both again.
            await self._publish_outcome(message, processed.outcome)
            await self._publish_outbox(processed.outbox)
        except Exception:
            # Committed but not (fully) announced: the redelivery replays the stored
            # outcome and outbox, so nothing is lost; consumers dedupe by message id.
            why = f"proposal {processed.outcome.proposal_id}: publishing failed"
            await self._requeue(message, why)
            return
        await message.ack()
        seconds = time.perf_counter() - started
        self.metrics.settled(processed.outcome, replayed=processed.replayed, seconds=seconds)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s", decision_line(processed, seconds))

    async def _process(self, decoded: Decoded) -> Processed:
        """The proposal's transaction, retried; held through a database outage."""
        try:
            return await self._process_with_retries(decoded)
        except Exception as exc:
            if is_transient(exc) and not await self._database_reachable():
                # An outage, not this proposal's fault: hold the delivery until the database
                # is back instead of spending its delivery attempts (and dead-lettering it).
                return await self._outlast_outage(decoded)
            raise

    async def _failed(
        self, message: AbstractIncomingMessage, decoded: Decoded, exc: Exception
    ) -> None:
        """A proposal whose transaction failed for good on this delivery.

        Content the database refuses fails the same way every time: it is INVALID now. Any
        other failure is requeued, and on the last delivery the queue allows it is answered
        with a final ABORT and dead-lettered, so the executor never waits in silence.
        """
        proposal = decoded.proposal
        refused = refused_content(exc)
        if refused is not None:
            message_text = f"PostgreSQL refused the proposal: {refused}"
            invalid = Invalid(
                ErrorCode.UNSTORABLE,
                message_text,
                proposal.proposal_id,
                proposal.run_kind,
                proposal.run_id,
            )
            await self._refuse(message, invalid)
            return
        if self._last_delivery(message):
            await self._give_up(message, decoded, _describe(exc))
            return
        await self._requeue(message, f"proposal {proposal.proposal_id}: failed")

    async def _unexpected(self, message: AbstractIncomingMessage, exc: Exception) -> None:
        """A bug while handling a delivery: requeued, or answered on its last delivery with
        whatever identity can still be read from it."""
        if not self._last_delivery(message):
            await self._requeue(message, f"delivery {message.message_id}: unexpected error")
            return
        decoded: Decoded | Invalid
        try:
            decoded = decode_proposal(
                message.body,
                content_type=message.content_type,
                message_id=message.message_id,
                max_bytes=self.settings.max_message_bytes,
            )
        except Exception:
            decoded = Invalid(ErrorCode.DELIVERY_LIMIT, "", _message_uuid(message.message_id))
        await self._give_up(message, decoded, _describe(exc))

    def _last_delivery(self, message: AbstractIncomingMessage) -> bool:
        """Whether the queue dead-letters this delivery if it is given back once more
        (a quorum queue counts earlier deliveries in ``x-delivery-count``)."""
        return _delivery_count(message) >= self.settings.delivery_limit

    async def _give_up(
        self, message: AbstractIncomingMessage, decoded: Decoded | Invalid, last_error: str
    ) -> None:
        """Answer a proposal that failed on every allowed delivery, then dead-letter it.

        An earlier delivery may have committed and lost its ack: its stored outcome is
        replayed instead, never contradicted by an ABORT.
        """
        identity = decoded.proposal if isinstance(decoded, Decoded) else decoded
        if isinstance(decoded, Decoded):
            known = await self._find_processed(decoded.proposal.proposal_id)
            if known is not None and known.body_sha256 == decoded.body_sha256:
                await self._announce(message, replay(known), time.perf_counter())
                return
        outcome = given_up_outcome(identity, last_error, _delivery_count(message) + 1)
        try:
            await self._publish_outcome(message, outcome)
            await self._dead_letter(message, ErrorCode.DELIVERY_LIMIT.value, last_error)
        except Exception:
            # The broker refuses publishes too: it dead-letters the delivery itself.
            await self._requeue(message, f"proposal {identity.proposal_id}: giving up failed")
            return
        await message.ack()
        self.metrics.settled(outcome, replayed=False, seconds=0.0)
        log.error(
            "proposal %s: gave up after %d deliveries: %s",
            identity.proposal_id,
            _delivery_count(message) + 1,
            last_error,
        )

    async def _find_processed(self, proposal_id: uuid.UUID) -> ProcessedProposal | None:
        try:
            async with self.engine.connect() as conn:
                return await PgStore(conn).find_processed(proposal_id)
        except Exception:
            return None

    async def _requeue(self, message: AbstractIncomingMessage, why: str) -> None:
        """Give the delivery back to the queue (logging the exception being handled); a nack
        on a channel that is already gone is moot: the broker requeues it anyway."""
        log.exception("%s, requeued", why)
        self.metrics.requeued.inc()
        with contextlib.suppress(Exception):
            await message.nack(requeue=True)

    async def _process_with_retries(self, decoded: Decoded) -> Processed:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.settings.retry_attempts),
            wait=wait_random_exponential(multiplier=0.05, max=self.settings.retry_max_wait_s),
            retry=retry_if_exception(is_transient),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await run_in_transaction(self.engine, self.orchestrator, decoded)
        except RetryError as exc:  # pragma: no cover - reraise=True re-raises the cause
            raise exc.last_attempt.exception() or exc from None
        raise AssertionError("unreachable")

    async def _database_reachable(self) -> bool:
        """Whether a trivial query succeeds now (a new connection if the pooled one died)."""
        try:
            async with asyncio.timeout(OUTAGE_PROBE_TIMEOUT_S), self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception:
            return False
        return True

    async def _outlast_outage(self, decoded: Decoded) -> Processed:
        """Probe the database with capped backoff; once it answers, process the proposal.

        Other deliveries in flight do the same, and the prefetch window stops the broker
        from sending more, so the worker idles through the outage. SIGTERM still ends it
        after ARBITER_SHUTDOWN_TIMEOUT_S; the held deliveries are then redelivered.
        """
        log.warning(
            "proposal %s: the database is unreachable; holding it", decoded.proposal.proposal_id
        )
        delay = OUTAGE_FIRST_PROBE_S
        with self.metrics.held.track_inprogress():
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, OUTAGE_MAX_PROBE_S)
                if not await self._database_reachable():
                    continue
                try:
                    return await self._process_with_retries(decoded)
                except Exception as exc:
                    if not is_transient(exc):
                        raise

    async def _refuse(self, message: AbstractIncomingMessage, invalid: Invalid) -> None:
        """INVALID: publish the outcome, dead-letter a copy with the reason, ack.

        The outcome goes out even when the run kind is unknown and there is no reply_to
        (routing key ``outcome.unknown.invalid``): every proposal gets its one answer.
        """
        outcome = invalid_outcome(invalid)
        await self._publish_outcome(message, outcome)
        await self._dead_letter(message, invalid.code.value, invalid.message)
        await message.ack()
        self.metrics.refused(outcome, invalid.code.value)
        log.warning(
            "invalid proposal %s: %s: %s", invalid.proposal_id, invalid.code, invalid.message
        )

    async def _dead_letter(self, message: AbstractIncomingMessage, code: str, why: str) -> None:
        """A copy of the delivery to the dead-letter exchange, saying why it is there."""
        assert self._topology is not None
        dead = aio_pika.Message(
            body=message.body,
            content_type=message.content_type,
            delivery_mode=DeliveryMode.PERSISTENT,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            headers={
                **(message.headers or {}),
                "x-arbiter-error-code": code,
                "x-arbiter-error-message": why[:1000],
            },
        )
        exchange = self._topology.dead_exchange
        await self._with_retries(lambda: exchange.publish(dead, routing_key=""))
        self.metrics.dead_lettered.labels(code).inc()

    async def _publish_outcome(self, message: AbstractIncomingMessage, outcome: Outcome) -> None:
        assert self._topology is not None
        body = outcome.model_dump_json().encode()
        reply = aio_pika.Message(
            body=body,
            content_type="application/json",
            delivery_mode=DeliveryMode.PERSISTENT,
            correlation_id=message.correlation_id,
            message_id=str(outcome.proposal_id) if outcome.proposal_id else message.message_id,
            headers={"x-arbiter-status": outcome.status.value},
        )
        routing_key = message.reply_to or outcome.routing_key()
        exchange = self._topology.outcomes_exchange
        await self._with_retries(lambda: exchange.publish(reply, routing_key=routing_key))

    async def _publish_outbox(self, outbox: list[OutboxMessage]) -> None:
        assert self._topology is not None
        for item in outbox:
            exchange = (
                self._topology.events_exchange
                if item.channel == "event"
                else self._topology.task_runs_exchange
            )
            body = aio_pika.Message(
                body=json.dumps(item.body, default=str).encode(),
                content_type="application/json",
                delivery_mode=DeliveryMode.PERSISTENT,
                message_id=item.message_id,
            )
            await self._with_retries(
                functools.partial(exchange.publish, body, routing_key=item.routing_key)
            )

    async def _with_retries(self, publish: Callable[[], Awaitable[object]]) -> None:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(self.settings.retry_attempts),
            wait=wait_random_exponential(multiplier=0.05, max=self.settings.retry_max_wait_s),
            reraise=True,
        ):
            with attempt:
                await publish()

    async def purge_forever(self) -> None:
        """Forget processed proposal ids past the retention window, every few minutes."""
        while True:
            try:
                async with self.engine.begin() as conn:
                    cutoff = purge_cutoff(self.orchestrator.clock(), self.settings.retention_days)
                    removed = await PgStore(conn).purge_processed(cutoff)
                if removed:
                    log.info("purged %d processed proposal ids older than %s", removed, cutoff)
            except Exception:
                log.exception("purging processed proposals failed; will try again")
            await asyncio.sleep(PURGE_INTERVAL_S)


def _delivery_count(message: AbstractIncomingMessage) -> int:
    """How often the queue delivered this message before (0 on the first delivery)."""
    count = (message.headers or {}).get("x-delivery-count", 0)
    return count if isinstance(count, int) and not isinstance(count, bool) else 0


def _message_uuid(message_id: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(message_id) if message_id else None
    except ValueError:
        return None


def _describe(exc: BaseException) -> str:
    """An exception as the one line an executor reads in its ABORT."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def decision_line(processed: Processed, seconds: float) -> str:
    """One line per settled proposal (at DEBUG): what was decided, by which rules, how fast."""
    outcome = processed.outcome
    state = outcome.state
    written = f"{state.type.value} {state.name!r}" if state is not None else "no state"
    if processed.replayed:
        why = "replay of the stored outcome"
    else:
        why = ", ".join(f"{t.rule} {t.effect.value}" for t in outcome.rule_trace) or "no rule"
    return (
        f"{outcome.run_kind} {outcome.run_id} proposal {outcome.proposal_id}: "
        f"{outcome.status.value} -> {written} [{why}] in {seconds * 1000:.1f} ms"
    )


async def run_worker(settings: Settings, *, stop: asyncio.Event | None = None) -> int:
    """Run one worker until SIGTERM/SIGINT (or ``stop``), drain, and return the exit code."""
    from worker.runtime import ServiceError

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    metrics = WorkerMetrics()
    if settings.metrics_port is not None:
        try:
            port = metrics.serve(settings.metrics_port)
        except OSError as exc:
            message = f"ARBITER_METRICS_PORT: cannot serve metrics on port {settings.metrics_port}"
            raise ServiceError(f"{message}: {exc.strerror or exc}") from None
        log.info("metrics on http://0.0.0.0:%d/metrics", port)
    try:
        return await _consume_until_stopped(settings, metrics, stop)
    finally:
        metrics.close()


async def _consume_until_stopped(
    settings: Settings, metrics: WorkerMetrics, stop: asyncio.Event
) -> int:
    from worker.runtime import build_runtime

    async with build_runtime(settings) as runtime:
        consumer = Consumer(
            settings, runtime.engine, runtime.orchestrator, runtime.connection, metrics
        )
        await consumer.start()
        purger = asyncio.create_task(consumer.purge_forever())
        await stop.wait()
        log.info("stopping: draining %d in-flight proposals", len(consumer._in_flight))
        try:
            await asyncio.wait_for(consumer.drain(), settings.shutdown_timeout_s)
        except TimeoutError:
            # Typically the broker is unreachable. Nothing is lost: whatever was not acked
            # is redelivered to another worker, and committed work replays its outcome.
            log.warning(
                "stopping: gave up after %.0f s (ARBITER_SHUTDOWN_TIMEOUT_S) with %d"
                " proposals unsettled; the broker will redeliver them",
                settings.shutdown_timeout_s,
                len(consumer._in_flight),
            )
        purger.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await purger
        invalid = metrics.total("arbiter_invalid_proposals")
        log.info(
            "stopped after %d proposals (%d replays, %d invalid, %d requeued)",
            metrics.total("arbiter_outcomes") - invalid,
            metrics.total("arbiter_replays"),
            invalid,
            metrics.total("arbiter_requeued"),
        )
    return 0
