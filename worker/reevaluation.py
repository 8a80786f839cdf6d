"""Re-evaluating parked proposals when they are due, until one final outcome.

Every worker runs this loop; a parked proposal is claimed ``FOR UPDATE SKIP LOCKED`` by the
first worker to find it due, so one worker re-evaluates it at a time. The re-evaluation is
an ordinary proposal through ``process_batch``, in the claim's transaction, under the id
``reevaluation_id(original, attempt)``: a rolled-back try leaves the row due for the next
one, and a committed one is never decided again. In that same transaction:

- WAIT again, and the total wait stays within the proposal's ``max_wait_s`` (else
  ``ARBITER_MAX_WAIT_S``): the row is due again after the new delay (an interim WAIT notice
  is published after the commit if the proposal asked for ``wait_notices``);
- anything else, or a WAIT past the maximum: the final outcome, under the original proposal
  id, replaces the original id's record (a replay of it now answers this) and is kept on the
  row until it is published to the proposal's ``reply_to`` with its ``correlation_id``;
  then the row is deleted. A worker that dies in between leaves the row; another publishes
  it again ``REPUBLISH_AFTER_S`` later (at least once, deduplicated by ``message_id``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractRobustConnection
from aiormq import spec
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.rules.engine import Orchestrator
from arbiter.schemas import Outcome, OutcomeStatus, Proposal
from arbiter.worker import headers, parking
from arbiter.worker.batch import RuleFailed, process_batch
from arbiter.worker.broker import PERSISTENT
from arbiter.worker.db import parked as sql
from arbiter.worker.db.store import PgStore
from arbiter.worker.db.transaction import store_transaction
from arbiter.worker.decode import Decoded, body_digest
from arbiter.worker.metrics import WorkerMetrics
from arbiter.worker.parking import reevaluation_id
from arbiter.worker.passes import Passes
from arbiter.worker.publisher import Publisher
from arbiter.worker.settings import Settings
from arbiter.worker.topology import declare_topology
from arbiter.worker.tracing import ProposalTrace, TraceContext, answering, trace_headers
from arbiter.worker.unit_of_work import OUTBOX, Processed

log = logging.getLogger(__name__)

__all__ = ["Reevaluator", "publish_outcome"]

REPUBLISH_AFTER_S = 30.0
MIN_PAUSE_S = 0.01  # between passes while a due proposal's run is held elsewhere


async def publish_outcome(
    publisher: Publisher,
    outcome: Outcome,
    reply_to: str | None = None,
    correlation_id: str | None = None,
) -> None:
    """An outcome with no delivery to answer: to ``reply_to``, else ``outcome.<kind>.<status>``
    (with the trace headers of the proposal being answered, if any)."""
    properties = spec.Basic.Properties(
        content_type="application/json",
        delivery_mode=PERSISTENT,
        message_id=str(outcome.proposal_id),
        correlation_id=correlation_id,
        headers={headers.STATUS: outcome.status.value, **trace_headers()},
    )
    await publisher.send(
        publisher.topology.outcomes_exchange,
        outcome.model_dump_json().encode(),
        properties,
        reply_to or outcome.routing_key(),
    )


def parked_trace(row: Any) -> TraceContext | None:
    """A parked row's trace context (checked when it was parked)."""
    parent = row["traceparent"]
    return TraceContext(parent, row["tracestate"]) if parent else None


@dataclass(frozen=True)
class _Parked:
    proposal_id: uuid.UUID
    proposal: Proposal
    reply_to: str | None
    correlation_id: str | None
    trace: TraceContext | None
    attempt: int
    parked_at: dt.datetime
    due_at: dt.datetime

    @classmethod
    def from_row(cls, row: Any) -> _Parked:
        return cls(
            proposal_id=row["proposal_id"],
            proposal=Proposal.model_validate_json(row["body"]),
            reply_to=row["reply_to"],
            correlation_id=row["correlation_id"],
            trace=parked_trace(row),
            attempt=row["attempt"],
            parked_at=row["parked_at"],
            due_at=row["due_at"],
        )

    def answering(self, outcome: Outcome) -> ProposalTrace:
        """The original proposal's trace and identity, for publishing its answer."""
        return ProposalTrace(
            received=self.trace,
            run_kind=outcome.run_kind,
            run_id=str(outcome.run_id),
            proposal_id=str(self.proposal_id),
            status=outcome.status.value,
        )

    def decoded(self) -> Decoded:
        """The next re-evaluation: the same proposal under its derived id."""
        proposal = self.proposal.model_copy(
            update={"proposal_id": reevaluation_id(self.proposal_id, self.attempt + 1)}
        )
        document = json.loads(proposal.model_dump_json())
        return Decoded(proposal, body_digest(document), reevaluates=self.proposal_id)


