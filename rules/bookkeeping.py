"""The global bookkeeping transforms: run fields every transition keeps current.

They run innermost on every transition, after every policy rule has had its
say, and do nothing when the transition was nullified (nothing is written).
"""

from __future__ import annotations

import datetime as dt

from arbiter.rules.base import (
    FlowRunUniversalTransform,
    GenericUniversalTransform,
    TaskRunUniversalTransform,
)
from arbiter.rules.context import (
    FlowOrchestrationContext,
    OrchestrationContext,
    TaskOrchestrationContext,
)
from arbiter.schemas.states import StateType

_ONE_MICROSECOND = dt.timedelta(microseconds=1)


class EnsureFlowRunStateTimestampIsUnique(FlowRunUniversalTransform):
    """Bumps the proposed timestamp by 1 µs until no state of this flow run has it,
    so a flow run's history has a strict order even when clients send equal times."""

    async def before_transition(self, context: FlowOrchestrationContext) -> None:
        if await self.nullified_transition() or context.proposed_state is None:
            return
        proposed = context.proposed_state
        timestamp = proposed.timestamp
        while await context.store.flow_state_timestamp_taken(context.run.id, timestamp):
            timestamp += _ONE_MICROSECOND
        proposed.timestamp = timestamp


class SetRunStateType(GenericUniversalTransform):
    """Mirrors the new state's type on the run row, for queries by state."""

    async def before_transition(self, context: OrchestrationContext) -> None:  # type: ignore[type-arg]
        if context.proposed_state is not None:
            context.run.state_type = context.proposed_state.type


class SetRunStateName(GenericUniversalTransform):
    """Mirrors the new state's name on the run row."""

    async def before_transition(self, context: OrchestrationContext) -> None:  # type: ignore[type-arg]
        if context.proposed_state is not None:
            context.run.state_name = context.proposed_state.name


class SetRunStateTimestamp(GenericUniversalTransform):
    """Mirrors the new state's timestamp on the run row."""

    async def before_transition(self, context: OrchestrationContext) -> None:  # type: ignore[type-arg]
        if context.proposed_state is not None:
            context.run.state_timestamp = context.proposed_state.timestamp


class SetStartTime(GenericUniversalTransform):
    """Records when the run first entered RUNNING."""

    async def before_transition(self, context: OrchestrationContext) -> None:  # type: ignore[type-arg]
        proposed = context.proposed_state
        if proposed is None:
            return
        if proposed.type is StateType.RUNNING and context.run.start_time is None:
            context.run.start_time = proposed.timestamp


class SetEndTime(GenericUniversalTransform):
    """Records when the run reached a final state; clears it when it leaves one."""

    async def before_transition(self, context: OrchestrationContext) -> None:  # type: ignore[type-arg]
        proposed = context.proposed_state
        if proposed is None:
            return
        run = context.run
        initial = context.initial_state
        if initial is not None and initial.is_final() and not proposed.is_final():
            run.end_time = None
        if proposed.is_final() and run.end_time is None:
            if run.start_time is None:
                run.start_time = proposed.timestamp
            run.end_time = proposed.timestamp


class IncrementRunTime(GenericUniversalTransform):
    """Accumulates the time spent in RUNNING."""

    async def before_transition(self, context: OrchestrationContext) -> None:  # type: ignore[type-arg]
        proposed, initial = context.proposed_state, context.initial_state
        if proposed is None or initial is None:
            return
        if initial.type is StateType.RUNNING:
            context.run.total_run_time += proposed.timestamp - initial.timestamp


class SetExpectedStartTime(GenericUniversalTransform):
    """Records once when the run was first expected to start."""

    async def before_transition(self, context: OrchestrationContext) -> None:  # type: ignore[type-arg]
        proposed = context.proposed_state
        if proposed is None or context.run.expected_start_time is not None:
            return
        if proposed.type is StateType.SCHEDULED:
            context.run.expected_start_time = proposed.state_details.scheduled_time
        else:
            context.run.expected_start_time = proposed.timestamp


class SetNextScheduledStartTime(GenericUniversalTransform):
    """Keeps ``next_scheduled_start_time`` set exactly while the run is SCHEDULED."""

    async def before_transition(self, context: OrchestrationContext) -> None:  # type: ignore[type-arg]
        proposed, initial = context.proposed_state, context.initial_state
        if proposed is None:
            return
        if initial is not None and initial.type is StateType.SCHEDULED:
            context.run.next_scheduled_start_time = None
        if proposed.type is StateType.SCHEDULED:
            context.run.next_scheduled_start_time = proposed.state_details.scheduled_time


class UpdateStateDetails(GenericUniversalTransform):
    """Stamps the run ids on the new state, whatever the executor sent."""

    async def before_transition(self, context: OrchestrationContext) -> None:  # type: ignore[type-arg]
        proposed = context.proposed_state
        if proposed is None:
            return
        if isinstance(context, TaskOrchestrationContext):
            proposed.state_details.flow_run_id = context.run.flow_run_id
            proposed.state_details.task_run_id = context.run.id
        elif isinstance(context, FlowOrchestrationContext):
            proposed.state_details.flow_run_id = context.run.id


class UpdateSubflowParentTask(FlowRunUniversalTransform):
    """Mirrors a subflow's new state onto its parent task run, in the same transaction,
    so the parent flow sees the subflow's progress through its task."""

    async def after_transition(self, context: FlowOrchestrationContext) -> None:
        if await self.nullified_transition():
            return
        parent_id = context.run.parent_task_run_id
        validated = context.validated_state
        if parent_id is None or validated is None or context.orchestrator is None:
            return
        parent = await context.store.lock_task_run(parent_id)
        if parent is None:
            return
        mirrored = validated.fresh_copy(context.now())
        mirrored.state_details.child_flow_run_id = context.run.id
        nested = await context.orchestrator.set_task_run_state(
            context.store, parent, mirrored, force=True
        )
        context.outbox.extend(nested.outbox)


class UpdateSubflowStateDetails(FlowRunUniversalTransform):
    """Points a subflow's states at the parent task run."""

    async def before_transition(self, context: FlowOrchestrationContext) -> None:
        proposed = context.proposed_state
        if proposed is None or context.run.parent_task_run_id is None:
            return
        proposed.state_details.task_run_id = context.run.parent_task_run_id


class IncrementFlowRunCount(FlowRunUniversalTransform):
    """Counts entries into RUNNING, except a resume from a pause (same attempt)."""

    async def before_transition(self, context: FlowOrchestrationContext) -> None:
        proposed = context.proposed_state
        if proposed is None or proposed.type is not StateType.RUNNING:
            return
        if context.run.empirical_policy.resuming:
            return
        context.run.run_count += 1


class RemoveResumingIndicator(FlowRunUniversalTransform):
    """Clears ``resuming`` once the resumed run is running again or has finished."""

    async def before_transition(self, context: FlowOrchestrationContext) -> None:
        proposed = context.proposed_state
        if proposed is None:
            return
        policy = context.run.empirical_policy
        if (proposed.type is StateType.RUNNING or proposed.is_final()) and policy.resuming:
            context.run.empirical_policy = policy.model_copy(update={"resuming": False})


class IncrementTaskRunCount(TaskRunUniversalTransform):
    """Counts entries into RUNNING: the attempt number while running."""

    async def before_transition(self, context: TaskOrchestrationContext) -> None:
        proposed = context.proposed_state
        if proposed is not None and proposed.type is StateType.RUNNING:
            context.run.run_count += 1
