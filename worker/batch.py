"""Many proposals, one transaction: lock every run up front, decide in memory, write set-based.

The order inside the transaction is fixed, so two workers' batches over overlapping runs
wait for each other instead of deadlocking: flow runs, then task runs, each locked in id
order by one statement; then the runs to create (in delivery order, one multi-row insert
per kind); then the tag limits of every task run in the batch, in tag order. After that
the rules run for each proposal in delivery order against a ``BatchStore``, so two
proposals for one run see each other's writes, and ``flush`` writes everything with one
statement per table before the single COMMIT.

A rule's own exception is not the batch's fault: ``RuleFailed`` names the proposal, and
the caller runs the batch again with that proposal answered by a stored ABORT instead.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from pydantic import TypeAdapter

from rules.context import OrchestrationContext, OutboxMessage
from rules.engine import Orchestrator
from rules.errors import StoreError
from schemas import ErrorCode, FlowRun, FlowRunSpec, Proposal, TaskRun, TaskRunSpec
from schemas.runs import RunKind
from worker.db.batch_store import BatchStore, RunKey
from worker.db.store import PgStore
from worker.decode import Decoded, Invalid
from worker.outcomes import abort_outcome, invalid_outcome, outcome_from_context
from worker.unit_of_work import Processed, replay

__all__ = ["RuleFailed", "process_batch"]

_KINDS: tuple[RunKind, RunKind] = ("flow_run", "task_run")
_OUTBOX = TypeAdapter(list[OutboxMessage])


class RuleFailed(Exception):
    """The rules raised while deciding proposal ``index`` of the batch (a permanent error)."""

    def __init__(self, index: int, cause: Exception) -> None:
        super().__init__(repr(cause))
        self.index = index
        self.cause = cause


@dataclass(frozen=True)
class _Runs:
    """The batch's runs once locked, and the INVALID answers decided while locking."""

    locked: dict[RunKey, FlowRun | TaskRun]
    refused: dict[int, Processed]
    held_elsewhere: set[RunKey]


def _refusal(proposal: Proposal, code: ErrorCode, message: str) -> Processed:
    invalid = Invalid(code, message, proposal.proposal_id, proposal.run_kind, proposal.run_id)
    return Processed(outcome=invalid_outcome(invalid), invalid=invalid)


def _new_run(proposal: Proposal) -> FlowRun | TaskRun | None:
    spec = proposal.run
    if proposal.run_kind == "flow_run" and isinstance(spec, FlowRunSpec):
        return FlowRun.from_spec(proposal.run_id, spec)
    if proposal.run_kind == "task_run" and isinstance(spec, TaskRunSpec):
        return TaskRun.from_spec(proposal.run_id, spec)
    return None


def _parent_of(proposal: Proposal) -> uuid.UUID | None:
    spec = proposal.run
    if proposal.run_kind == "task_run" and isinstance(spec, TaskRunSpec):
        return spec.flow_run_id
    return None


async def _lock_and_create(db: PgStore, proposals: list[Proposal]) -> _Runs:
    """Lock the batch's runs, creating the new ones, as one proposal at a time would.

    A batch of several skips the runs other transactions hold (``held_elsewhere``): their
    proposals are settled alone afterwards, so a long-held run delays nobody else. A batch
    of one waits for its run's lock, as it must.
    """
    keys: set[RunKey] = {(p.run_kind, p.run_id) for p in proposals}
    skip_locked = len(proposals) > 1
    locked: set[RunKey] = set()
    for kind in _KINDS:
        ids = sorted(run_id for k, run_id in keys if k == kind)
        if ids:
            found = await db.lock_runs(kind, ids, skip_locked=skip_locked)
            locked.update((kind, run_id) for run_id in found)
    refused: dict[int, Processed] = {}
    creating: dict[RunKey, FlowRun | TaskRun] = {}
    held: set[RunKey] = set()
    if keys - locked:
        asked = {run_id for _, run_id in keys - locked}
        asked.update(parent for p in proposals if (parent := _parent_of(p)) is not None)
        kinds = await db.run_kinds_of(sorted(asked))
        held = {key for key in keys - locked if kinds.get(key[1]) == key[0]}
        for index, proposal in enumerate(proposals):
            key: RunKey = (proposal.run_kind, proposal.run_id)
            if key in locked or key in creating or key in held:
                continue
            why = _why_not_created(proposal, kinds, creating)
            if why is not None:
                refused[index] = _refusal(proposal, *why)
                continue
            new_run = _new_run(proposal)
            assert new_run is not None
            creating[key] = new_run
        for kind in _KINDS:
            new = sorted((r for (k, _), r in creating.items() if k == kind), key=lambda r: r.id)
            if not new:
                continue
            inserted = await db.insert_runs_if_absent(kind, list(new))
            raced = sorted(run.id for run in new if run.id not in inserted)
            if raced:
                # Another worker created them first; we waited for its commit: lock them.
                await db.lock_runs(kind, raced)
        locked.update(creating)
    runs: dict[RunKey, FlowRun | TaskRun] = {}
    for kind in _KINDS:
        ids = sorted(run_id for k, run_id in locked if k == kind)
        if ids:
            runs.update(
                ((kind, run_id), run) for run_id, run in (await db.read_runs(kind, ids)).items()
            )
    return _Runs(runs, refused, held)