@dataclass
class _Plan:
    """What one transaction decided, to publish after its commit."""

    notices: list[tuple[_Parked, Outcome]] = field(default_factory=list)
    finals: list[tuple[_Parked, Outcome, str]] = field(default_factory=list)  # + outbox JSON


class Reevaluator:
    """Re-evaluates due parked proposals; publishes their notices and final outcomes."""

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
        self.passes = Passes()  # stopped between passes (worker/passes.py)
        self._publisher: Publisher | None = None
        self._wake = asyncio.Event()
        self._nudged: dt.datetime | None = None  # the earliest due time parked here since

    def _parked_here(self, due: dt.datetime) -> None:
        """A batch of this process parked proposals due at ``due`` (before its commit)."""
        if self._nudged is None or due < self._nudged:
            self._nudged = due
            self._wake.set()

    async def start(self) -> None:
        channel = await self.connection.channel(publisher_confirms=True)
        self._publisher = Publisher(self.settings, await declare_topology(channel, self.settings))

    async def run_forever(self) -> None:
        """Pass over what is due, then sleep until the next due time (at most
        ``ARBITER_PARKED_POLL_S``, so proposals parked meanwhile are found)."""
        unwatch = parking.watch_parking(self._parked_here)
        try:
            while not self.passes.stopping:
                pause = self.settings.parked_poll_s
                try:
                    async with self.passes.one():
                        if self._publisher is None:
                            await self.start()
                        await self.pass_once()
                        pause = await self._until_next_due()
                except Exception:
                    log.exception("re-evaluating parked proposals failed; will try again")
                await self._sleep(pause)
        finally:
            unwatch()

    async def _sleep(self, pause: float) -> None:
        """Sleep ``pause``, or less: until the due time of a proposal parked here meanwhile."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + pause
        while True:
            self._wake.clear()
            remaining = deadline - loop.time()
            if self._nudged is not None:
                until = (self._nudged - self.orchestrator.clock()).total_seconds()
                remaining = min(remaining, max(until, MIN_PAUSE_S))
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                break
        if self._nudged is not None and self._nudged <= self.orchestrator.clock():
            self._nudged = None

    async def pass_once(self) -> int:
        """Publish answers a dead worker left, then re-evaluate what is due; how many."""
        await self._republish_unpublished()
        done = 0
        while True:
            plan, claimed = await self._reevaluate()
            await self._announce(plan)
            done += claimed
            if claimed < self.settings.batch_max:
                return done

    async def _until_next_due(self) -> float:
        async with self.engine.connect() as conn:
            [row] = await PgStore(conn).fetch_rows(sql.NEXT_DUE)
        if row["due_at"] is None:
            return self.settings.parked_poll_s
        due: dt.datetime = row["due_at"]
        seconds = (due - self.orchestrator.clock()).total_seconds()
        return min(max(seconds, MIN_PAUSE_S), self.settings.parked_poll_s)

    async def _reevaluate(self) -> tuple[_Plan, int]:
        """One transaction: claim due proposals, decide each, reschedule or answer it."""
        aborts: dict[uuid.UUID, str] = {}
        while True:
            batch: list[Decoded] = []
            try:
                async with store_transaction(self.engine) as store:
                    now = self.orchestrator.clock()
                    rows = await store.fetch_rows(sql.CLAIM_DUE, now, self.settings.batch_max)
                    parked = [_Parked.from_row(row) for row in rows]
                    if not parked:
                        return _Plan(), 0
                    batch = [p.decoded() for p in parked]
                    by_index = {
                        i: aborts[d.proposal.proposal_id]
                        for i, d in enumerate(batch)
                        if d.proposal.proposal_id in aborts
                    }
                    results = await process_batch(store, self.orchestrator, batch, by_index)
                    plan = await self._settle(store, now, parked, results)
                return plan, len(parked)
            except RuleFailed as failure:
                proposal_id = batch[failure.index].proposal.proposal_id
                log.error("re-evaluation %s failed", proposal_id, exc_info=failure.cause)
                aborts[proposal_id] = f"Aborting orchestration due to error: {failure.cause!r}"

    async def _settle(
        self,
        store: PgStore,
        now: dt.datetime,
        parked: list[_Parked],
        results: list[Processed | None],
    ) -> _Plan:
        plan = _Plan()
        again: list[tuple[_Parked, dt.datetime]] = []
        for item, result in zip(parked, results, strict=True):
            if result is None:
                continue  # its run is held by another transaction: due still, next pass
            self.metrics.parked_lateness.observe(max((now - item.due_at).total_seconds(), 0))
            outcome = result.outcome.model_copy(update={"proposal_id": item.proposal_id})
            if result.invalid is None and outcome.status is OutcomeStatus.WAIT:
                delay = float(max(outcome.details.delay_seconds or 0, 0))
                waited = (now - item.parked_at).total_seconds()
                limit = item.proposal.max_wait_s or self.settings.max_wait_s
                if waited + delay <= limit:
                    again.append((item, now + dt.timedelta(seconds=delay)))
                    if item.proposal.wait_notices:
                        details = outcome.details.model_copy(update={"parked": True})
                        plan.notices.append((item, outcome.model_copy(update={"details": details})))
                    continue
            self.metrics.reevaluated.labels(outcome.status.value).inc()
            plan.finals.append((item, outcome, OUTBOX.dump_json(result.outbox).decode()))
        if again:
            await store.fetch_rows(
                sql.RESCHEDULE,
                [item.proposal_id for item, _ in again],
                [item.attempt + 1 for item, _ in again],
                [due for _, due in again],
            )
        if plan.finals:
            await store.fetch_rows(
                sql.ANSWER,
                [item.proposal_id for item, _, _ in plan.finals],
                [outcome.status.value for _, outcome, _ in plan.finals],
                [outcome.model_dump_json() for _, outcome, _ in plan.finals],
                [outbox for _, _, outbox in plan.finals],
                [item.attempt + 1 for item, _, _ in plan.finals],
                now + dt.timedelta(seconds=REPUBLISH_AFTER_S),
            )
        return plan

    async def _announce(self, plan: _Plan) -> None:
        """After the commit: notices (at most once), then each final outcome and its
        outbox, then forget the rows whose answer was published."""
        assert self._publisher is not None
        for item, outcome in plan.notices:
            try:
                with answering(item.answering(outcome)):
                    await publish_outcome(
                        self._publisher, outcome, item.reply_to, item.correlation_id
                    )
            except Exception:
                log.warning("could not publish a WAIT notice for %s", item.proposal_id)
        published = []
        for item, outcome, outbox in plan.finals:
            with answering(item.answering(outcome)):
                try:
                    await publish_outcome(
                        self._publisher, outcome, item.reply_to, item.correlation_id
                    )
                    await self._publisher.outbox(OUTBOX.validate_json(outbox))
                except Exception:
                    log.exception("the final outcome of %s is not published yet", item.proposal_id)
                    continue
            published.append(item.proposal_id)
        await self._forget(published)

    async def _forget(self, proposal_ids: list[uuid.UUID]) -> None:
        if proposal_ids:
            async with store_transaction(self.engine) as store:
                await store.fetch_rows(sql.FORGET, proposal_ids)

    async def _republish_unpublished(self) -> None:
        """Answers committed by a worker that died before publishing them (or whose publish
        failed): published again, then forgotten, the rows locked meanwhile."""
        assert self._publisher is not None
        async with store_transaction(self.engine) as store:
            now = self.orchestrator.clock()
            rows = await store.fetch_rows(sql.CLAIM_UNPUBLISHED, now, self.settings.batch_max)
            for row in rows:
                outcome = Outcome.model_validate_json(row["answer"])
                trace = ProposalTrace(
                    received=parked_trace(row), proposal_id=str(outcome.proposal_id)
                )
                with answering(trace):
                    await publish_outcome(
                        self._publisher, outcome, row["reply_to"], row["correlation_id"]
                    )
                    await self._publisher.outbox(OUTBOX.validate_json(row["answer_outbox"]))
            if rows:
                await store.fetch_rows(sql.FORGET, [row["proposal_id"] for row in rows])
