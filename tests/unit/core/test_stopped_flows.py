"""Tasks of stopped flows (``rules/core/stopped_flows.py``): a task may only start while
its flow run is running.

Ported from Prefect's ``tests/server/orchestration/test_core_policy.py``
(reference §5.2, tests 87-89): Prefect's class and test names are kept so
``docs/parity.md`` can map them; classes named after a rule hold the extra scenarios.
"""

from __future__ import annotations

import datetime as dt

import pytest

from arbiter.rules.core.stopped_flows import PreventRunningTasksFromStoppedFlows
from arbiter.rules.results import SetStateStatus, StateRejectDetails
from arbiter.rules.store import AdminStore
from arbiter.schemas.states import StateType, utcnow
from tests.factories import initialize_orchestration
from tests.unit.core.helpers import (
    apply_rules,
    lose_flow_run,
    other_types,
    type_id,
)


class TestPreventRunningTasksFromStoppedFlows:
    async def test_allows_task_runs_to_run(self, store: AdminStore) -> None:
        """A task of a RUNNING flow may run."""
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.PENDING,
            StateType.RUNNING,
            initial_flow_run_state_type=StateType.RUNNING,
        )

        ctx = await apply_rules(ctx, [PreventRunningTasksFromStoppedFlows])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.validated_state_type == StateType.RUNNING

    @pytest.mark.parametrize(
        "initial_flow_run_state_type", other_types(StateType.RUNNING), ids=type_id
    )
    async def test_prevents_tasks_From_running(
        self, store: AdminStore, initial_flow_run_state_type: StateType
    ) -> None:
        """A paused flow parks its tasks in PAUSED; any other non-running flow aborts them."""
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.PENDING,
            StateType.RUNNING,
            initial_flow_run_state_type=initial_flow_run_state_type,
        )

        ctx = await apply_rules(ctx, [PreventRunningTasksFromStoppedFlows])

        if initial_flow_run_state_type == StateType.PAUSED:
            assert ctx.response_status == SetStateStatus.REJECT
            assert ctx.validated_state_type == StateType.PAUSED
        else:
            assert ctx.response_status == SetStateStatus.ABORT
            assert ctx.response_details.model_dump()["reason"] == (
                "The enclosing flow must be running to begin task execution."
            )
            assert ctx.validated_state_type == StateType.PENDING

    async def test_does_not_reuse_state_pk_from_paused_flow_run(self, store: AdminStore) -> None:
        """The task gets a new "NotReady" state with the flow's pause timeout and reschedule."""
        pause_timeout = utcnow() + dt.timedelta(minutes=10)
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.PENDING,
            StateType.RUNNING,
            initial_flow_run_state_type=StateType.PAUSED,
            initial_flow_run_state_details={
                "pause_timeout": pause_timeout,
                "pause_reschedule": True,
            },
        )
        flow_run = await ctx.flow_run()
        assert flow_run is not None
        assert flow_run.state is not None

        ctx = await apply_rules(ctx, [PreventRunningTasksFromStoppedFlows])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.response_details == StateRejectDetails(
            reason="The flow is paused, new tasks can execute after resuming flow run: "
            f"{flow_run.id}."
        )
        paused = ctx.validated_state
        assert paused is not None
        assert paused.id != flow_run.state.id
        assert (paused.type, paused.name) == (StateType.PAUSED, "NotReady")
        assert paused.state_details.pause_timeout == pause_timeout
        assert paused.state_details.pause_reschedule is True

    async def test_aborts_when_the_flow_run_has_no_state(self, store: AdminStore) -> None:
        """A flow run that has no state yet is not running."""
        ctx = await initialize_orchestration(store, "task", StateType.PENDING, StateType.RUNNING)

        ctx = await apply_rules(ctx, [PreventRunningTasksFromStoppedFlows])

        assert ctx.response_status == SetStateStatus.ABORT

    async def test_allows_autonomous_task_runs(self, store: AdminStore) -> None:
        """A task without a flow run is not restricted."""
        ctx = await initialize_orchestration(store, "task", StateType.PENDING, StateType.RUNNING)
        ctx.run.flow_run_id = None

        ctx = await apply_rules(ctx, [PreventRunningTasksFromStoppedFlows])

        assert ctx.response_status == SetStateStatus.ACCEPT

    async def test_allows_tasks_whose_flow_run_cannot_be_read(self, store: AdminStore) -> None:
        """A task whose flow run has disappeared is not restricted by this rule."""
        ctx = await initialize_orchestration(store, "task", StateType.PENDING, StateType.RUNNING)
        await lose_flow_run(store, ctx)

        ctx = await apply_rules(ctx, [PreventRunningTasksFromStoppedFlows])

        assert ctx.response_status == SetStateStatus.ACCEPT