def _why_not_created(
    proposal: Proposal,
    kinds: dict[uuid.UUID, RunKind],
    creating: dict[RunKey, FlowRun | TaskRun],
) -> tuple[ErrorCode, str] | None:
    """Why the proposal's unknown run cannot be created (the INVALID answer), or None."""
    kind = proposal.run_kind

    def kind_of(run_id: uuid.UUID) -> RunKind | None:
        if run_id in kinds:
            return kinds[run_id]
        return next((k for k in _KINDS if (k, run_id) in creating), None)

    existing = kind_of(proposal.run_id)
    if existing is not None and existing != kind:
        message = f"run {proposal.run_id} is a {existing}, not a {kind}"
        return ErrorCode.KIND_MISMATCH, message
    if _new_run(proposal) is None:
        message = f"no {kind} {proposal.run_id} exists and the proposal carries no `run`"
        return ErrorCode.UNKNOWN_RUN, message
    parent = _parent_of(proposal)
    if parent is not None:
        # Prefect's foreign key: a task run belongs to a flow run that exists (else 404).
        parent_kind = kind_of(parent)
        if parent_kind != "flow_run":
            which = "is a task run" if parent_kind else "does not exist"
            message = f"task run {proposal.run_id} names flow run {parent}, which {which}"
            return ErrorCode.UNKNOWN_RUN, message
    return None


async def process_batch(
    db: PgStore,
    orchestrator: Orchestrator,
    batch: list[Decoded],
    aborts: dict[int, str] | None = None,
) -> list[Processed | None]:
    """Every proposal of ``batch`` inside the caller's transaction, in delivery order; None
    for one whose run another transaction holds (to be settled alone, after this commit).

    ``aborts`` maps an index to the reason it is answered ABORT without running the rules
    (its rules raised on an earlier attempt). Raises ``RuleFailed`` for a rule's error and
    ``StoreError`` for the database's; the caller rolls back either way.
    """
    aborts = aborts or {}
    proposals = [decoded.proposal for decoded in batch]
    runs = await _lock_and_create(db, proposals)
    known = await db.find_processed_many(sorted({p.proposal_id for p in proposals}))
    store = BatchStore(db, runs.locked)
    await _prepare(store, db)

    settled: dict[uuid.UUID, tuple[str, Processed]] = {
        proposal_id: (record.body_sha256, replay(record)) for proposal_id, record in known.items()
    }
    results: list[Processed | None] = []
    for index, decoded in enumerate(batch):
        proposal = decoded.proposal
        if (proposal.run_kind, proposal.run_id) in runs.held_elsewhere:
            results.append(None)
            continue
        if index in runs.refused:
            results.append(runs.refused[index])
            continue
        earlier = settled.get(proposal.proposal_id)
        if earlier is not None:
            body_sha256, processed = earlier
            if body_sha256 != decoded.body_sha256:
                message = f"proposal {proposal.proposal_id} was already processed with another body"
                results.append(_refusal(proposal, ErrorCode.PROPOSAL_ID_CONFLICT, message))
            else:
                results.append(Processed(processed.outcome, processed.outbox, replayed=True))
            continue
        processed = await _decide(store, orchestrator, index, proposal, aborts.get(index))
        store.record(
            {
                "p_proposal_id": proposal.proposal_id,
                "p_body_sha256": decoded.body_sha256,
                "p_run_kind": proposal.run_kind,
                "p_run_id": proposal.run_id,
                "p_status": processed.outcome.status.value,
                "p_outcome": processed.outcome.model_dump_json(),
                "p_outbox": _OUTBOX.dump_json(processed.outbox).decode(),
            }
        )
        settled[proposal.proposal_id] = (decoded.body_sha256, processed)
        results.append(processed)
    await store.flush()
    return results


async def _prepare(store: BatchStore, db: PgStore) -> None:
    """Read what the rules will ask for once per batch instead of once per proposal: the
    flow runs of the batch's task runs, and their tag limits (locked, in tag order)."""
    task_runs = [run for run in store.runs.values() if isinstance(run, TaskRun)]
    parents = sorted(
        {run.flow_run_id for run in task_runs if run.flow_run_id is not None}
        - {run_id for kind, run_id in store.runs if kind == "flow_run"}
    )
    if parents:
        found = await db.read_runs("flow_run", parents)
        for run_id in parents:
            store.remember("flow_run", found.get(run_id), run_id)
    tags = sorted({tag for run in task_runs for tag in run.tags})
    if tags:
        await store.lock_tag_limits(tags)


async def _decide(
    store: BatchStore,
    orchestrator: Orchestrator,
    index: int,
    proposal: Proposal,
    abort_reason: str | None,
) -> Processed:
    run = store.runs[(proposal.run_kind, proposal.run_id)]
    if abort_reason is not None:
        return Processed(outcome=abort_outcome(proposal, run, abort_reason))
    state = proposal.state.to_state(orchestrator.clock())
    context: OrchestrationContext  # type: ignore[type-arg]
    try:
        if isinstance(run, FlowRun):
            context = await orchestrator.set_flow_run_state(store, run, state, force=proposal.force)
        else:
            context = await orchestrator.set_task_run_state(store, run, state, force=proposal.force)
    except StoreError:
        raise
    except Exception as exc:
        raise RuleFailed(index, exc) from exc
    return Processed(outcome=outcome_from_context(proposal, context), outbox=list(context.outbox))
