"""Answering one delivery: publish its outcome (and outbox) and ack it, refuse it as INVALID,
requeue it, or, on its last allowed delivery, give it up with a final ABORT; every proposal
gets exactly one answer, and every dead letter says why it is there."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable

from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.schemas import ErrorCode
from arbiter.worker import headers
from arbiter.worker.acks import Acker
from arbiter.worker.db.errors import refused_content
from arbiter.worker.db.store import PgStore, ProcessedProposal
from arbiter.worker.decode import Decoded, Invalid
from arbiter.worker.metrics import WorkerMetrics
from arbiter.worker.outcomes import given_up_outcome, invalid_outcome
from arbiter.worker.publisher import Publisher
from arbiter.worker.settings import Settings
from arbiter.worker.tracing import answered
from arbiter.worker.unit_of_work import Processed, replay

# The consumer's logger: operators read one stream for a worker's decisions.
log = logging.getLogger("arbiter.worker.consumer")

__all__ = ["Answers", "describe"]


class Answers:
    """Settles deliveries one by one; ``on_settled`` is told of each ack or requeue."""

    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        metrics: WorkerMetrics,
        publisher: Publisher,
        decode: Callable[[AbstractIncomingMessage], Decoded | Invalid],
        on_settled: Callable[[], None],
        acker: Acker,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.publisher = publisher
        self.decode = decode
        self.on_settled = on_settled
        self.acker = acker

    async def announce(
        self, message: AbstractIncomingMessage, processed: Processed, started: float
    ) -> None:
        """Publish a committed (or replayed) outcome and its outbox, then ack."""
        if processed.invalid is not None:
            await self.refuse(message, processed.invalid)
            return
        outcome = processed.outcome
        answered(outcome.status.value, [entry.rule for entry in outcome.rule_trace])
        try:
            # The outcome first: an executor waiting on it must not depend on the events
            # exchange. If the outbox then fails, the redelivery publishes both again.
            if not processed.silent:
                await self.publisher.outcome(message, outcome, processed.outcome_json)
            await self.publisher.outbox(processed.outbox)
        except Exception as exc:
            # Committed but not (fully) announced: the redelivery replays the stored
            # outcome and outbox, so nothing is lost; consumers dedupe by message id.
            why = f"proposal {processed.outcome.proposal_id}: publishing failed"
            await self._requeue(message, why, exc)
            return
        await self.acker.ack(message)
        self.on_settled()
        seconds = time.perf_counter() - started
        self.metrics.settled(processed.outcome, replayed=processed.replayed, seconds=seconds)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s", decision_line(processed, seconds))

    async def failed(
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
            await self.refuse(message, invalid)
            return
        if self._last_delivery(message):
            await self._give_up(message, decoded, describe(exc))
            return
        await self._requeue(message, f"proposal {proposal.proposal_id}: failed", exc)

    async def unexpected(self, message: AbstractIncomingMessage, exc: Exception) -> None:
        """A bug while handling a delivery: requeued, or answered on its last delivery with
        whatever identity can still be read from it."""
        if not self._last_delivery(message):
            await self._requeue(message, f"delivery {message.message_id}: unexpected error", exc)
            return
        decoded: Decoded | Invalid
        try:
            decoded = self.decode(message)
        except Exception:
            decoded = Invalid(ErrorCode.DELIVERY_LIMIT, "", _message_uuid(message.message_id))
        await self._give_up(message, decoded, describe(exc))

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
                await self.announce(message, replay(known), time.perf_counter())
                return
        deliveries = _delivery_count(message) + 1
        outcome = given_up_outcome(identity, last_error, deliveries)
        answered(outcome.status.value)
        try:
            await self.publisher.outcome(message, outcome)
            await self.publisher.dead_letter(message, ErrorCode.DELIVERY_LIMIT.value, last_error)
        except Exception as exc:
            # The broker refuses publishes too: it dead-letters the delivery itself.
            why = f"proposal {identity.proposal_id}: giving up failed"
            await self._requeue(message, why, exc)
            return
        await self.acker.ack(message)
        self.on_settled()
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
        self.on_settled()
        with contextlib.suppress(Exception):
            await self.acker.nack(message, requeue=True)

    async def refuse(self, message: AbstractIncomingMessage, invalid: Invalid) -> None:
        """INVALID: publish the outcome, dead-letter a copy with the reason, ack.

        The outcome goes out even when the run kind is unknown and there is no reply_to
        (routing key ``outcome.unknown.invalid``): every proposal gets its one answer.
        """
        outcome = invalid_outcome(invalid)
        answered(outcome.status.value)
        await self.publisher.outcome(message, outcome)
        await self.publisher.dead_letter(message, invalid.code.value, invalid.message)
        await self.acker.ack(message)
        self.on_settled()
        self.metrics.dead_lettered.labels(invalid.code.value).inc()
        self.metrics.refused(outcome, invalid.code.value)
        log.warning(
            "invalid proposal %s: %s: %s", invalid.proposal_id, invalid.code, invalid.message
        )


def _delivery_count(message: AbstractIncomingMessage) -> int:
    """How often the queue delivered this message before (0 on the first delivery)."""
    count = (message.headers or {}).get(headers.DELIVERY_COUNT, 0)
    return count if isinstance(count, int) and not isinstance(count, bool) else 0


def _message_uuid(message_id: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(message_id) if message_id else None
    except ValueError:
        return None


def describe(exc: BaseException) -> str:
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
