"""Task retries (``rules/core/task_retries.py``): scheduling the next attempt, naming
reruns, tracking the parent flow's attempt.

Ported from Prefect's ``tests/server/orchestration/test_core_policy.py``
(reference §5.2, tests 20-37): Prefect's class and test names are kept so
``docs/parity.md`` can map them; classes named after a rule hold the extra scenarios.
"""

from __future__ import annotations

from itertools import product

import pytest

from arbiter.rules.base import (
    StateTypeOrNone,
)
from arbiter.rules.context import TaskOrchestrationContext
from arbiter.rules.core.jitter import lower_clamp_multiple
from arbiter.rules.core.task_retries import (
    RenameReruns,
    RetryFailedTasks,
    UpdateFlowRunTrackerOnTasks,
)
from arbiter.rules.core.task_terminal import HandleTaskTerminalStateTransitions
from arbiter.rules.errors import ObjectNotFoundError
from arbiter.rules.results import SetStateStatus, StateRejectDetails
from arbiter.rules.store import AdminStore
from arbiter.schemas.states import StateType
from tests.factories import initialize_orchestration
from tests.unit.core.helpers import (
    ALL_STATES,
    NOW,
    apply_rules,
    frozen_orchestrator,
    lose_flow_run,
    other_types,
    rejecting_rule,
    type_id,
)


class TestUpdatingFlowRunTrackerOnTasks:
    @pytest.mark.parametrize(
        ("flow_run_count", "initial_state_type"),
        list(product((5, 42), ALL_STATES)),
        ids=lambda value: type_id(value),
    )
    async def test_task_runs_track_corresponding_flow_runs(
        self, store: AdminStore, flow_run_count: int, initial_state_type: StateTypeOrNone
    ) -> None:
        """After entering RUNNING the task records its flow run's run_count."""
        ctx = await initialize_orchestration(
            store, "task", initial_state_type, StateType.RUNNING, flow_run_count=flow_run_count
        )
        flow_run = await ctx.flow_run()
        assert flow_run is not None
        assert flow_run.run_count == flow_run_count
        ctx.run.flow_run_run_count = 1

        await apply_rules(ctx, [UpdateFlowRunTrackerOnTasks], validate=False)

        assert ctx.run.flow_run_run_count == flow_run_count

    async def test_task_run_tracking_raises_informative_errors_on_missing_flow_runs(
        self, store: AdminStore
    ) -> None:
        """A deleted parent flow run raises ObjectNotFoundError and leaves the tracker alone."""
        ctx = await initialize_orchestration(
            store, "task", StateType.PENDING, StateType.RUNNING, flow_run_count=42
        )
        ctx.run.flow_run_run_count = 1
        assert ctx.run.flow_run_id is not None
        intended = (StateType.PENDING, StateType.RUNNING)

        with pytest.raises(ObjectNotFoundError, match="Unable to read flow run") as raised:
            async with UpdateFlowRunTrackerOnTasks(ctx, *intended):
                await lose_flow_run(store, ctx)

        assert str(raised.value) == (
            f"Unable to read flow run associated with task run: {ctx.run.id}, "
            "this flow run might have been deleted"
        )
        assert ctx.run.flow_run_run_count == 1

    async def test_autonomous_task_runs_track_nothing(self, store: AdminStore) -> None:
        """A task without a flow run enters RUNNING without reading any flow run."""
        ctx = await initialize_orchestration(store, "task", StateType.PENDING, StateType.RUNNING)
        ctx.run.flow_run_id = None

        ctx = await apply_rules(ctx, [UpdateFlowRunTrackerOnTasks])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.run.flow_run_run_count == 0


