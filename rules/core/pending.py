"""Guards on entering PENDING."""

from __future__ import annotations

from arbiter.rules.base import GenericOrchestrationRule, states
from arbiter.rules.context import OrchestrationContext
from arbiter.schemas.states import State, StateType


class PreventPendingTransitions(GenericOrchestrationRule):
    """Only one executor may claim a run: PENDING is entered once per attempt.

    Two executors racing to submit the same scheduled run both propose PENDING;
    the run lock serialises them and the second is aborted here. A rename within
    PENDING (Pending → Submitting → InfrastructurePending) is progress, not a race.
    """

    FROM_STATES = states(
        StateType.PENDING, StateType.CANCELLING, StateType.RUNNING, StateType.CANCELLED
    )
    TO_STATES = states(StateType.PENDING)

    async def before_transition(
        self,
        initial_state: State | None,
        proposed_state: State | None,
        context: OrchestrationContext,  # type: ignore[type-arg]
    ) -> None:
        if initial_state is None or proposed_state is None:
            return
        if (
            initial_state.type is StateType.PENDING
            and proposed_state.type is StateType.PENDING
            and initial_state.name != proposed_state.name
            and proposed_state.name != "Pending"
        ):
            details = proposed_state.state_details
            details.scheduled_time = initial_state.state_details.scheduled_time
            details.deployment_concurrency_lease_id = (
                initial_state.state_details.deployment_concurrency_lease_id
            )
            return
        await self.abort_transition(
            reason=f"This run is in a {initial_state.type.name} state and cannot transition "
            "to a PENDING state."
        )
