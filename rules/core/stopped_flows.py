"""Tasks may only start while their flow run is running."""

from __future__ import annotations

from arbiter.rules.base import ALL_ORCHESTRATION_STATES, TaskRunOrchestrationRule, states
from arbiter.rules.context import TaskOrchestrationContext
from arbiter.schemas.states import State, StateDetails, StateType

_NOT_RUNNING_REASON = "The enclosing flow must be running to begin task execution."


class PreventRunningTasksFromStoppedFlows(TaskRunOrchestrationRule):
    """A task enters RUNNING only while its enclosing flow run is RUNNING.

    An executor that has not yet heard that its flow was cancelled, crashed or
    paused would otherwise keep starting tasks. A paused flow's tasks are
    parked in a new PAUSED state named "NotReady" that carries the flow's
    pause timeout and reschedule flag (never the flow state itself: the task
    gets its own state row); any other flow state aborts the task. Autonomous
    tasks, and tasks whose flow run cannot be read, are not restricted.
    """

    FROM_STATES = ALL_ORCHESTRATION_STATES
    TO_STATES = states(StateType.RUNNING)

    async def before_transition(
        self,
        initial_state: State | None,
        proposed_state: State | None,
        context: TaskOrchestrationContext,
    ) -> None:
        flow_run = await context.flow_run()
        if flow_run is None:
            return
        flow_state = flow_run.state
        if flow_state is None:
            await self.abort_transition(reason=_NOT_RUNNING_REASON)
        elif flow_state.type is StateType.PAUSED:
            not_ready = State(
                type=StateType.PAUSED,
                name="NotReady",
                timestamp=context.now(),
                state_details=StateDetails(
                    pause_timeout=flow_state.state_details.pause_timeout,
                    pause_reschedule=flow_state.state_details.pause_reschedule,
                ),
            )
            await self.reject_transition(
                state=not_ready,
                reason="The flow is paused, new tasks can execute after resuming flow run: "
                f"{flow_run.id}.",
            )
        elif flow_state.type is not StateType.RUNNING:
            await self.abort_transition(reason=_NOT_RUNNING_REASON)
