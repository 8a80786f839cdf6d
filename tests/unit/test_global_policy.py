"""The global bookkeeping transforms: the run fields every transition keeps current.

A port of Prefect's ``tests/server/orchestration/test_global_policy.py`` (reference §5.3).
Each transform is entered alone on a context from ``initialize_orchestration``, whose
initial state was force-committed through the minimal and global policies.
"""

from __future__ import annotations

import datetime as dt

import pytest

from arbiter.rules.base import TERMINAL_TYPES, StateTypeOrNone
from arbiter.rules.bookkeeping import (
    IncrementFlowRunCount,
    IncrementRunTime,
    IncrementTaskRunCount,
    RemoveResumingIndicator,
    SetEndTime,
    SetExpectedStartTime,
    SetNextScheduledStartTime,
    SetRunStateName,
    SetRunStateTimestamp,
    SetRunStateType,
    SetStartTime,
    UpdateSubflowParentTask,
    UpdateSubflowStateDetails,
)
from arbiter.rules.context import FlowOrchestrationContext
from arbiter.rules.engine import Orchestrator
from arbiter.rules.memory import InMemoryStore
from arbiter.schemas.runs import TaskRun
from arbiter.schemas.states import StateType, utcnow
from tests.factories import (
    RunType,
    create_flow_run,
    create_task_run,
    initialize_orchestration,
    make_state,
)

RUN_TYPES: list[RunType] = ["task", "flow"]
TERMINAL: list[StateTypeOrNone] = sorted(TERMINAL_TYPES, key=str)


async def create_parent_task_run(
    store: InMemoryStore, orchestrator: Orchestrator, state_type: StateType
) -> TaskRun:
    """A task run in another flow run that stands for a subflow, already in ``state_type``."""
    parent_flow_run = await create_flow_run(store)
    parent_task_run = await create_task_run(store, flow_run_id=parent_flow_run.id)
    await orchestrator.set_task_run_state(
        store, parent_task_run, make_state(state_type), force=True
    )
    return parent_task_run


