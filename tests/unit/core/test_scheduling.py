"""Scheduled time (``rules/core/scheduling.py``): carried from SCHEDULED into PENDING,
enforced before RUNNING, for task and flow runs alike.

Ported from Prefect's ``tests/server/orchestration/test_core_policy.py``
(reference §5.2, tests 1-5): Prefect's class and test names are kept so
``docs/parity.md`` can map them; classes named after a rule hold the extra scenarios.
"""

from __future__ import annotations

import datetime as dt

import pytest

from arbiter.rules.core.scheduling import CopyScheduledTime, WaitForScheduledTime
from arbiter.rules.results import (
    SetStateStatus,
    StateWaitDetails,
)
from arbiter.rules.store import AdminStore
from arbiter.schemas.states import StateType
from tests.factories import RunType, initialize_orchestration
from tests.unit.core.helpers import (
    NOW,
    apply_rules,
    frozen_orchestrator,
    type_id,
)

RUN_TYPES: list[RunType] = ["task", "flow"]


@pytest.mark.parametrize("run_type", RUN_TYPES)
class TestWaitForScheduledTimeRule:
    @pytest.mark.parametrize(
        "initial_state_type", [StateType.SCHEDULED, StateType.PENDING], ids=type_id
    )
    async def test_running_after_scheduled_start_time_is_not_delayed(
        self, store: AdminStore, run_type: RunType, initial_state_type: StateType
    ) -> None:
        """A run whose scheduled time has passed starts at once."""
        ctx = await initialize_orchestration(
            store,
            run_type,
            initial_state_type,
            StateType.RUNNING,
            orchestrator=frozen_orchestrator(),
            initial_details={"scheduled_time": NOW - dt.timedelta(minutes=5)},
        )

        ctx = await apply_rules(ctx, [WaitForScheduledTime])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.validated_state_type == StateType.RUNNING

    @pytest.mark.parametrize(
        "initial_state_type", [StateType.SCHEDULED, StateType.PENDING], ids=type_id
    )
    async def test_running_before_scheduled_start_time_is_delayed(
        self, store: AdminStore, run_type: RunType, initial_state_type: StateType
    ) -> None:
        """A run proposed before its scheduled time is told to wait the remaining seconds."""
        ctx = await initialize_orchestration(
            store,
            run_type,
            initial_state_type,
            StateType.RUNNING,
            orchestrator=frozen_orchestrator(),
            initial_details={"scheduled_time": NOW + dt.timedelta(minutes=5)},
        )

        ctx = await apply_rules(ctx, [WaitForScheduledTime])

        assert ctx.response_status == SetStateStatus.WAIT
        assert ctx.proposed_state is None
        assert isinstance(ctx.response_details, StateWaitDetails)
        assert abs(ctx.response_details.delay_seconds - 300) < 2
        assert ctx.response_details.reason == "Scheduled time is in the future"
        assert ctx.validated_state_type == initial_state_type

    @pytest.mark.parametrize(
        "proposed_state_type",
        [StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED],
        ids=type_id,
    )
    async def test_scheduling_rule_does_not_fire_against_other_state_types(
        self, store: AdminStore, run_type: RunType, proposed_state_type: StateType
    ) -> None:
        """Only transitions into RUNNING wait for the scheduled time."""
        transition = (StateType.SCHEDULED, proposed_state_type)
        ctx = await initialize_orchestration(
            store,
            run_type,
            *transition,
            orchestrator=frozen_orchestrator(),
            initial_details={"scheduled_time": NOW + dt.timedelta(minutes=5)},
        )

        rule = WaitForScheduledTime(ctx, *transition)
        async with rule:
            pass

        assert await rule.invalid()
        assert ctx.response_status == SetStateStatus.ACCEPT

    @pytest.mark.parametrize(
        ("offset_s", "expected_status", "expected_delay_s"),
        [
            pytest.param(1.6, SetStateStatus.WAIT, 2, id="1.6s-waits-2s"),
            pytest.param(1.4, SetStateStatus.WAIT, 1, id="1.4s-waits-1s"),
            pytest.param(0.4, SetStateStatus.ACCEPT, None, id="0.4s-rounds-to-now"),
        ],
    )
    async def test_delay_is_rounded_to_the_nearest_second(
        self,
        store: AdminStore,
        run_type: RunType,
        offset_s: float,
        expected_status: SetStateStatus,
        expected_delay_s: int | None,
    ) -> None:
        """The wait is the remaining time rounded to whole seconds; under half a second runs."""
        ctx = await initialize_orchestration(
            store,
            run_type,
            StateType.SCHEDULED,
            StateType.RUNNING,
            orchestrator=frozen_orchestrator(),
            initial_details={"scheduled_time": NOW + dt.timedelta(seconds=offset_s)},
        )

        ctx = await apply_rules(ctx, [WaitForScheduledTime])

        assert ctx.response_status == expected_status
        if expected_delay_s is not None:
            assert ctx.response_details == StateWaitDetails(
                delay_seconds=expected_delay_s, reason="Scheduled time is in the future"
            )

    async def test_pending_without_scheduled_time_is_not_delayed(
        self, store: AdminStore, run_type: RunType
    ) -> None:
        """A PENDING state that carries no scheduled time never waits."""
        ctx = await initialize_orchestration(
            store,
            run_type,
            StateType.PENDING,
            StateType.RUNNING,
            orchestrator=frozen_orchestrator(),
        )

        ctx = await apply_rules(ctx, [WaitForScheduledTime])

        assert ctx.response_status == SetStateStatus.ACCEPT


