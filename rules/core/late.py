"""Marking runs late: only a SCHEDULED run can be late, and only once."""

from __future__ import annotations

from arbiter.rules.base import ALL_ORCHESTRATION_STATES, FlowRunOrchestrationRule, states
from arbiter.rules.context import FlowOrchestrationContext
from arbiter.schemas.states import State, StateType


class EnsureOnlyScheduledFlowsMarkedLate(FlowRunOrchestrationRule):
    """A SCHEDULED "Late" state is written only over a SCHEDULED state that is not already late.

    The late-runs service reads overdue SCHEDULED runs and proposes "Late"
    some time later; meanwhile a worker may have picked the run up (PENDING,
    RUNNING...) or a previous pass may already have marked it. Without this
    rule the stale "Late" would drag a started run back to SCHEDULED, or be
    written twice. Both cases are null-rejected; other SCHEDULED states
    (AwaitingRetry, a reschedule) are not concerned.
    """

    FROM_STATES = ALL_ORCHESTRATION_STATES
    TO_STATES = states(StateType.SCHEDULED)

    async def before_transition(
        self,
        initial_state: State | None,
        proposed_state: State | None,
        context: FlowOrchestrationContext,
    ) -> None:
        if initial_state is None or proposed_state is None:
            return
        if proposed_state.type is not StateType.SCHEDULED or proposed_state.name != "Late":
            return
        if initial_state.type is not StateType.SCHEDULED:
            await self.reject_transition(
                state=None, reason="Only scheduled flows can be marked late."
            )
        elif initial_state.name == "Late":
            await self.reject_transition(state=None, reason="This flow run is already marked late.")