@pytest.mark.parametrize("run_type", RUN_TYPES)
class TestGlobalPolicyRules:
    @pytest.mark.parametrize("proposed_state_type", list(StateType), ids=str)
    async def test_rule_updates_run_state_type(
        self, store: InMemoryStore, run_type: RunType, proposed_state_type: StateType
    ) -> None:
        """The run's ``state_type`` mirrors the new state's type."""
        transition = (None, proposed_state_type)
        ctx = await initialize_orchestration(store, run_type, *transition)

        async with SetRunStateType(ctx, *transition):
            await ctx.validate_proposed_state()

        assert ctx.run.state_type is proposed_state_type

    async def test_rule_updates_run_state_name(
        self, store: InMemoryStore, run_type: RunType
    ) -> None:
        """The run's ``state_name`` mirrors the new state's name."""
        transition = (None, StateType.SCHEDULED)
        ctx = await initialize_orchestration(
            store, run_type, *transition, proposed_state_name="AwaitingSomething"
        )

        async with SetRunStateName(ctx, *transition):
            await ctx.validate_proposed_state()

        assert ctx.run.state_name == "AwaitingSomething"

    @pytest.mark.parametrize("proposed_state_type", list(StateType), ids=str)
    async def test_rule_updates_run_state_timestamp(
        self, store: InMemoryStore, run_type: RunType, proposed_state_type: StateType
    ) -> None:
        """The run's ``state_timestamp`` mirrors the new state's timestamp."""
        transition = (None, proposed_state_type)
        ctx = await initialize_orchestration(store, run_type, *transition)
        assert ctx.proposed_state is not None

        async with SetRunStateTimestamp(ctx, *transition):
            await ctx.validate_proposed_state()

        assert ctx.run.state_timestamp == ctx.proposed_state.timestamp

    async def test_rule_sets_scheduled_time(self, store: InMemoryStore, run_type: RunType) -> None:
        """Entering SCHEDULED records its scheduled time as the next scheduled start."""
        transition = (None, StateType.SCHEDULED)
        scheduled_time = utcnow() + dt.timedelta(seconds=42)
        ctx = await initialize_orchestration(
            store, run_type, *transition, proposed_details={"scheduled_time": scheduled_time}
        )
        assert ctx.run.start_time is None

        async with SetNextScheduledStartTime(ctx, *transition):
            await ctx.validate_proposed_state()

        assert ctx.run.next_scheduled_start_time == scheduled_time
        assert ctx.run.start_time is None

    async def test_rule_removes_scheduled_time_when_exiting_scheduled_state(
        self, store: InMemoryStore, run_type: RunType
    ) -> None:
        """Leaving SCHEDULED clears the next scheduled start."""
        transition = (StateType.SCHEDULED, StateType.PENDING)
        scheduled_time = utcnow() + dt.timedelta(seconds=42)
        ctx = await initialize_orchestration(
            store, run_type, *transition, initial_details={"scheduled_time": scheduled_time}
        )
        assert ctx.run.next_scheduled_start_time == scheduled_time
        assert ctx.run.start_time is None

        async with SetNextScheduledStartTime(ctx, *transition):
            await ctx.validate_proposed_state()

        assert ctx.run.next_scheduled_start_time is None
        assert ctx.run.start_time is None

    @pytest.mark.parametrize(
        "proposed_state_type",
        [StateType.PENDING, StateType.RUNNING, StateType.COMPLETED],
        ids=str,
    )
    async def test_rule_sets_expected_start_time_from_non_scheduled(
        self, store: InMemoryStore, run_type: RunType, proposed_state_type: StateType
    ) -> None:
        """A first state that is not SCHEDULED is expected to start at its own timestamp."""
        transition = (None, proposed_state_type)
        ctx = await initialize_orchestration(store, run_type, *transition)
        assert ctx.proposed_state is not None
        assert ctx.run.expected_start_time is None

        async with SetExpectedStartTime(ctx, *transition):
            await ctx.validate_proposed_state()

        assert ctx.run.expected_start_time == ctx.proposed_state.timestamp
        assert ctx.run.start_time is None

    async def test_rule_sets_expected_start_time_from_scheduled(
        self, store: InMemoryStore, run_type: RunType
    ) -> None:
        """A first SCHEDULED state is expected to start at its scheduled time."""
        transition = (None, StateType.SCHEDULED)
        scheduled_time = utcnow() + dt.timedelta(days=10)
        ctx = await initialize_orchestration(
            store, run_type, *transition, proposed_details={"scheduled_time": scheduled_time}
        )
        assert ctx.run.expected_start_time is None

        async with SetExpectedStartTime(ctx, *transition):
            await ctx.validate_proposed_state()

        assert ctx.run.expected_start_time == scheduled_time
        assert ctx.run.start_time is None

    async def test_rule_sets_start_time_when_starting_to_run(
        self, store: InMemoryStore, run_type: RunType
    ) -> None:
        """Entering RUNNING for the first time records the start time."""
        transition = (StateType.PENDING, StateType.RUNNING)
        ctx = await initialize_orchestration(store, run_type, *transition)
        assert ctx.proposed_state is not None
        assert ctx.run.start_time is None

        async with SetStartTime(ctx, *transition):
            await ctx.validate_proposed_state()

        assert ctx.run.start_time == ctx.proposed_state.timestamp

    async def test_rule_updates_run_count_when_starting_to_run(
        self, store: InMemoryStore, run_type: RunType
    ) -> None:
        """Entering RUNNING counts the first attempt."""
        transition = (StateType.PENDING, StateType.RUNNING)
        ctx = await initialize_orchestration(store, run_type, *transition)
        assert ctx.run.run_count == 0

        if isinstance(ctx, FlowOrchestrationContext):
            async with IncrementFlowRunCount(ctx, *transition):
                await ctx.validate_proposed_state()
        else:
            async with IncrementTaskRunCount(ctx, *transition):
                await ctx.validate_proposed_state()

        assert ctx.run.run_count == 1

    async def test_rule_increments_run_count(self, store: InMemoryStore, run_type: RunType) -> None:
        """Entering RUNNING again counts one more attempt."""
        transition = (StateType.PENDING, StateType.RUNNING)
        ctx = await initialize_orchestration(store, run_type, *transition)
        ctx.run.run_count = 41

        if isinstance(ctx, FlowOrchestrationContext):
            async with IncrementFlowRunCount(ctx, *transition):
                await ctx.validate_proposed_state()
        else:
            async with IncrementTaskRunCount(ctx, *transition):
                await ctx.validate_proposed_state()

        assert ctx.run.run_count == 42

    async def test_rule_updates_run_time_after_running(
        self, store: InMemoryStore, run_type: RunType
    ) -> None:
        """Leaving RUNNING adds the time spent in it to the total run time."""
        transition = (StateType.RUNNING, StateType.COMPLETED)
        ctx = await initialize_orchestration(store, run_type, *transition)
        assert ctx.initial_state is not None
        assert ctx.proposed_state is not None
        now = utcnow()
        ctx.run.start_time = now - dt.timedelta(seconds=42)
        ctx.initial_state.timestamp = now - dt.timedelta(seconds=42)
        ctx.proposed_state.timestamp = now
        assert ctx.run.total_run_time == dt.timedelta(0)

        async with IncrementRunTime(ctx, *transition):
            await ctx.validate_proposed_state()

        assert ctx.run.total_run_time == dt.timedelta(seconds=42)

    async def test_rule_doesnt_update_run_time_when_not_running(
        self, store: InMemoryStore, run_type: RunType
    ) -> None:
        """Time spent outside RUNNING does not count as run time."""
        transition = (StateType.PENDING, StateType.COMPLETED)
        ctx = await initialize_orchestration(store, run_type, *transition)
        assert ctx.initial_state is not None
        assert ctx.proposed_state is not None
        now = utcnow()
        ctx.run.start_time = now - dt.timedelta(seconds=42)
        ctx.initial_state.timestamp = now - dt.timedelta(seconds=42)
        ctx.proposed_state.timestamp = now
        assert ctx.run.total_run_time == dt.timedelta(0)

        async with IncrementRunTime(ctx, *transition):
            await ctx.validate_proposed_state()

        assert ctx.run.total_run_time == dt.timedelta(0)

    @pytest.mark.parametrize("proposed_state_type", TERMINAL, ids=str)
    async def test_rule_sets_end_time_when_when_run_ends(
        self, store: InMemoryStore, run_type: RunType, proposed_state_type: StateType
    ) -> None:
        """Reaching a final state records the end time."""
        transition = (StateType.RUNNING, proposed_state_type)
        ctx = await initialize_orchestration(store, run_type, *transition)
        assert ctx.proposed_state is not None
        ctx.run.start_time = utcnow() - dt.timedelta(seconds=42)
        assert ctx.run.end_time is None

        async with SetEndTime(ctx, *transition):
            await ctx.validate_proposed_state()

        assert ctx.run.end_time == ctx.proposed_state.timestamp

    @pytest.mark.parametrize("initial_state_type", TERMINAL, ids=str)
    async def test_rule_unsets_end_time_when_forced_out_of_terminal_state(
        self, store: InMemoryStore, run_type: RunType, initial_state_type: StateType
    ) -> None:
        """Leaving a final state for a running one clears the end time."""
        transition = (initial_state_type, StateType.RUNNING)
        ctx = await initialize_orchestration(store, run_type, *transition)
        ctx.run.start_time = utcnow() - dt.timedelta(seconds=42)
        ctx.run.end_time = utcnow()

        async with SetEndTime(ctx, *transition):
            await ctx.validate_proposed_state()

        assert ctx.run.end_time is None

    async def test_rule_does_not_modify_end_time_when_transitioning_from_final_to_final(
        self, store: InMemoryStore, run_type: RunType
    ) -> None:
        """Moving from one final state to another keeps the original end time."""
        transition = (StateType.COMPLETED, StateType.FAILED)
        ctx = await initialize_orchestration(store, run_type, *transition)
        end_time = utcnow()
        ctx.run.start_time = end_time - dt.timedelta(seconds=42)
        ctx.run.end_time = end_time

        async with SetEndTime(ctx, *transition):
            await ctx.validate_proposed_state()

        assert ctx.run.end_time == end_time