class TestPermitRerunningFailedTaskRuns:
    async def _rerun_context(
        self, store: AdminStore, *, flow_run_count: int, tracked: int, **options: object
    ) -> TaskOrchestrationContext:
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.FAILED,
            StateType.RUNNING,
            flow_run_count=flow_run_count,
            **options,
        )
        flow_run = await ctx.flow_run()
        assert flow_run is not None
        assert flow_run.run_count == flow_run_count
        ctx.run.flow_run_run_count = tracked
        ctx.run.run_count = 2
        await store.save_run("task_run", ctx.run)
        return ctx

    async def test_bypasses_terminal_state_rule_if_flow_is_retrying(
        self, store: AdminStore
    ) -> None:
        """A failed task rerun by a newer flow attempt runs as "Retrying" with a fresh run_count."""
        ctx = await self._rerun_context(store, flow_run_count=4, tracked=2, flow_retries=10)

        ctx = await apply_rules(
            ctx, [HandleTaskTerminalStateTransitions, UpdateFlowRunTrackerOnTasks], validate=False
        )

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.run.run_count == 0
        assert ctx.proposed_state is not None
        assert ctx.proposed_state.name == "Retrying"
        assert ctx.run.flow_run_run_count == 4

    async def test_can_run_again_even_if_exceeding_flow_runs_count(self, store: AdminStore) -> None:
        """A failed task may run again within the same flow attempt, without a rename."""
        ctx = await self._rerun_context(
            store, flow_run_count=3, tracked=3, flow_retries=10, initial_state_data="test"
        )

        ctx = await apply_rules(
            ctx, [HandleTaskTerminalStateTransitions, UpdateFlowRunTrackerOnTasks], validate=False
        )

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.run.run_count == 0
        assert ctx.proposed_state is not None
        assert ctx.proposed_state.type == StateType.RUNNING
        assert ctx.proposed_state.name == "Running"
        assert ctx.run.flow_run_run_count == 3

    async def test_bypasses_terminal_state_rule_if_configured_automatic_retries_is_exceeded(
        self, store: AdminStore
    ) -> None:
        """A manual rerun works even once the flow's automatic retries are used up."""
        ctx = await self._rerun_context(store, flow_run_count=4, tracked=2, flow_retries=1)

        ctx = await apply_rules(
            ctx, [HandleTaskTerminalStateTransitions, UpdateFlowRunTrackerOnTasks], validate=False
        )

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.run.run_count == 0
        assert ctx.proposed_state is not None
        assert ctx.proposed_state.name == "Retrying"
        assert ctx.run.flow_run_run_count == 4

    @pytest.mark.parametrize(
        "fizzle_into", other_types(StateType.FAILED, StateType.RUNNING), ids=type_id
    )
    async def test_cleans_up_after_invalid_transition(
        self, store: AdminStore, fizzle_into: StateType
    ) -> None:
        """When a later rule changes the transition, run_count and the tracker are left alone."""
        ctx = await self._rerun_context(store, flow_run_count=4, tracked=2, flow_retries=10)

        ctx = await apply_rules(
            ctx,
            [
                HandleTaskTerminalStateTransitions,
                UpdateFlowRunTrackerOnTasks,
                rejecting_rule(fizzle_into),
            ],
            validate=False,
        )

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.run.run_count == 2
        assert ctx.proposed_state is not None
        assert ctx.proposed_state.name == "Retrying"
        assert ctx.run.flow_run_run_count == 2


