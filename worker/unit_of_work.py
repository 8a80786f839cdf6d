"""One proposal's transaction: lock the run, check the id, orchestrate, write, record.

``process_proposal`` takes a store already inside a transaction, so a caller may
later run several proposals in one transaction; ``run_in_transaction`` is the
one-proposal-per-transaction caller the consumer uses today.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

from pydantic import TypeAdapter
from sqlalchemy.ext.asyncio import AsyncEngine

from rules.context import OrchestrationContext, OutboxMessage
from rules.engine import Orchestrator
from rules.errors import StoreError
from schemas import ErrorCode, FlowRun, FlowRunSpec, Outcome, Proposal, TaskRun, TaskRunSpec
from schemas.runs import RunKind
from worker.db.store import PgStore, ProcessedProposal
from worker.decode import Decoded, Invalid
from worker.outcomes import abort_outcome, invalid_outcome, outcome_from_context

log = logging.getLogger(__name__)

# The outbox is stored beside the outcome, in the same transaction, so a replay
# (a redelivery after a crash between commit and publish) publishes it again.
_OUTBOX = TypeAdapter(list[OutboxMessage])


@dataclass(frozen=True)
class Processed:
    """What the consumer publishes once the transaction has committed."""

    outcome: Outcome
    outbox: list[OutboxMessage] = field(default_factory=list)
    replayed: bool = False
    invalid: Invalid | None = None


class PermanentProcessingError(Exception):
    """Orchestration raised for a reason retrying cannot fix (a rule's own error)."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(repr(cause))
        self.cause = cause


def _new_run(proposal: Proposal) -> FlowRun | TaskRun | None:
    spec = proposal.run
    if proposal.run_kind == "flow_run" and isinstance(spec, FlowRunSpec):
        return FlowRun.from_spec(proposal.run_id, spec)
    if proposal.run_kind == "task_run" and isinstance(spec, TaskRunSpec):
        return TaskRun.from_spec(proposal.run_id, spec)
    return None


def _invalid(proposal: Proposal, code: ErrorCode, message: str) -> Processed:
    invalid = Invalid(code, message, proposal.proposal_id, proposal.run_kind, proposal.run_id)
    return Processed(outcome=invalid_outcome(invalid), invalid=invalid)


async def _lock_or_create(
    store: PgStore, proposal: Proposal
) -> tuple[FlowRun | TaskRun | None, ProcessedProposal | None, Processed | None]:
    """The run, locked (created first if new), the proposal's processed record if any, or
    the INVALID answer that refuses the proposal."""
    kind: RunKind = proposal.run_kind
    run, known = await store.lock_run_and_find_processed(
        kind, proposal.run_id, proposal.proposal_id
    )
    if run is not None:
        return run, known, None
    existing_kind = await store.run_kind_of(proposal.run_id)
    if existing_kind is not None and existing_kind != kind:
        message = f"run {proposal.run_id} is a {existing_kind}, not a {kind}"
        return None, None, _invalid(proposal, ErrorCode.KIND_MISMATCH, message)
    new_run = _new_run(proposal)
    if new_run is None:
        message = f"no {kind} {proposal.run_id} exists and the proposal carries no `run`"
        return None, None, _invalid(proposal, ErrorCode.UNKNOWN_RUN, message)
    if isinstance(new_run, TaskRun) and new_run.flow_run_id is not None:
        # Prefect's foreign key: a task run belongs to a flow run that exists (else 404).
        parent_kind = await store.run_kind_of(new_run.flow_run_id)
        if parent_kind != "flow_run":
            message = (
                f"task run {proposal.run_id} names flow run {new_run.flow_run_id},"
                f" which {'is a task run' if parent_kind else 'does not exist'}"
            )
            return None, None, _invalid(proposal, ErrorCode.UNKNOWN_RUN, message)
    await store.create_run_if_absent(kind, new_run)
    run, known = await store.lock_run_and_find_processed(
        kind, proposal.run_id, proposal.proposal_id
    )
    return run, known, None


async def process_proposal(
    store: PgStore, orchestrator: Orchestrator, decoded: Decoded
) -> Processed:
    """Everything one proposal does inside the caller's transaction."""
    proposal = decoded.proposal
    run, known, refused = await _lock_or_create(store, proposal)
    if refused is not None:
        return refused
    assert run is not None
    if known is not None:
        if known.body_sha256 != decoded.body_sha256:
            message = f"proposal {proposal.proposal_id} was already processed with another body"
            return _invalid(proposal, ErrorCode.PROPOSAL_ID_CONFLICT, message)
        return replay(known)

    state = proposal.state.to_state(orchestrator.clock())
    context: OrchestrationContext  # type: ignore[type-arg]
    # The state insert and run update wait to travel with the record: one round trip.
    async with store.deferred_writes():
        try:
            if isinstance(run, FlowRun):
                context = await orchestrator.set_flow_run_state(
                    store, run, state, force=proposal.force
                )
            else:
                context = await orchestrator.set_task_run_state(
                    store, run, state, force=proposal.force
                )
        except StoreError:
            raise
        except Exception as exc:
            raise PermanentProcessingError(exc) from exc
        outcome = outcome_from_context(proposal, context)
        outbox = list(context.outbox)
        await _record(store, decoded, outcome, outbox)
    return Processed(outcome=outcome, outbox=outbox)


def replay(known: ProcessedProposal) -> Processed:
    """What a proposal id already processed gets again: its stored outcome and outbox."""
    return Processed(
        outcome=Outcome.model_validate_json(known.outcome_json),
        outbox=_OUTBOX.validate_json(known.outbox_json),
        replayed=True,
    )


async def _record(
    store: PgStore, decoded: Decoded, outcome: Outcome, outbox: list[OutboxMessage]
) -> None:
    proposal = decoded.proposal
    await store.record_processed(
        proposal.proposal_id,
        decoded.body_sha256,
        proposal.run_kind,
        proposal.run_id,
        outcome.status.value,
        outcome.model_dump_json(),
        _OUTBOX.dump_json(outbox).decode(),
    )


async def run_in_transaction(
    engine: AsyncEngine, orchestrator: Orchestrator, decoded: Decoded
) -> Processed:
    """One proposal, one transaction. A rule's own error rolls back and records an ABORT."""
    try:
        async with engine.begin() as conn:
            return await process_proposal(PgStore(conn), orchestrator, decoded)
    except PermanentProcessingError as failure:
        log.exception("orchestration of %s failed", decoded.proposal.proposal_id)
        reason = f"Aborting orchestration due to error: {failure.cause!r}"
        async with engine.begin() as conn:
            store = PgStore(conn)
            known = await store.find_processed(decoded.proposal.proposal_id)
            if known is not None:
                return replay(known)
            proposal = decoded.proposal
            run = await store.lock_run(proposal.run_kind, proposal.run_id)
            outcome = abort_outcome(proposal, run, reason)
            await _record(store, decoded, outcome, [])
            return Processed(outcome=outcome)


def purge_cutoff(now: dt.datetime, retention_days: float) -> dt.datetime:
    return now - dt.timedelta(days=retention_days)
