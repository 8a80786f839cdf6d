"""Background (deferred) task runs: submitted to a queue, picked up by task workers."""

from __future__ import annotations

from arbiter.rules.base import ALL_ORCHESTRATION_STATES, TaskRunOrchestrationRule, states
from arbiter.rules.context import OutboxMessage, TaskOrchestrationContext
from arbiter.schemas.states import State, StateType


class CopyTaskParametersID(TaskRunOrchestrationRule):
    """A background task keeps pointing at its stored parameters until it runs.

    The parameters of a deferred task are stored once, at submission, and
    referenced by ``task_parameters_id`` on its SCHEDULED state. The task
    worker that picks it up proposes PENDING and RUNNING without that id; it
    is copied forward so the run can still find its parameters.
    """

    FROM_STATES = states(StateType.SCHEDULED, StateType.PENDING)
    TO_STATES = states(StateType.PENDING, StateType.RUNNING)

    async def before_transition(
        self,
        initial_state: State | None,
        proposed_state: State | None,
        context: TaskOrchestrationContext,
    ) -> None:
        if initial_state is None or proposed_state is None:
            return
        if not proposed_state.state_details.task_parameters_id:
            # state_details is shared with the real proposed state: this write sticks.
            proposed_state.state_details.task_parameters_id = (
                initial_state.state_details.task_parameters_id
            )


class EnqueueScheduledTasks(TaskRunOrchestrationRule):
    """A deferred task reaches a task worker once its SCHEDULED state is written.

    The message goes to ``context.outbox``, which the worker publishes only
    after the transaction commits: a worker can never receive a task whose
    SCHEDULED state was rolled back, and a committed one is always published.
    A retry ("AwaitingRetry") is flagged so the queue can treat it as such.
    """

    FROM_STATES = ALL_ORCHESTRATION_STATES
    TO_STATES = states(StateType.SCHEDULED)

    async def after_transition(
        self,
        initial_state: State | None,
        validated_state: State | None,
        context: TaskOrchestrationContext,
    ) -> None:
        if validated_state is None or not validated_state.state_details.deferred:
            return
        task_run = context.run
        context.outbox.append(
            OutboxMessage(
                channel="task_run",
                routing_key=task_run.task_key,
                body={
                    "task_run_id": str(task_run.id),
                    "task_key": task_run.task_key,
                    "state": validated_state.model_dump(mode="json"),
                    "retry": validated_state.name == "AwaitingRetry",
                },
                message_id=str(validated_state.id),
            )
        )