class TestTaskRetryingRule:
    async def _failing_context(
        self,
        store: AdminStore,
        *,
        run_count: int,
        retries: int | None,
        retry_delay: int | list[int] | None = None,
        jitter: float | None = None,
    ) -> TaskOrchestrationContext:
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.RUNNING,
            StateType.FAILED,
            orchestrator=frozen_orchestrator(),
        )
        ctx.run.run_count = run_count
        ctx.run_settings.retries = retries
        ctx.run_settings.retry_delay = retry_delay
        ctx.run_settings.retry_jitter_factor = jitter
        return ctx

    @staticmethod
    def _delay_s(ctx: TaskOrchestrationContext) -> float:
        assert ctx.validated_state is not None
        scheduled_time = ctx.validated_state.state_details.scheduled_time
        assert scheduled_time is not None
        return (scheduled_time - NOW).total_seconds()

    async def test_retry_potential_failures(self, store: AdminStore) -> None:
        """A failure with retries left is rejected into a SCHEDULED "AwaitingRetry" state."""
        ctx = await self._failing_context(store, run_count=2, retries=2)

        ctx = await apply_rules(ctx, [RetryFailedTasks])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.response_details == StateRejectDetails(reason="Retrying")
        assert ctx.validated_state is not None
        assert ctx.validated_state.type == StateType.SCHEDULED
        assert ctx.validated_state.name == "AwaitingRetry"

    async def test_task_retry_uses_configured_delay(self, store: AdminStore) -> None:
        """The retry is scheduled retry_delay seconds from now."""
        ctx = await self._failing_context(store, run_count=2, retries=2, retry_delay=10)

        ctx = await apply_rules(ctx, [RetryFailedTasks])

        assert ctx.response_status == SetStateStatus.REJECT
        assert self._delay_s(ctx) == 10

    @pytest.mark.parametrize("retry", [1, 2, 3, 4, 5])
    async def test_retry_uses_configured_delays(self, store: AdminStore, retry: int) -> None:
        """A list of delays gives the delay of each attempt in turn."""
        configured_retry_delays = [2, 3, 5, 7, 11]
        ctx = await self._failing_context(
            store, run_count=retry, retries=5, retry_delay=configured_retry_delays
        )

        ctx = await apply_rules(ctx, [RetryFailedTasks])

        assert ctx.response_status == SetStateStatus.REJECT
        assert self._delay_s(ctx) == configured_retry_delays[retry - 1]

    async def test_retry_uses_falls_back_to_last_delay(self, store: AdminStore) -> None:
        """Attempts beyond the list of delays reuse the last delay."""
        ctx = await self._failing_context(store, run_count=6, retries=6, retry_delay=[2, 3, 5, 7])

        ctx = await apply_rules(ctx, [RetryFailedTasks])

        assert ctx.response_status == SetStateStatus.REJECT
        assert self._delay_s(ctx) == 7

    async def test_retries_can_jitter_sleeps(
        self, store: AdminStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With a jitter factor the delay comes from clamped_poisson_interval."""

        def randomizer(
            average_interval: float, clamping_factor: float = 0.3, rng: object = None
        ) -> float:
            return average_interval * (1 + clamping_factor)

        monkeypatch.setattr("arbiter.rules.core.task_retries.clamped_poisson_interval", randomizer)
        ctx = await self._failing_context(store, run_count=2, retries=2, retry_delay=10, jitter=9)

        ctx = await apply_rules(ctx, [RetryFailedTasks])

        assert ctx.response_status == SetStateStatus.REJECT
        assert self._delay_s(ctx) == 100

    async def test_jitter_with_zero_delay_does_not_raise(self, store: AdminStore) -> None:
        """No configured delay with a jitter factor retries immediately."""
        ctx = await self._failing_context(store, run_count=1, retries=2, jitter=0.5)

        ctx = await apply_rules(ctx, [RetryFailedTasks])

        assert ctx.response_status == SetStateStatus.REJECT
        assert self._delay_s(ctx) == 0

    async def test_stops_retrying_eventually(self, store: AdminStore) -> None:
        """Once run_count exceeds retries the failure is accepted."""
        ctx = await self._failing_context(store, run_count=3, retries=2)

        ctx = await apply_rules(ctx, [RetryFailedTasks])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.validated_state_type == StateType.FAILED

    async def test_not_retriable_detail_set(self, store: AdminStore) -> None:
        """A failure marked retriable=False is final even with retries left."""
        ctx = await self._failing_context(store, run_count=1, retries=2)
        assert ctx.proposed_state is not None
        ctx.proposed_state.state_details.retriable = False

        ctx = await apply_rules(ctx, [RetryFailedTasks])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.validated_state_type == StateType.FAILED

    async def test_manual_retry_works_even_when_not_retriable(self, store: AdminStore) -> None:
        """A FAILED proposal named "AwaitingRetry" but not retriable is accepted as is."""
        ctx = await self._failing_context(store, run_count=1, retries=1)
        assert ctx.proposed_state is not None
        ctx.proposed_state.name = "AwaitingRetry"
        ctx.proposed_state.state_details.retriable = False

        ctx = await apply_rules(ctx, [RetryFailedTasks])

        assert ctx.response_status == SetStateStatus.ACCEPT

    async def test_no_retries_configured_accepts_the_failure(self, store: AdminStore) -> None:
        """retries=None means no retry at all."""
        ctx = await self._failing_context(store, run_count=1, retries=None)

        ctx = await apply_rules(ctx, [RetryFailedTasks])

        assert ctx.response_status == SetStateStatus.ACCEPT

    async def test_retry_state_carries_the_failure_message_and_data(
        self, store: AdminStore
    ) -> None:
        """AwaitingRetry keeps the failed state's message and data."""
        ctx = await self._failing_context(store, run_count=1, retries=1)
        assert ctx.proposed_state is not None
        ctx.proposed_state.message = "boom"
        ctx.proposed_state.data = {"type": "unpersisted"}

        ctx = await apply_rules(ctx, [RetryFailedTasks])

        assert ctx.validated_state is not None
        assert ctx.validated_state.message == "boom"
        assert ctx.validated_state.data == {"type": "unpersisted"}

    async def test_unpatched_jitter_stays_within_the_clamps(self, store: AdminStore) -> None:
        """A real jittered delay lies between the lower and upper clamps of the base delay."""
        ctx = await self._failing_context(store, run_count=1, retries=1, retry_delay=10, jitter=0.3)

        ctx = await apply_rules(ctx, [RetryFailedTasks])

        assert 10 * lower_clamp_multiple(1.3) <= self._delay_s(ctx) <= 13


class TestRenameRetryingStates:
    async def _rename(
        self, store: AdminStore, *, run_count: int, initial_name: str | None = None
    ) -> TaskOrchestrationContext:
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.SCHEDULED,
            StateType.RUNNING,
            initial_state_name=initial_name,
        )
        ctx.run.run_count = run_count
        ctx.run_settings.retries = 2
        ctx = await apply_rules(ctx, [RenameReruns])
        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.validated_state_type == StateType.RUNNING
        return ctx

    async def test_rerun_states_get_renamed(self, store: AdminStore) -> None:
        """A RUNNING proposal of a run that already ran is named "Rerunning"."""
        ctx = await self._rename(store, run_count=2)

        assert ctx.validated_state is not None
        assert ctx.validated_state.name == "Rerunning"

    async def test_retried_states_get_renamed(self, store: AdminStore) -> None:
        """A RUNNING proposal right after "AwaitingRetry" is named "Retrying"."""
        ctx = await self._rename(store, run_count=2, initial_name="AwaitingRetry")

        assert ctx.validated_state is not None
        assert ctx.validated_state.name == "Retrying"

    async def test_no_rename_on_first_run(self, store: AdminStore) -> None:
        """A first RUNNING keeps its name."""
        ctx = await self._rename(store, run_count=0)

        assert ctx.validated_state is not None
        assert ctx.validated_state.name == "Running"
