"""Cancellation: CANCELLING ends in CANCELLED, and runs without infrastructure skip it."""

from __future__ import annotations

from arbiter.rules.base import (
    FlowRunOrchestrationRule,
    GenericOrchestrationRule,
    all_states_except,
    states,
)
from arbiter.rules.context import FlowOrchestrationContext, OrchestrationContext
from arbiter.schemas.states import State, StateType


class EnforceCancellingToCancelledTransition(GenericOrchestrationRule):
    """A run that is being cancelled can only become CANCELLED.

    CANCELLING means infrastructure teardown is under way; an executor that
    has not yet noticed keeps reporting progress (RUNNING, COMPLETED, even
    CRASHED when its process is killed), and each of those would resurrect
    the run or hide the cancellation. Every target but CANCELLED, including a
    second CANCELLING, is null-rejected. CANCELLED itself may move on (a
    rerun): the rule only covers CANCELLING.

    Prefect declares it as a task rule but compiles it only into the flow
    policy; here it is generic so its type says where it may be used.
    """

    FROM_STATES = states(StateType.CANCELLING)
    TO_STATES = all_states_except(StateType.CANCELLED)

    async def before_transition(
        self,
        initial_state: State | None,
        proposed_state: State | None,
        context: OrchestrationContext,  # type: ignore[type-arg]
    ) -> None:
        await self.reject_transition(
            state=None,
            reason="Cannot transition flows that are cancelling to a state other than Cancelled.",
        )


class BypassCancellingFlowRunsWithNoInfra(FlowRunOrchestrationRule):
    """A run with nothing to tear down goes straight to CANCELLED.

    CANCELLING asks a worker to stop the run's infrastructure and then report
    CANCELLED. A SCHEDULED run without an ``infrastructure_pid``, a run
    "Resuming" from a suspension, and a suspended (``pause_reschedule``) PAUSED
    run have no infrastructure, so nobody would ever finish the cancellation
    and the run would stay CANCELLING forever. They are rejected into a fresh
    CANCELLED state instead. A SCHEDULED run with a pid (AwaitingRetry with
    live infrastructure) and a blocking pause keep the normal path.

    Also part of the minimal policy, so forced cancellations from a UI get the
    same treatment.
    """

    FROM_STATES = states(StateType.SCHEDULED, StateType.PAUSED)
    TO_STATES = states(StateType.CANCELLING)

    async def before_transition(
        self,
        initial_state: State | None,
        proposed_state: State | None,
        context: FlowOrchestrationContext,
    ) -> None:
        if initial_state is None or proposed_state is None:
            return
        scheduled_without_infra = (
            initial_state.type is StateType.SCHEDULED and not context.run.infrastructure_pid
        )
        if scheduled_without_infra or initial_state.name == "Resuming":
            await self.reject_transition(
                state=State(type=StateType.CANCELLED, timestamp=context.now()),
                reason="Scheduled flow run has no infrastructure to terminate.",
            )
        elif (
            initial_state.type is StateType.PAUSED and initial_state.state_details.pause_reschedule
        ):
            await self.reject_transition(
                state=State(type=StateType.CANCELLED, timestamp=context.now()),
                reason="Suspended flow run has no infrastructure to terminate.",
            )
