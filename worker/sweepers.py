"""The background work Prefect's server does on its own, safe on any number of workers.

Prefect runs these services in one server process; run as replicas they race (late runs
marked twice, Late → Late storms, a reaper overwriting a run that just finished). Here any
worker may run them (``ARBITER_SWEEPERS``) and each stuck run is transitioned once:

- the claim (``worker.db.sweeps``) locks the runs ``FOR UPDATE SKIP LOCKED`` in the
  transaction that decides them, so no two workers hold one run, and a run that changed
  meanwhile no longer matches (PostgreSQL re-checks a locked row at its newest version);
- the decision is the rules', through ``process_batch`` like any batch of proposals: a
  Late mark goes through ``MarkLateRunsPolicy``, an expired pause through the core flow
  policy (its resume rule fails the run), a cancelled flow run's task runs are cancelled
  by a forced proposal (which releases their tag slots), as Prefect's services do;
- each proposal's id is derived from the run and the state it leaves (uuid5), so a second
  claim of the same version would replay the first decision, never write twice.

Outcomes are published to ``outcome.<kind>.<status>`` and events to the events exchange
after the commit, like a proposal's; the processed-proposal purge runs here too.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from aio_pika.abc import AbstractRobustConnection
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.rules.core import global_limits as v2
from arbiter.rules.core.concurrency import reclaim_expired_tag_slots
from arbiter.rules.engine import Orchestrator
from arbiter.rules.policies import MarkLateRunsPolicy
from arbiter.schemas import Proposal, ProposedState, StateType
from arbiter.schemas.runs import RunKind
from arbiter.schemas.states import StateDetails
from arbiter.worker import parking
from arbiter.worker.batch import RuleFailed, process_batch
from arbiter.worker.db import global_limits
from arbiter.worker.db import sweeps as sql
from arbiter.worker.db.rows import tag_limit_from
from arbiter.worker.db.transaction import store_transaction
from arbiter.worker.decode import Decoded, body_digest
from arbiter.worker.metrics import WorkerMetrics
from arbiter.worker.passes import Passes
from arbiter.worker.publisher import Publisher
from arbiter.worker.purge import PURGE_INTERVAL_S, purge_processed
from arbiter.worker.reevaluation import publish_outcome
from arbiter.worker.settings import Settings
from arbiter.worker.topology import declare_topology
from arbiter.worker.unit_of_work import Processed

log = logging.getLogger(__name__)

__all__ = ["SWEEP_NAMESPACE", "Sweeper", "sweep_proposal_id"]

# Fixed forever: the ids of the sweeps' proposals are derived from it.
SWEEP_NAMESPACE = uuid.UUID("6c0e7f4a-2b1d-5e8f-9a3c-4d5e6f708192")
PAUSE_EXPIRED = "The flow was paused and never resumed."
PARENT_CANCELLED = "The parent flow run was cancelled."


@dataclass(frozen=True)
class _Claimed:
    run_id: uuid.UUID
    state_id: uuid.UUID
    scheduled: dt.datetime | None


@dataclass(frozen=True)
class _Sweep:
    """One kind of stuck run: how to find it, what to propose, under which policy."""

    name: str
    kind: RunKind
    claim: str
    proposed: Callable[[_Claimed], ProposedState]
    cutoff: Callable[[Settings, dt.datetime], dt.datetime]
    force: bool = False
    marks_late: bool = False


SWEEPS = (
    _Sweep(
        "late_runs",
        "flow_run",
        sql.LATE_RUNS,
        lambda row: ProposedState(
            type=StateType.SCHEDULED,
            name="Late",
            state_details=StateDetails(scheduled_time=row.scheduled),
        ),
        lambda settings, now: now - dt.timedelta(seconds=settings.late_after_s),
        marks_late=True,
    ),
    _Sweep(
        "expired_pauses",
        "flow_run",
        sql.EXPIRED_PAUSES,
        lambda row: ProposedState(type=StateType.FAILED, message=PAUSE_EXPIRED),
        lambda settings, now: now,
    ),
    _Sweep(
        "cancelled_flow_task_runs",
        "task_run",
        sql.ORPHANS_OF_CANCELLED,
        lambda row: ProposedState(type=StateType.CANCELLED, message=PARENT_CANCELLED),
        lambda settings, now: now,
        force=True,
    ),
)


def sweep_proposal_id(sweep: str, run_id: uuid.UUID, state_id: uuid.UUID) -> uuid.UUID:
    """The id of a sweep's proposal: one per run and version it leaves, whoever sweeps."""
    return uuid.uuid5(SWEEP_NAMESPACE, f"{sweep}:{run_id}:{state_id}")