async def test_update_subflow_parent_task(store: InMemoryStore) -> None:
    """A subflow's new state is mirrored onto its parent task run, pointing back at the subflow."""
    transition = (StateType.RUNNING, StateType.FAILED)
    orchestrator = Orchestrator()
    ctx = await initialize_orchestration(store, "flow", *transition, orchestrator=orchestrator)
    parent_task_run = await create_parent_task_run(store, orchestrator, StateType.RUNNING)
    ctx.run.parent_task_run_id = parent_task_run.id
    assert parent_task_run.state is not None
    assert parent_task_run.state.type is StateType.RUNNING

    async with UpdateSubflowParentTask(ctx, *transition):
        await ctx.validate_proposed_state()

    parent = await store.read_task_run(parent_task_run.id)
    assert parent is not None
    assert parent.state is not None
    assert parent.state.type is StateType.FAILED
    assert parent.state.state_details.child_flow_run_id == ctx.run.id
    assert parent.state_type is StateType.FAILED


async def test_child_flow_run_states_include_parent_task_run_id(store: InMemoryStore) -> None:
    """A subflow's new states point at the parent task run."""
    transition = (StateType.RUNNING, StateType.FAILED)
    orchestrator = Orchestrator()
    ctx = await initialize_orchestration(store, "flow", *transition, orchestrator=orchestrator)
    parent_task_run = await create_parent_task_run(store, orchestrator, StateType.RUNNING)
    ctx.run.parent_task_run_id = parent_task_run.id

    async with UpdateSubflowStateDetails(ctx, *transition):
        await ctx.validate_proposed_state()

    assert ctx.run.state is not None
    assert ctx.run.state.type is StateType.FAILED
    assert ctx.run.state.state_details.task_run_id == parent_task_run.id


