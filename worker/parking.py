"""Parking a proposal that asked the pool to follow its WAITs (``follow_waits``).

Within the transaction that records a WAIT for such a proposal, the proposal is parked: a
``parked_proposal`` row, due when the WAIT's delay has passed, is written beside the
processed record, so the WAIT and the parking commit or roll back together and a crash
anywhere loses neither. Its WAIT outcome is marked ``details.parked`` (an interim notice,
published only when the proposal asked for ``wait_notices``); a replay of the original id
while it is parked answers the same way. ``worker.reevaluation`` takes it from there.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Callable, Sequence

from arbiter.schemas import OutcomeStatus
from arbiter.worker.db import parked as sql
from arbiter.worker.db.store import PgStore
from arbiter.worker.decode import Decoded
from arbiter.worker.tracing import TraceContext
from arbiter.worker.unit_of_work import Processed

__all__ = [
    "PARK_NAMESPACE",
    "mark_parked",
    "park",
    "reevaluation_id",
    "wake_waiters",
    "watch_parking",
    "with_reply_route",
]

# Fixed forever: the ids of re-evaluations are derived from it.
PARK_NAMESPACE = uuid.UUID("9b3f6a1e-4c7d-5e2a-8f10-2a3b4c5d6e7f")


# How long after a release this process's re-evaluators look for the waiters it woke.
WAKE_AFTER_S = 0.02

# This process's re-evaluators, told the due time of what its workers park, so that the
# worker that parked a proposal wakes when it is due instead of at its next poll.
_watchers: list[Callable[[dt.datetime], None]] = []


def watch_parking(callback: Callable[[dt.datetime], None]) -> Callable[[], None]:
    """Call ``callback`` with the due time of each batch parked here; returns the undo."""
    _watchers.append(callback)
    return lambda: _watchers.remove(callback)


def reevaluation_id(proposal_id: uuid.UUID, attempt: int) -> uuid.UUID:
    """The id re-evaluation ``attempt`` of a parked proposal is recorded under: the same
    for every worker and every try, so one re-evaluation never writes twice."""
    return uuid.uuid5(PARK_NAMESPACE, f"{proposal_id}:{attempt}")


def with_reply_route(
    decoded: Decoded,
    reply_to: str | None,
    correlation: str | None,
    trace: TraceContext | None = None,
) -> Decoded:
    """Keep what the final outcome of a parked proposal needs from its delivery."""
    return dataclasses.replace(
        decoded,
        reply_to=reply_to,
        correlation_id=correlation,
        traceparent=trace.traceparent if trace is not None else None,
        tracestate=trace.tracestate if trace is not None else None,
    )


def _delay_s(processed: Processed) -> float:
    return float(max(processed.outcome.details.delay_seconds or 0, 0))


def mark_parked(decoded: Decoded, processed: Processed) -> Processed:
    """A fresh WAIT for a proposal that follows its WAITs becomes an interim, parked WAIT
    (silent unless it asked for notices). A WAIT longer than the proposal's own
    ``max_wait_s`` is its final answer at once, as is anything that is not a WAIT."""
    proposal = decoded.proposal
    outcome = processed.outcome
    if (
        not proposal.follow_waits
        or decoded.reevaluates is not None
        or outcome.status is not OutcomeStatus.WAIT
        or (proposal.max_wait_s is not None and _delay_s(processed) > proposal.max_wait_s)
    ):
        return processed
    details = outcome.details.model_copy(update={"parked": True})
    return dataclasses.replace(
        processed,
        outcome=outcome.model_copy(update={"details": details}),
        silent=not proposal.wait_notices,
        outcome_json=None,
    )


def replayed(decoded: Decoded, processed: Processed) -> Processed:
    """A replay of a parked WAIT is as silent as the WAIT was: the final outcome follows."""
    if processed.outcome.details.parked and not decoded.proposal.wait_notices:
        return dataclasses.replace(processed, silent=True)
    return processed


async def park(
    db: PgStore,
    batch: Sequence[Decoded],
    results: Sequence[Processed | None],
    now: dt.datetime,
) -> None:
    """Park the batch's proposals whose fresh WAIT was marked parked, in its transaction."""
    rows = [
        (decoded, result)
        for decoded, result in zip(batch, results, strict=True)
        if result is not None
        and not result.replayed
        and result.outcome.details.parked
        and decoded.reevaluates is None
    ]
    if not rows:
        return
    due = [now + dt.timedelta(seconds=_first_delay(d, r)) for d, r in rows]
    await db.fetch_rows(
        sql.PARK,
        [d.proposal.proposal_id for d, _ in rows],
        [d.proposal.model_dump_json(exclude_defaults=True) for d, _ in rows],
        [d.body_sha256 for d, _ in rows],
        [d.reply_to for d, _ in rows],
        [d.correlation_id for d, _ in rows],
        now,
        due,
        [d.traceparent for d, _ in rows],
        [d.tracestate for d, _ in rows],
    )
    for watcher in list(_watchers):
        watcher(min(due))


def _first_delay(decoded: Decoded, processed: Processed) -> float:
    delay = _delay_s(processed)
    limit = decoded.proposal.max_wait_s
    return min(delay, limit) if limit is not None else delay


async def wake_waiters(db: PgStore, tags: set[str], now: dt.datetime) -> int:
    """A transaction freed slots of these tags: the task runs parked waiting on them are
    due now, and this process's re-evaluators are woken (others find them at their next
    poll). In the caller's transaction: a rolled-back release wakes nobody."""
    if not tags:
        return 0
    woken = await db.fetch_rows(sql.WAKE_WAITERS, sorted(tags), now)
    if woken:
        # Told before the commit: a look this soon after finds the commit done, usually;
        # else the next poll (ARBITER_PARKED_POLL_S) does.
        for watcher in list(_watchers):
            watcher(now + dt.timedelta(seconds=WAKE_AFTER_S))
    return len(woken)
