"""Building outcomes from orchestration results, and INVALID outcomes from bad input."""

from __future__ import annotations

from arbiter.rules.context import OrchestrationContext
from arbiter.rules.results import StateWaitDetails
from arbiter.schemas import (
    ErrorCode,
    Outcome,
    OutcomeDetails,
    OutcomeError,
    OutcomeStatus,
    Proposal,
    RuleTraceEntry,
)
from arbiter.schemas.runs import FlowRun, TaskRun
from arbiter.worker.decode import Invalid


def outcome_from_context(
    proposal: Proposal,
    context: OrchestrationContext,  # type: ignore[type-arg]
) -> Outcome:
    """The outcome of an orchestrated proposal: status, state, reason and rule trace."""
    details = context.response_details
    return Outcome(
        proposal_id=proposal.proposal_id,
        run_kind=proposal.run_kind,
        run_id=proposal.run_id,
        status=OutcomeStatus(context.response_status.value),
        state=context.validated_state,
        details=OutcomeDetails(
            reason=getattr(details, "reason", None),
            delay_seconds=details.delay_seconds if isinstance(details, StateWaitDetails) else None,
        ),
        run=context.run.summary(),
        rule_trace=list(context.rule_trace),
    )


def abort_outcome(proposal: Proposal, run: FlowRun | TaskRun | None, reason: str) -> Outcome:
    """An ABORT for a proposal whose orchestration failed permanently (nothing was written)."""
    return Outcome(
        proposal_id=proposal.proposal_id,
        run_kind=proposal.run_kind,
        run_id=proposal.run_id,
        status=OutcomeStatus.ABORT,
        state=run.state if run is not None else None,
        details=OutcomeDetails(reason=reason),
        run=run.summary() if run is not None else None,
        rule_trace=[RuleTraceEntry.model_validate({"rule": "Orchestration", "effect": "abort"})],
    )


def given_up_outcome(identity: Proposal | Invalid, last_error: str, deliveries: int) -> Outcome:
    """The final ABORT of a proposal that failed on every delivery the queue allows.

    Nothing was written for it; it is dead-lettered right after this answer, so the
    executor hears why instead of waiting out its own timeout.
    """
    reason = f"Gave up after {deliveries} deliveries: {last_error}"
    return Outcome(
        proposal_id=identity.proposal_id,
        run_kind=identity.run_kind,
        run_id=identity.run_id,
        status=OutcomeStatus.ABORT,
        details=OutcomeDetails(reason=reason),
        error=OutcomeError(code=ErrorCode.DELIVERY_LIMIT, message=last_error[:1000]),
    )


def invalid_outcome(invalid: Invalid) -> Outcome:
    return Outcome(
        proposal_id=invalid.proposal_id,
        run_kind=invalid.run_kind,
        run_id=invalid.run_id,
        status=OutcomeStatus.INVALID,
        details=OutcomeDetails(reason=invalid.message),
        error=OutcomeError(code=invalid.code, message=invalid.message),
    )