class TestPausingRules:
    @pytest.mark.parametrize("initial_state_type", [StateType.PAUSED, StateType.PENDING], ids=str)
    async def test_rule_unsets_resuming_indicator_on_running(
        self, store: InMemoryStore, initial_state_type: StateType
    ) -> None:
        """A resumed flow run that is running again is no longer resuming."""
        transition = (initial_state_type, StateType.RUNNING)
        ctx = await initialize_orchestration(store, "flow", *transition, resuming=True)
        assert ctx.run.empirical_policy.resuming is True

        async with RemoveResumingIndicator(ctx, *transition):
            await ctx.validate_proposed_state()

        assert ctx.run.empirical_policy.resuming is False

    @pytest.mark.parametrize("initial_state_type", [StateType.PAUSED, StateType.PENDING], ids=str)
    async def test_running_resuming_flow_does_not_increment_run_count(
        self, store: InMemoryStore, initial_state_type: StateType
    ) -> None:
        """Running again after a resume continues the same attempt."""
        transition = (initial_state_type, StateType.RUNNING)
        ctx = await initialize_orchestration(
            store, "flow", *transition, resuming=True, flow_run_count=42
        )
        assert ctx.run.empirical_policy.resuming is True
        assert ctx.run.run_count == 42

        async with IncrementFlowRunCount(ctx, *transition):
            await ctx.validate_proposed_state()

        assert ctx.run.run_count == 42
