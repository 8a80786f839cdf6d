"""Task retries: scheduling the next attempt, naming reruns, tracking the parent flow's attempt."""

from __future__ import annotations

import datetime as dt

from arbiter.rules.base import (
    ALL_ORCHESTRATION_STATES,
    GenericOrchestrationRule,
    TaskRunOrchestrationRule,
    states,
)
from arbiter.rules.context import OrchestrationContext, TaskOrchestrationContext
from arbiter.rules.core.jitter import clamped_poisson_interval
from arbiter.rules.errors import ObjectNotFoundError
from arbiter.schemas.runs import TaskRunPolicy
from arbiter.schemas.states import State, StateDetails, StateType


class RetryFailedTasks(TaskRunOrchestrationRule):
    """A failing task with retries left is rescheduled instead of failing.

    While ``run_count <= retries`` (so ``retries=N`` allows N + 1 attempts), the
    FAILED proposal is rejected into SCHEDULED "AwaitingRetry", due after the
    configured delay (optionally jittered, so tasks that failed together do not
    retry in lockstep), and carrying the failure's message and data. A failure
    marked ``retriable=False`` is final at once. The budget is counted by the
    server (``run_count`` grows on every entry into RUNNING), not by the
    executor, so an executor that restarts cannot reset it.
    """

    FROM_STATES = states(StateType.RUNNING)
    TO_STATES = states(StateType.FAILED)

    async def before_transition(
        self,
        initial_state: State | None,
        proposed_state: State | None,
        context: TaskOrchestrationContext,
    ) -> None:
        if initial_state is None or proposed_state is None:
            return
        if proposed_state.state_details.retriable is False:
            return
        run_count = context.run.run_count
        retries = context.run_settings.retries
        if retries is None or run_count > retries:
            return
        delay_s = _retry_delay_s(context.run_settings, run_count)
        now = context.now()
        awaiting_retry = State(
            type=StateType.SCHEDULED,
            name="AwaitingRetry",
            timestamp=now,
            message=proposed_state.message,
            data=proposed_state.data,
            state_details=StateDetails(scheduled_time=now + dt.timedelta(seconds=delay_s)),
        )
        await self.reject_transition(state=awaiting_retry, reason="Retrying")


def _retry_delay_s(settings: TaskRunPolicy, run_count: int) -> float:
    """The delay before the next attempt: the configured one for this attempt, jittered.

    A list gives one delay per attempt, the last one repeating; as in Prefect,
    ``run_count`` 0 picks the last delay (Python indexing). An empty list means
    no delay.
    """
    configured = settings.retry_delay
    base_delay_s: float
    if isinstance(configured, list):
        base_delay_s = configured[min(run_count - 1, len(configured) - 1)] if configured else 0
    else:
        base_delay_s = configured or 0
    jitter = settings.retry_jitter_factor
    if jitter and base_delay_s > 0:
        return clamped_poisson_interval(base_delay_s, clamping_factor=jitter)
    return base_delay_s


class RenameReruns(GenericOrchestrationRule):
    """A RUNNING state that is not the run's first attempt says so in its name.

    After an "AwaitingRetry" state the attempt is named "Retrying", otherwise
    "Rerunning", so a run's history tells automatic retries from reruns. Only
    task policies use it; a flow's RUNNING keeps the name the client sent.
    """

    FROM_STATES = ALL_ORCHESTRATION_STATES
    TO_STATES = states(StateType.RUNNING)

    async def before_transition(
        self,
        initial_state: State | None,
        proposed_state: State | None,
        context: OrchestrationContext,  # type: ignore[type-arg]
    ) -> None:
        if initial_state is None or proposed_state is None:
            return
        if context.run.run_count > 0:
            if initial_state.name == "AwaitingRetry":
                await self.rename_state("Retrying")
            else:
                await self.rename_state("Rerunning")


class UpdateFlowRunTrackerOnTasks(TaskRunOrchestrationRule):
    """A running task records which attempt of its flow run it belongs to.

    ``flow_run_run_count`` is what HandleTaskTerminalStateTransitions compares
    with the flow's ``run_count`` to recognise a task rerun by a newer flow
    attempt. It is set after the RUNNING state was written; a parent flow run
    that has disappeared (deleted meanwhile) fails the transition loudly
    rather than leaving a task running for a flow that no longer exists.
    """

    FROM_STATES = ALL_ORCHESTRATION_STATES
    TO_STATES = states(StateType.RUNNING)

    async def after_transition(
        self,
        initial_state: State | None,
        validated_state: State | None,
        context: TaskOrchestrationContext,
    ) -> None:
        if context.run.flow_run_id is None:
            return
        flow_run = await context.flow_run()
        if flow_run is None:
            raise ObjectNotFoundError(
                f"Unable to read flow run associated with task run: {context.run.id}, "
                "this flow run might have been deleted"
            )
        context.run.flow_run_run_count = flow_run.run_count
