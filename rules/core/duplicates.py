"""Idempotent state proposals: a transition sent twice is written once."""

from __future__ import annotations

from arbiter.rules.base import ALL_ORCHESTRATION_STATES, FlowRunOrchestrationRule
from arbiter.rules.context import FlowOrchestrationContext
from arbiter.schemas.states import State


class PreventDuplicateTransitions(FlowRunOrchestrationRule):
    """A proposal carrying the ``transition_id`` of the run's current state is a replay.

    A client whose request was committed but whose response was lost retries
    with the same ``transition_id``; without this rule the retry would write
    the same transition a second time (a second RUNNING, a second PENDING that
    PreventPendingTransitions would abort). The replay is null-rejected, so the
    client receives the state its first request already wrote. Both states
    must carry an id: proposals without one are never deduplicated. Flow runs
    only, as in Prefect.
    """

    FROM_STATES = ALL_ORCHESTRATION_STATES
    TO_STATES = ALL_ORCHESTRATION_STATES

    async def before_transition(
        self,
        initial_state: State | None,
        proposed_state: State | None,
        context: FlowOrchestrationContext,
    ) -> None:
        if initial_state is None or proposed_state is None:
            return
        initial_id = initial_state.state_details.transition_id
        proposed_id = proposed_state.state_details.transition_id
        if initial_id is not None and proposed_id is not None and initial_id == proposed_id:
            await self.reject_transition(
                state=None, reason="This run has already made this state transition."
            )