@pytest.mark.parametrize("run_type", RUN_TYPES)
class TestCopyScheduledTime:
    async def test_scheduled_time_copied_from_scheduled_to_pending(
        self, store: AdminStore, run_type: RunType
    ) -> None:
        """The SCHEDULED state's time is carried onto the PENDING state."""
        scheduled_time = NOW - dt.timedelta(minutes=5)
        ctx = await initialize_orchestration(
            store,
            run_type,
            StateType.SCHEDULED,
            StateType.PENDING,
            orchestrator=frozen_orchestrator(),
            initial_details={"scheduled_time": scheduled_time},
        )

        ctx = await apply_rules(ctx, [CopyScheduledTime])

        assert ctx.validated_state is not None
        assert ctx.validated_state.type == StateType.PENDING
        assert ctx.validated_state.state_details.scheduled_time == scheduled_time

    @pytest.mark.parametrize(
        "proposed_state_type",
        [
            StateType.COMPLETED,
            StateType.FAILED,
            StateType.CANCELLED,
            StateType.CRASHED,
            StateType.RUNNING,
        ],
        ids=type_id,
    )
    async def test_scheduled_time_not_copied_for_other_transitions(
        self, store: AdminStore, run_type: RunType, proposed_state_type: StateType
    ) -> None:
        """Only SCHEDULED → PENDING copies the scheduled time."""
        transition = (StateType.SCHEDULED, proposed_state_type)
        ctx = await initialize_orchestration(
            store,
            run_type,
            *transition,
            orchestrator=frozen_orchestrator(),
            initial_details={"scheduled_time": NOW + dt.timedelta(minutes=5)},
        )

        rule = CopyScheduledTime(ctx, *transition)
        async with rule:
            await ctx.validate_proposed_state()

        assert await rule.invalid()

    async def test_proposed_scheduled_time_is_kept(
        self, store: AdminStore, run_type: RunType
    ) -> None:
        """A scheduled time sent with the PENDING proposal wins over the SCHEDULED one."""
        proposed_time = NOW + dt.timedelta(hours=1)
        ctx = await initialize_orchestration(
            store,
            run_type,
            StateType.SCHEDULED,
            StateType.PENDING,
            orchestrator=frozen_orchestrator(),
            initial_details={"scheduled_time": NOW - dt.timedelta(minutes=5)},
            proposed_details={"scheduled_time": proposed_time},
        )

        ctx = await apply_rules(ctx, [CopyScheduledTime])

        assert ctx.validated_state is not None
        assert ctx.validated_state.state_details.scheduled_time == proposed_time