def _decoded(sweep: _Sweep, row: _Claimed) -> Decoded:
    proposal = Proposal(
        schema_version=1,
        proposal_id=sweep_proposal_id(sweep.name, row.run_id, row.state_id),
        run_kind=sweep.kind,
        run_id=row.run_id,
        state=sweep.proposed(row),
        force=sweep.force,
    )
    document = json.loads(proposal.model_dump_json(exclude_none=True))
    return Decoded(proposal=proposal, body_sha256=body_digest(document))


class Sweeper:
    """Runs the sweeps: one pass on demand (``arbiter sweep``), or forever in a worker."""

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
        self.connection = connection
        self.metrics = metrics or WorkerMetrics()
        self.passes = Passes()  # stopped between passes (worker/passes.py)
        self._orchestrators = {
            False: orchestrator,
            True: replace(
                orchestrator, policies=replace(orchestrator.policies, flow=MarkLateRunsPolicy)
            ),
        }
        self._publisher: Publisher | None = None

    async def start(self) -> None:
        """Open a confirming channel of its own for the sweeps' outcomes and events."""
        channel = await self.connection.channel(publisher_confirms=True)
        self._publisher = Publisher(self.settings, await declare_topology(channel, self.settings))

    async def sweep_once(self) -> dict[str, int]:
        """One pass of every sweep: how many runs each transitioned (wrote a state for)."""
        swept = {sweep.name: await self._sweep(sweep) for sweep in SWEEPS}
        swept["expired_leases"] = await self.reclaim_expired_leases()
        return swept

    async def reclaim_expired_leases(self) -> int:
        """Free the global-limit slots whose lease expired (their holder never came back),
        for limits nobody is claiming now: a claimer reclaims them itself. The rows are
        claimed ``FOR UPDATE SKIP LOCKED``, so two sweepers free each slot once."""
        clock = self._orchestrators[False].clock
        reclaimed = 0
        while True:
            async with store_transaction(self.engine) as store:
                now = clock()
                rows = await store.fetch_rows(
                    global_limits.EXPIRED_LEASES, now, self.settings.batch_max
                )
                limits = [global_limits.limit_from(row) for row in rows]
                freed = 0
                tags = set()
                for limit in limits:
                    before = limit.active_slots
                    v2.reclaim_expired(limit, now)
                    freed += before - limit.active_slots
                    if limit.name.startswith(v2.TAG_PREFIX):
                        tags.add(v2.tag_of(limit))
                await global_limits.save_many(store, limits)
                await parking.wake_waiters(store, tags, now)
            if freed:
                self.metrics.swept.labels("expired_leases", "reclaimed").inc(freed)
            reclaimed += freed
            if len(limits) < self.settings.batch_max:
                return reclaimed + await self._reclaim_expired_tag_slots()

    async def _reclaim_expired_tag_slots(self) -> int:
        """The same for V1 tag limits."""
        clock = self._orchestrators[False].clock
        reclaimed = 0
        while True:
            async with store_transaction(self.engine) as store:
                now = clock()
                rows = await store.fetch_rows(sql.EXPIRED_TAG_SLOTS, now, self.settings.batch_max)
                freed, tags = 0, set()
                for limit in (tag_limit_from(row) for row in rows):
                    before = len(limit.active_slots)
                    reclaim_expired_tag_slots(limit, now)
                    await store.save_tag_limit(limit)
                    if len(limit.active_slots) < before:
                        freed += before - len(limit.active_slots)
                        tags.add(limit.tag)
                await parking.wake_waiters(store, tags, now)
            if freed:
                self.metrics.swept.labels("expired_leases", "reclaimed").inc(freed)
            reclaimed += freed
            if len(rows) < self.settings.batch_max:
                return reclaimed

    async def run_forever(self) -> None:
        """A pass every ``ARBITER_SWEEP_INTERVAL_S``, the purge every ten minutes; a failed
        pass is logged and the next one tries again."""
        loop = asyncio.get_running_loop()
        next_purge = loop.time()
        while not self.passes.stopping:
            async with self.passes.one():
                try:
                    if self._publisher is None:
                        await self.start()
                    swept = await self.sweep_once()
                    if any(swept.values()):
                        counts = ", ".join(f"{n}: {c}" for n, c in swept.items() if c)
                        log.info("swept %s", counts)
                except Exception:
                    log.exception("a sweep failed; the next pass will try again")
                if loop.time() >= next_purge:
                    await self.purge()
                    next_purge = loop.time() + PURGE_INTERVAL_S
            await asyncio.sleep(self.settings.sweep_interval_s)

    async def purge(self) -> int:
        """Forget processed proposal ids past the retention window (any worker may; two at
        once delete each row once)."""
        clock = self._orchestrators[False].clock
        return await purge_processed(self.engine, clock, self.settings.retention_days)

    async def _sweep(self, sweep: _Sweep) -> int:
        """Claim and decide batches until none is left (or every match was seen this pass)."""
        seen: list[uuid.UUID] = []
        written = 0
        while True:
            decided = await self._decide(sweep, seen)
            if not decided:
                return written
            seen.extend(row.run_id for row, _ in decided)
            for row, processed in decided:
                if processed is None or processed.replayed or processed.invalid is not None:
                    continue
                outcome = processed.outcome
                self.metrics.swept.labels(sweep.name, outcome.status.value).inc()
                for entry in outcome.rule_trace:
                    self.metrics.rule_effects.labels(entry.rule, entry.effect.value).inc()
                if outcome.state is not None and outcome.state.id != row.state_id:
                    written += 1  # a new state: accepted, or a rule's replacement
                await self._announce(processed)
            if len(decided) < self.settings.batch_max:
                return written

    async def _decide(
        self, sweep: _Sweep, seen: list[uuid.UUID]
    ) -> list[tuple[_Claimed, Processed | None]]:
        """One transaction: claim up to ``ARBITER_BATCH_MAX`` runs and decide each. A rule
        that raises gets its proposal a stored ABORT, as on the proposal path."""
        orchestrator = self._orchestrators[sweep.marks_late]
        aborts: dict[uuid.UUID, str] = {}
        while True:
            batch: list[Decoded] = []
            try:
                async with store_transaction(self.engine) as store:
                    cutoff = sweep.cutoff(self.settings, orchestrator.clock())
                    rows = await store.fetch_rows(
                        sweep.claim, cutoff, seen, self.settings.batch_max
                    )
                    claimed = [_claimed(row) for row in rows]
                    batch = [_decoded(sweep, row) for row in claimed]
                    if not batch:
                        return []
                    by_index = {
                        index: aborts[d.proposal.proposal_id]
                        for index, d in enumerate(batch)
                        if d.proposal.proposal_id in aborts
                    }
                    results = await process_batch(store, orchestrator, batch, by_index)
                return list(zip(claimed, results, strict=True))
            except RuleFailed as failure:
                proposal_id = batch[failure.index].proposal.proposal_id
                log.error("sweep %s: orchestration of %s failed", sweep.name, proposal_id)
                aborts[proposal_id] = f"Aborting orchestration due to error: {failure.cause!r}"

    async def _announce(self, processed: Processed) -> None:
        """The outcome to ``outcome.<kind>.<status>``, then the outbox. The transition is
        committed already; a publish that fails is logged (the stored outcome and outbox
        stay readable with ``arbiter proposals show``)."""
        assert self._publisher is not None
        outcome = processed.outcome
        try:
            await publish_outcome(self._publisher, outcome)
            await self._publisher.outbox(processed.outbox)
        except Exception:
            log.exception("sweep outcome %s committed but not published", outcome.proposal_id)


def _claimed(row: Any) -> _Claimed:
    return _Claimed(run_id=row["id"], state_id=row["state_id"], scheduled=row["scheduled"])
