"""The consumer: the one module that acks.

Deliveries wait in an inbox; a dispatcher takes what is waiting (up to
``ARBITER_BATCH_MAX``) as one batch, and up to ``ARBITER_CONCURRENCY`` batches run at
once. For each batch the order is fixed: decode → one transaction (lock the runs,
orchestrate each proposal in delivery order, write everything, record outcomes and
outboxes, commit) → publish every outcome, then its outbox, confirms in flight together
→ ack each. A crash anywhere before an ack redelivers the proposal, and the stored
outcome and outbox make the redelivery a replay. Nothing is acked on cancellation.

A proposal does not suffer for its neighbours: a rule's error re-runs the batch with
that proposal answered ABORT; any other failure splits the batch until the culprit is
alone, and only it is retried, requeued, refused or (on its last delivery) given up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from collections.abc import Sequence

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from rules.engine import Orchestrator
from schemas import ErrorCode
from worker.batch import RuleFailed, process_batch
from worker.db.errors import refused_content
from worker.db.store import PgStore, ProcessedProposal, is_transient
from worker.decode import Decoded, Invalid, decode_proposal
from worker.metrics import WorkerMetrics
from worker.outcomes import given_up_outcome, invalid_outcome
from worker.publisher import Publisher
from worker.settings import Settings
from worker.topology import Topology, declare_topology
from worker.unit_of_work import Processed, purge_cutoff, replay

log = logging.getLogger(__name__)

PURGE_INTERVAL_S = 600.0
OUTAGE_PROBE_TIMEOUT_S = 2.0
OUTAGE_FIRST_PROBE_S = 0.5
OUTAGE_MAX_PROBE_S = 5.0

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
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._batches: set[asyncio.Task[None]] = set()
        self._unsettled = 0  # delivered and not yet acked or given back
        self._dispatcher: asyncio.Task[None] | None = None
        self._topology: Topology | None = None
        self._publisher: Publisher | None = None
        self._consumer_tag: str | None = None

    @property
    def publisher(self) -> Publisher:
        assert self._publisher is not None, "start() first"
        return self._publisher

    @property
    def unsettled(self) -> int:
        return self._unsettled

    async def start(self) -> None:
        channel = await self.connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=self.settings.prefetch)
        self._topology = await declare_topology(channel, self.settings)
        self._publisher = Publisher(self.settings, self._topology)
        self._dispatcher = asyncio.create_task(self._dispatch())
        self._consumer_tag = await self._topology.proposals_queue.consume(self._on_delivery)
        log.info(
            "consuming %s (prefetch %d, %d batches of up to %d at once)",
            self.settings.proposals_queue,
            self.settings.prefetch,
            self.settings.concurrency,
            self.settings.batch_max,
        )

    async def drain(self) -> None:
        """Stop taking deliveries, then let every delivered one settle."""
        if self._topology is not None and self._consumer_tag is not None:
            with contextlib.suppress(Exception):
                await self._topology.proposals_queue.cancel(self._consumer_tag)
            self._consumer_tag = None
        while not self._inbox.empty() or self._batches:
            if self._batches:
                await asyncio.gather(*list(self._batches), return_exceptions=True)
            else:
                await asyncio.sleep(0.01)
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher

    async def _on_delivery(self, message: AbstractIncomingMessage) -> None:
        self._unsettled += 1
        self.metrics.in_flight.inc()
        self._inbox.put_nowait(message)

    # -- batching ------------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        """Take what waits in the inbox as one batch whenever a transaction slot is free."""
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            try:
                batch = [await self._inbox.get()]
            except asyncio.CancelledError:
                self._slots.release()
                raise
            self._take_waiting(batch)
            if self._worth_waiting(batch):
                deadline = loop.time() + self.settings.batch_wait_ms / 1000
                while len(batch) < self.settings.batch_max:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(self._inbox.get(), remaining))
                    except TimeoutError:
                        break
                    self._take_waiting(batch)
            task = asyncio.create_task(self._settle(batch))
            self._batches.add(task)
            task.add_done_callback(self._batch_done)

    def _take_waiting(self, batch: list[AbstractIncomingMessage]) -> None:
        while len(batch) < self.settings.batch_max and not self._inbox.empty():
            batch.append(self._inbox.get_nowait())

    def _worth_waiting(self, batch: list[AbstractIncomingMessage]) -> bool:
        """Wait a moment for more only while other batches run (an idle worker answers at
        once) and more can still arrive (the prefetch window is not full)."""
        return (
            self.settings.batch_wait_ms > 0
            and len(batch) < self.settings.batch_max
            and bool(self._batches)
            and self._unsettled < self.settings.prefetch
        )

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        self._slots.release()

    def _settled(self, count: int = 1) -> None:
        self._unsettled -= count
        self.metrics.in_flight.dec(count)

    # -- settling a batch ----------------------------------------------------------------------

    async def _settle(self, messages: list[AbstractIncomingMessage]) -> None:
        """Decode, process in one transaction, then answer each delivery."""
        started = time.perf_counter()
        valid: list[tuple[AbstractIncomingMessage, Decoded]] = []
        refusals = []
        for message in messages:
            try:
                decoded = self._decode(message)
            except Exception as exc:
                refusals.append(self._guarded(message, self._unexpected(message, exc)))
                continue
            if isinstance(decoded, Invalid):
                refusals.append(self._guarded(message, self._refuse(message, decoded)))
            else:
                valid.append((message, decoded))
        await asyncio.gather(*refusals)
        if not valid:
            return
        try:
            results: Sequence[Result] = await self._process_many([d for _, d in valid])
        except Exception as exc:  # a bug: no delivery may be stranded unacked
            results = [exc] * len(valid)
        held = [(m, d) for (m, d), result in zip(valid, results, strict=True) if result is None]
        await asyncio.gather(
            *(
                self._guarded(message, self._conclude(message, decoded, result, started))
                for (message, decoded), result in zip(valid, results, strict=True)
                if result is not None
            )
        )
        for message, decoded in held:
            [result] = await self._process_many([decoded])
            await self._guarded(message, self._conclude(message, decoded, result, started))

    def _decode(self, message: AbstractIncomingMessage) -> Decoded | Invalid:
        return decode_proposal(
            message.body,
            content_type=message.content_type,
            message_id=message.message_id,
            max_bytes=self.settings.max_message_bytes,
        )

    async def _guarded(self, message: AbstractIncomingMessage, settling: object) -> None:
        """Run one delivery's settling; a bug in it requeues (or gives up) that delivery."""
        assert asyncio.iscoroutine(settling)
        try:
            await settling
        except Exception as exc:
            await self._unexpected(message, exc)

    async def _conclude(
        self, message: AbstractIncomingMessage, decoded: Decoded, result: Result, started: float
    ) -> None:
        if isinstance(result, Exception):
            await self._failed(message, decoded, result)
        elif result is not None:
            await self._announce(message, result, started)

    async def _process_many(self, batch: list[Decoded]) -> list[Result]:
        """The batch's transaction; held through a database outage; split around failures."""
        while True:
            try:
                return list(await self._attempts(batch))
            except Exception as exc:
                if is_transient(exc) and not await self._database_reachable():
                    # An outage, not these proposals' fault: hold them until the database
                    # is back instead of spending their delivery attempts.
                    await self._await_database(len(batch))
                    continue
                if len(batch) == 1:
                    return [exc]
                log.info("a batch of %d failed (%s); splitting it", len(batch), _describe(exc))
                half = len(batch) // 2
                return [
                    *await self._process_many(batch[:half]),
                    *await self._process_many(batch[half:]),
                ]

    async def _attempts(self, batch: list[Decoded]) -> list[Processed | None]:
        """A batch of one is retried through transient faults; a larger one is split."""
        if len(batch) > 1:
            return await self._transaction(batch)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.settings.retry_attempts),
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
                async with self.engine.begin() as conn:
                    store = PgStore(conn)
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

    async def _database_reachable(self) -> bool:
        """Whether a trivial query succeeds now (a new connection if the pooled one died)."""
        try:
            async with asyncio.timeout(OUTAGE_PROBE_TIMEOUT_S), self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception:
            return False
        return True

    async def _await_database(self, held: int) -> None:
        """Probe the database with capped backoff until it answers.

        Other batches do the same, and the prefetch window stops the broker from sending
        more, so the worker idles through the outage. SIGTERM still ends it after
        ARBITER_SHUTDOWN_TIMEOUT_S; the held deliveries are then redelivered.
        """
        log.warning("the database is unreachable; holding %d proposals", held)
        delay = OUTAGE_FIRST_PROBE_S
        self.metrics.held.inc(held)
        try:
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, OUTAGE_MAX_PROBE_S)
                if await self._database_reachable():
                    return
        finally:
            self.metrics.held.dec(held)

    # -- answering one delivery ----------------------------------------------------------------

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
            await self.publisher.outcome(message, processed.outcome)
            await self.publisher.outbox(processed.outbox)
        except Exception as exc:
            # Committed but not (fully) announced: the redelivery replays the stored
            # outcome and outbox, so nothing is lost; consumers dedupe by message id.
            why = f"proposal {processed.outcome.proposal_id}: publishing failed"
            await self._requeue(message, why, exc)
            return
        await message.ack()
        self._settled()
        seconds = time.perf_counter() - started
        self.metrics.settled(processed.outcome, replayed=processed.replayed, seconds=seconds)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s", decision_line(processed, seconds))

    async def _failed(
        self, message: AbstractIncomingMessage, decoded: Decoded, exc: Exception
    ) -> None:
        """A proposal whose transaction failed for good on this delivery, alone.

        Content the database refuses fails the same way every time: it is INVALID now. Any
        other failure is requeued, and on the last delivery the queue allows it is answered
        with a final ABORT and dead-lettered, so the executor never waits in silence.
        """
        proposal = decoded.proposal
        refused = refused_content(exc)
        if refused is not None:
            invalid = Invalid(
                ErrorCode.UNSTORABLE,
                f"PostgreSQL refused the proposal: {refused}",
                proposal.proposal_id,
                proposal.run_kind,
                proposal.run_id,
            )
            await self._refuse(message, invalid)
            return
        if self._last_delivery(message):
            await self._give_up(message, decoded, _describe(exc))
            return
        await self._requeue(message, f"proposal {proposal.proposal_id}: failed", exc)

    async def _unexpected(self, message: AbstractIncomingMessage, exc: Exception) -> None:
        """A bug while handling a delivery: requeued, or answered on its last delivery with
        whatever identity can still be read from it."""
        if not self._last_delivery(message):
            await self._requeue(message, f"delivery {message.message_id}: unexpected error", exc)
            return
        decoded: Decoded | Invalid
        try:
            decoded = self._decode(message)
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
        deliveries = _delivery_count(message) + 1
        outcome = given_up_outcome(identity, last_error, deliveries)
        try:
            await self.publisher.outcome(message, outcome)
            await self.publisher.dead_letter(message, ErrorCode.DELIVERY_LIMIT.value, last_error)
        except Exception as exc:
            # The broker refuses publishes too: it dead-letters the delivery itself.
            why = f"proposal {identity.proposal_id}: giving up failed"
            await self._requeue(message, why, exc)
            return
        await message.ack()
        self._settled()
        self.metrics.dead_lettered.labels(ErrorCode.DELIVERY_LIMIT.value).inc()
        self.metrics.settled(outcome, replayed=False, seconds=0.0)
        log.error(
            "proposal %s: gave up after %d deliveries: %s",
            identity.proposal_id,
            deliveries,
            last_error,
        )

    async def _find_processed(self, proposal_id: uuid.UUID) -> ProcessedProposal | None:
        try:
            async with self.engine.connect() as conn:
                return await PgStore(conn).find_processed(proposal_id)
        except Exception:
            return None

    async def _requeue(
        self, message: AbstractIncomingMessage, why: str, exc: BaseException
    ) -> None:
        """Give the delivery back to the queue; a nack on a channel that is already gone is
        moot: the broker requeues it anyway."""
        log.error("%s, requeued", why, exc_info=exc)
        self.metrics.requeued.inc()
        self._settled()
        with contextlib.suppress(Exception):
            await message.nack(requeue=True)

    async def _refuse(self, message: AbstractIncomingMessage, invalid: Invalid) -> None:
        """INVALID: publish the outcome, dead-letter a copy with the reason, ack.

        The outcome goes out even when the run kind is unknown and there is no reply_to
        (routing key ``outcome.unknown.invalid``): every proposal gets its one answer.
        """
        outcome = invalid_outcome(invalid)
        await self.publisher.outcome(message, outcome)
        await self.publisher.dead_letter(message, invalid.code.value, invalid.message)
        await message.ack()
        self._settled()
        self.metrics.dead_lettered.labels(invalid.code.value).inc()
        self.metrics.refused(outcome, invalid.code.value)
        log.warning(
            "invalid proposal %s: %s: %s", invalid.proposal_id, invalid.code, invalid.message
        )

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


async def run_worker(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    metrics: WorkerMetrics | None = None,
) -> int:
    """Run one worker until SIGTERM/SIGINT (or ``stop``), drain, and return the exit code.
    ``metrics`` lets an in-process caller (a test) read the worker's counters."""
    from worker.runtime import ServiceError

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    metrics = metrics or WorkerMetrics()
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
        log.info("stopping: draining %d in-flight proposals", consumer.unsettled)
        try:
            await asyncio.wait_for(consumer.drain(), settings.shutdown_timeout_s)
        except TimeoutError:
            # Typically the broker is unreachable. Nothing is lost: whatever was not acked
            # is redelivered to another worker, and committed work replays its outcome.
            log.warning(
                "stopping: gave up after %.0f s (ARBITER_SHUTDOWN_TIMEOUT_S) with %d"
                " proposals unsettled; the broker will redeliver them",
                settings.shutdown_timeout_s,
                consumer.unsettled,
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
