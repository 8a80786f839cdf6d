"""Many proposals, one transaction: lock every run up front, decide in memory, write set-based.

Two statements per batch. The first locks the batch's runs of each kind in id order (so
two workers' batches over overlapping runs wait for each other instead of deadlocking;
a batch of several skips runs other transactions hold and leaves their proposals to be
settled alone) and reads them with their states, the replay records of the batch's
proposal ids and the kind of every id it names. New runs are built in memory, in
delivery order. Then the rules run for each proposal in delivery order against a
``BatchStore`` overlay, so two proposals for one run see each other's writes (a
multi-task batch first locks its tag limits, in tag order), and ``flush`` writes
everything, new runs included, in the second statement before the single COMMIT.

A rule's own exception is not the batch's fault: ``RuleFailed`` names the proposal, and
the caller runs the batch again with that proposal answered by a stored ABORT instead.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace

from arbiter.rules.context import OrchestrationContext
from arbiter.rules.core.leases import renew_run_slots
from arbiter.rules.engine import Orchestrator
from arbiter.rules.errors import StoreError
from arbiter.rules.store import Deployment
from arbiter.schemas import (
    ErrorCode,
    FlowRun,
    FlowRunSpec,
    Outcome,
    OutcomeDetails,
    OutcomeStatus,
    Proposal,
    TaskRun,
    TaskRunSpec,
)
from arbiter.schemas.runs import DeploymentSpec, RunKind
from arbiter.worker import parking
from arbiter.worker.db.batch_store import BatchStore, RunKey
from arbiter.worker.db.store import PgStore, ProcessedProposal
from arbiter.worker.decode import Decoded, Invalid
from arbiter.worker.outcomes import abort_outcome, invalid_outcome, outcome_from_context
from arbiter.worker.unit_of_work import OUTBOX, Processed, replay

__all__ = ["RuleFailed", "process_batch"]

_KINDS: tuple[RunKind, RunKind] = ("flow_run", "task_run")


class RuleFailed(Exception):
    """The rules raised while deciding proposal ``index`` of the batch (a permanent error)."""

    def __init__(self, index: int, cause: Exception) -> None:
        super().__init__(repr(cause))
        self.index = index
        self.cause = cause


@dataclass(frozen=True)
class _Runs:
    """The batch's runs once locked (new ones built in memory, inserted at the end), and
    the INVALID answers decided while locking."""

    locked: dict[RunKey, FlowRun | TaskRun]
    new: dict[RunKey, int]  # run → the index of the proposal that creates it
    refused: dict[int, Processed]
    held_elsewhere: set[RunKey]
    processed: dict[uuid.UUID, ProcessedProposal]


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


async def _lock_and_create(db: PgStore, proposals: list[Proposal], aborts: dict[int, str]) -> _Runs:
    """Lock and read the batch's runs, and build the new ones, as one proposal at a time
    would.

    A batch of several skips the runs other transactions hold (``held_elsewhere``): their
    proposals are settled alone afterwards, so a long-held run delays nobody else. A batch
    of one waits for its run's lock, as it must. New runs are inserted with the batch's
    other writes; if another transaction created one first, that write fails as retryable.
    A proposal answered ABORT for its rules' error creates nothing, as its own rolled-back
    transaction would not have.
    """
    keys: set[RunKey] = {(p.run_kind, p.run_id) for p in proposals}
    skip_locked = len(proposals) > 1
    # The first read also finds the replay records and which ids name which kind of run.
    asked: dict[str, list[uuid.UUID]] = {
        "proposal_ids": sorted({p.proposal_id for p in proposals}),
        "known_ids": sorted(
            {run_id for _, run_id in keys}
            | {parent for p in proposals if (parent := _parent_of(p)) is not None}
        ),
    }
    runs: dict[RunKey, FlowRun | TaskRun] = {}
    processed: dict[uuid.UUID, ProcessedProposal] = {}
    kinds: dict[uuid.UUID, RunKind] = {}
    for kind in _KINDS:
        ids = sorted(run_id for k, run_id in keys if k == kind)
        if not ids:
            continue
        read = await db.read_batch(kind, ids, skip_locked=skip_locked, **asked)
        asked = {}
        runs.update(((kind, run_id), run) for run_id, run in read.runs.items())
        processed.update(read.processed)
        kinds.update(read.kinds)
    refused: dict[int, Processed] = {}
    creating: dict[RunKey, FlowRun | TaskRun] = {}
    creators: dict[RunKey, int] = {}
    held = {key for key in keys - runs.keys() if kinds.get(key[1]) == key[0]}
    for index, proposal in enumerate(proposals):
        key: RunKey = (proposal.run_kind, proposal.run_id)
        if key in runs or key in creating or key in held or index in aborts:
            continue
        why = _why_not_created(proposal, kinds, creating)
        if why is not None:
            refused[index] = _refusal(proposal, *why)
            continue
        new_run = _new_run(proposal)
        assert new_run is not None
        creating[key] = new_run
        creators[key] = index
    runs.update(creating)
    return _Runs(runs, creators, refused, held, processed)


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
    runs = await _lock_and_create(db, proposals, aborts)
    await _upsert_deployments(db, proposals, runs.new)
    store = BatchStore(db, runs.locked, runs.new)
    await _prepare(store, db)

    settled: dict[uuid.UUID, tuple[str, Processed]] = {
        proposal_id: (record.body_sha256, replay(record))
        for proposal_id, record in runs.processed.items()
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
                again = Processed(
                    processed.outcome,
                    processed.outbox,
                    replayed=True,
                    outcome_json=processed.outcome_json,
                )
                results.append(parking.replayed(decoded, again))
            continue
        if proposal.renew_leases and index not in aborts:
            processed = await _renew(store, orchestrator, proposal)
        else:
            processed = await _decide(store, orchestrator, index, proposal, aborts.get(index))
        processed = parking.mark_parked(decoded, processed)
        outcome_json = processed.outcome.model_dump_json()
        store.record(
            proposal.proposal_id,
            decoded.body_sha256,
            (proposal.run_kind, proposal.run_id),
            processed.outcome.status.value,
            outcome_json,
            OUTBOX.dump_json(processed.outbox).decode(),
        )
        processed = replace(processed, outcome_json=outcome_json)
        settled[proposal.proposal_id] = (decoded.body_sha256, processed)
        results.append(processed)
    await store.flush()
    now = orchestrator.clock()
    await parking.park(db, batch, results, now)
    await parking.wake_waiters(db, store.freed_tags, now)
    return results


async def _upsert_deployments(
    db: PgStore, proposals: list[Proposal], new: dict[RunKey, int]
) -> None:
    """The deployments that new flow runs' descriptions name, created or updated before
    the rules run (the latest description wins), in deployment-id order."""
    named: dict[uuid.UUID, DeploymentSpec] = {}
    for index in sorted(new.values()):
        spec = proposals[index].run
        if isinstance(spec, FlowRunSpec) and spec.deployment is not None:
            named[spec.deployment.id] = spec.deployment
    for deployment_id in sorted(named):
        await db.upsert_deployment(Deployment(**named[deployment_id].model_dump()))


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
    if tags and len(task_runs) > 1:
        # All at once, in tag order, so batches never wait for each other's limits in
        # opposite orders; a single task run's rules lock its tags themselves, in order.
        await store.lock_tag_limits(tags)


async def _renew(store: BatchStore, orchestrator: Orchestrator, proposal: Proposal) -> Processed:
    """A lease renewal: ACCEPT with the run's state, however many leases it renewed."""
    run = store.runs[(proposal.run_kind, proposal.run_id)]
    renewed = await renew_run_slots(store, run, orchestrator.clock(), orchestrator.settings)
    outcome = Outcome(
        proposal_id=proposal.proposal_id,
        run_kind=proposal.run_kind,
        run_id=proposal.run_id,
        status=OutcomeStatus.ACCEPT,
        state=run.state,
        details=OutcomeDetails(reason=f"Renewed {renewed} slot lease(s); no state written."),
        run=run.summary(),
    )
    return Processed(outcome=outcome)


async def _decide(
    store: BatchStore,
    orchestrator: Orchestrator,
    index: int,
    proposal: Proposal,
    abort_reason: str | None,
) -> Processed:
    key: RunKey = (proposal.run_kind, proposal.run_id)
    run = store.runs.get(key)
    if abort_reason is not None:
        if key in store.new and store.new[key] > index:
            run = None  # created by a later proposal of the batch: not there yet
        return Processed(outcome=abort_outcome(proposal, run, abort_reason))
    assert run is not None
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
