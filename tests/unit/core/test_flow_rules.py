"""Flow-run rules of the core policies (and the generic scheduling rules), in memory.

Ported from Prefect's ``tests/server/orchestration/test_core_policy.py``
(reference §5.2, tests 1-5, 11-19, 38-52, 74-86, 90-103): Prefect's class and
test names are kept so a parity table can map them; classes named after a
rule hold the extra scenarios. Tests 53-58 live in
``tests/unit/test_prevent_pending_transitions.py`` and the task variants of
38-42 in ``tests/unit/core/test_task_rules.py``.
"""

from __future__ import annotations

import datetime as dt
import uuid
from itertools import product

import pytest

from rules.base import (
    ALL_ORCHESTRATION_STATES,
    FlowRunOrchestrationRule,
    StateTypeOrNone,
)
from rules.context import FlowOrchestrationContext
from rules.core.cancelling import (
    BypassCancellingFlowRunsWithNoInfra,
    EnforceCancellingToCancelledTransition,
)
from rules.core.duplicates import PreventDuplicateTransitions
from rules.core.late import EnsureOnlyScheduledFlowsMarkedLate
from rules.core.pausing import HandlePausingFlows, HandleResumingPausedFlows
from rules.core.retries import RetryFailedFlows
from rules.core.scheduling import CopyScheduledTime, WaitForScheduledTime
from rules.core.terminal import (
    HandleFlowTerminalStateTransitions,
    PreventResultDataLoss,
    has_persisted_result,
)
from rules.memory import InMemoryStore
from rules.results import (
    SetStateStatus,
    StateAbortDetails,
    StateRejectDetails,
    StateWaitDetails,
)
from schemas.runs import FlowRunPolicy
from schemas.states import State, StateDetails, StateType
from tests.factories import RunType, initialize_orchestration
from tests.unit.core.helpers import (
    ALL_STATES,
    CANONICAL_STATES,
    NOW,
    PERSISTED_RESULT,
    TERMINAL_STATES,
    apply_rules,
    frozen_orchestrator,
    transition_id,
    type_id,
)

RUN_TYPES: list[RunType] = ["task", "flow"]

SCALAR_DATA = [1, "hello", True, [1, 2, 3]]

Transition = tuple[StateTypeOrNone, StateTypeOrNone]


def rejecting_rule(to_type: StateType) -> type[FlowRunOrchestrationRule]:
    """A rule that rejects any transition into a copy of the proposed state of ``to_type``."""

    class RejectIntoAnotherType(FlowRunOrchestrationRule):
        FROM_STATES = ALL_ORCHESTRATION_STATES
        TO_STATES = ALL_ORCHESTRATION_STATES

        async def before_transition(
            self,
            initial_state: State | None,
            proposed_state: State | None,
            context: FlowOrchestrationContext,
        ) -> None:
            assert proposed_state is not None
            mutated = proposed_state.model_copy(update={"type": to_type})
            await self.reject_transition(mutated, reason="gotta fizzle some rules, for fun")

    return RejectIntoAnotherType


def paused_state(
    *,
    pause_key: str | None = None,
    timeout_s: int | None = None,
    reschedule: bool = False,
    name: str = "",
) -> State:
    """Prefect's ``Paused(...)`` constructor, stamped on the frozen clock."""
    return State(
        type=StateType.PAUSED,
        name=name,
        timestamp=NOW,
        state_details=StateDetails(
            pause_key=pause_key,
            pause_timeout=NOW + dt.timedelta(seconds=timeout_s) if timeout_s else None,
            pause_reschedule=reschedule,
        ),
    )


@pytest.mark.parametrize("run_type", RUN_TYPES)
class TestWaitForScheduledTimeRule:
    @pytest.mark.parametrize(
        "initial_state_type", [StateType.SCHEDULED, StateType.PENDING], ids=type_id
    )
    async def test_running_after_scheduled_start_time_is_not_delayed(
        self, store: InMemoryStore, run_type: RunType, initial_state_type: StateType
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
        self, store: InMemoryStore, run_type: RunType, initial_state_type: StateType
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
        self, store: InMemoryStore, run_type: RunType, proposed_state_type: StateType
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
        store: InMemoryStore,
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
        self, store: InMemoryStore, run_type: RunType
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
        self, store: InMemoryStore, run_type: RunType
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
        self, store: InMemoryStore, run_type: RunType, proposed_state_type: StateType
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
        self, store: InMemoryStore, run_type: RunType
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


class TestFlowRetryingRule:
    async def test_retries(self, store: InMemoryStore) -> None:
        """A failure with retries left is rejected into SCHEDULED AwaitingRetry."""
        ctx = await initialize_orchestration(store, "flow", StateType.RUNNING, StateType.FAILED)
        ctx.run.run_count = 1
        ctx.run_settings.retries = 1

        ctx = await apply_rules(ctx, [RetryFailedFlows])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.validated_state_type == StateType.SCHEDULED

    async def test_stops_retrying_eventually(self, store: InMemoryStore) -> None:
        """Once run_count exceeds retries the failure is written."""
        ctx = await initialize_orchestration(store, "flow", StateType.RUNNING, StateType.FAILED)
        ctx.run.run_count = 2
        ctx.run_settings.retries = 1

        ctx = await apply_rules(ctx, [RetryFailedFlows])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.validated_state_type == StateType.FAILED

    async def test_sets_retry_type(self, store: InMemoryStore) -> None:
        """An automatic retry is marked "in_process"."""
        ctx = await initialize_orchestration(store, "flow", StateType.RUNNING, StateType.FAILED)
        ctx.run.run_count = 2
        ctx.run_settings.retries = 3

        ctx = await apply_rules(ctx, [RetryFailedFlows])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.run.empirical_policy.retry_type == "in_process"

    async def test_clears_retry_type_on_exhausted_retries(self, store: InMemoryStore) -> None:
        """Exhausted retries clear a previous retry_type."""
        ctx = await initialize_orchestration(store, "flow", StateType.RUNNING, StateType.FAILED)
        ctx.run.run_count = 2
        ctx.run.empirical_policy = FlowRunPolicy(retries=1, retry_type="in_process")

        ctx = await apply_rules(ctx, [RetryFailedFlows])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.run.empirical_policy.retry_type is None

    async def test_awaiting_retry_is_due_after_retry_delay_and_carries_the_failure(
        self, store: InMemoryStore
    ) -> None:
        """AwaitingRetry is due after retry_delay and keeps the failure's message and data."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.RUNNING,
            StateType.FAILED,
            orchestrator=frozen_orchestrator(),
            proposed_state_data={"type": "unpersisted"},
        )
        assert ctx.proposed_state is not None
        ctx.proposed_state.message = "boom"
        ctx.run.run_count = 1
        ctx.run.empirical_policy = FlowRunPolicy(retries=2, retry_delay=30)

        ctx = await apply_rules(ctx, [RetryFailedFlows])

        validated = ctx.validated_state
        assert validated is not None
        assert (validated.type, validated.name) == (StateType.SCHEDULED, "AwaitingRetry")
        assert validated.state_details.scheduled_time == NOW + dt.timedelta(seconds=30)
        assert (validated.message, validated.data) == ("boom", {"type": "unpersisted"})
        assert ctx.response_details == StateRejectDetails(reason="Retrying")

    async def test_retry_resets_pause_bookkeeping(self, store: InMemoryStore) -> None:
        """A retried flow may pause again: pause keys and the resuming flag are cleared."""
        ctx = await initialize_orchestration(store, "flow", StateType.RUNNING, StateType.FAILED)
        ctx.run.run_count = 1
        ctx.run.empirical_policy = FlowRunPolicy(retries=1, pause_keys={"a"}, resuming=True)

        ctx = await apply_rules(ctx, [RetryFailedFlows])

        assert ctx.run.empirical_policy.pause_keys == set()
        assert ctx.run.empirical_policy.resuming is False

    async def test_no_retries_configured_accepts_the_failure(self, store: InMemoryStore) -> None:
        """Without a retries setting the failure is final at once."""
        ctx = await initialize_orchestration(store, "flow", StateType.RUNNING, StateType.FAILED)

        ctx = await apply_rules(ctx, [RetryFailedFlows])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.validated_state_type == StateType.FAILED


class TestManualFlowRetries:
    async def test_can_manual_retry_with_arbitrary_state_name(self, store: InMemoryStore) -> None:
        """FAILED → any SCHEDULED state is a manual retry when the run has a deployment."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.FAILED,
            StateType.SCHEDULED,
            proposed_state_name="FooBar",
            deployment_id=uuid.uuid4(),
        )
        ctx.run.run_count = 2
        ctx.run_settings.retries = 1

        ctx = await apply_rules(ctx, [HandleFlowTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.run.run_count == 2

    async def test_cannot_manual_retry_without_deployment(self, store: InMemoryStore) -> None:
        """Nothing could pick up a rescheduled ad-hoc run, so it is aborted."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.FAILED,
            StateType.SCHEDULED,
            flow_retries=1,
            proposed_state_name="AwaitingRetry",
        )
        ctx.run.run_count = 2

        ctx = await apply_rules(ctx, [HandleFlowTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ABORT
        assert ctx.response_details == StateAbortDetails(
            reason="Cannot reschedule a run without an associated deployment."
        )
        assert ctx.run.run_count == 2

    async def test_manual_retrying_works_even_when_exceeding_max_retries(
        self, store: InMemoryStore
    ) -> None:
        """A manual retry ignores the automatic retry budget."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.FAILED,
            StateType.SCHEDULED,
            flow_retries=1,
            proposed_state_name="AwaitingRetry",
            deployment_id=uuid.uuid4(),
        )
        ctx.run.run_count = 2

        ctx = await apply_rules(ctx, [HandleFlowTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.run.run_count == 2

    async def test_manual_retrying_bypasses_terminal_state_protection(
        self, store: InMemoryStore
    ) -> None:
        """A manual retry keeps the run's attempt count."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.FAILED,
            StateType.SCHEDULED,
            flow_retries=10,
            proposed_state_name="AwaitingRetry",
            deployment_id=uuid.uuid4(),
        )
        ctx.run.run_count = 3

        ctx = await apply_rules(ctx, [HandleFlowTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.run.run_count == 3

    @pytest.mark.parametrize(
        ("proposed_state_type", "expected_retry_type"),
        [(StateType.SCHEDULED, "reschedule"), (StateType.FAILED, None)],
        ids=["SCHEDULED", "FAILED"],
    )
    async def test_manual_retry_updates_retry_type(
        self,
        store: InMemoryStore,
        proposed_state_type: StateType,
        expected_retry_type: str | None,
    ) -> None:
        """Leaving FAILED for SCHEDULED is a "reschedule"; FAILED → FAILED changes nothing."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.FAILED,
            proposed_state_type,
            flow_retries=1,
            deployment_id=uuid.uuid4(),
        )

        ctx = await apply_rules(ctx, [HandleFlowTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.run.empirical_policy.retry_type == expected_retry_type


class TestTransitionsFromTerminalStatesRule:
    """The flow variants of Prefect's run-type-parametrized class."""

    active_transitions = sorted(
        set(product(ALL_STATES, CANONICAL_STATES)) - set(product(TERMINAL_STATES, ALL_STATES)),
        key=str,
    )
    completed_to_non_final: list[Transition] = [
        (StateType.COMPLETED, t)
        for t in (StateType.PENDING, StateType.RUNNING, StateType.SCHEDULED)
    ]

    @pytest.mark.parametrize(
        "intended_transition", [(t, StateType.CRASHED) for t in TERMINAL_STATES], ids=transition_id
    )
    async def test_transitions_from_terminal_states_to_crashed_are_aborted(
        self, store: InMemoryStore, intended_transition: Transition
    ) -> None:
        """A terminal flow run cannot crash afterwards."""
        ctx = await initialize_orchestration(store, "flow", *intended_transition)

        ctx = await apply_rules(ctx, [HandleFlowTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ABORT

    @pytest.mark.parametrize(
        "intended_transition",
        [(t, StateType.CANCELLING) for t in TERMINAL_STATES],
        ids=transition_id,
    )
    async def test_transitions_from_terminal_states_to_cancelling_are_aborted(
        self, store: InMemoryStore, intended_transition: Transition
    ) -> None:
        """A terminal flow run cannot be cancelled afterwards."""
        ctx = await initialize_orchestration(store, "flow", *intended_transition)

        ctx = await apply_rules(ctx, [HandleFlowTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ABORT

    @pytest.mark.parametrize(
        "initial_data", [None, {"type": "unpersisted"}], ids=["no-data", "unpersisted"]
    )
    @pytest.mark.parametrize("intended_transition", completed_to_non_final, ids=transition_id)
    async def test_transitions_from_completed_to_non_final_states_allowed_without_persisted_result(
        self,
        store: InMemoryStore,
        intended_transition: Transition,
        initial_data: dict[str, str] | None,
    ) -> None:
        """A COMPLETED flow run without a persisted result may run again.

        Prefect skips COMPLETED → SCHEDULED for flows (no deployment); here the
        run gets one, so that case is covered too.
        """
        ctx = await initialize_orchestration(
            store,
            "flow",
            *intended_transition,
            initial_state_data=initial_data,
            deployment_id=uuid.uuid4(),
        )

        ctx = await apply_rules(ctx, [HandleFlowTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT

    @pytest.mark.parametrize(
        "initial_data",
        [PERSISTED_RESULT, {"type": "literal", "value": 1}],
        ids=["result-record", "literal-result"],
    )
    @pytest.mark.parametrize("intended_transition", completed_to_non_final, ids=transition_id)
    async def test_transitions_from_completed_to_non_final_states_rejected_with_persisted_result(
        self, store: InMemoryStore, intended_transition: Transition, initial_data: object
    ) -> None:
        """A COMPLETED flow run with a persisted result stays COMPLETED (null reject)."""
        ctx = await initialize_orchestration(
            store, "flow", *intended_transition, initial_state_data=initial_data
        )

        ctx = await apply_rules(ctx, [HandleFlowTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.REJECT, ctx.response_details
        assert ctx.response_details == StateRejectDetails(reason="Run is already COMPLETED.")
        assert ctx.validated_state_type == StateType.COMPLETED

    @pytest.mark.parametrize("intended_transition", active_transitions, ids=transition_id)
    async def test_does_not_block_transitions_from_non_terminal_states(
        self, store: InMemoryStore, intended_transition: Transition
    ) -> None:
        """The rule does not apply to runs that are not in a terminal state."""
        ctx = await initialize_orchestration(store, "flow", *intended_transition)

        ctx = await apply_rules(ctx, [HandleFlowTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT


class TestHandleFlowTerminalStateTransitions:
    @pytest.mark.parametrize(
        "intended_transition",
        list(product(TERMINAL_STATES, [StateType.CANCELLING, StateType.PAUSED, StateType.CRASHED])),
        ids=transition_id,
    )
    async def test_abort_reason_names_the_terminal_type(
        self, store: InMemoryStore, intended_transition: tuple[StateType, StateType]
    ) -> None:
        """The abort reason carries the initial type's value."""
        ctx = await initialize_orchestration(store, "flow", *intended_transition)

        ctx = await apply_rules(ctx, [HandleFlowTerminalStateTransitions])

        assert ctx.response_details == StateAbortDetails(
            reason=f"Run is already in terminal state {intended_transition[0].value}."
        )

    @pytest.mark.parametrize(
        "proposed_state_type", [StateType.FAILED, StateType.CANCELLED], ids=type_id
    )
    async def test_persisted_completed_result_does_not_block_other_final_targets(
        self, store: InMemoryStore, proposed_state_type: StateType
    ) -> None:
        """Unlike tasks, a persisted COMPLETED flow may still be moved to another final state."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.COMPLETED,
            proposed_state_type,
            initial_state_data=PERSISTED_RESULT,
        )

        ctx = await apply_rules(ctx, [HandleFlowTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT

    @pytest.mark.parametrize(
        "intended_transition",
        [
            (StateType.FAILED, StateType.RUNNING),
            (StateType.CRASHED, StateType.PENDING),
            (StateType.COMPLETED, StateType.RUNNING),
        ],
        ids=transition_id,
    )
    async def test_leaving_a_terminal_state_resets_pause_bookkeeping(
        self, store: InMemoryStore, intended_transition: tuple[StateType, StateType]
    ) -> None:
        """A rerun starts without pause keys, resuming flag or retry type."""
        ctx = await initialize_orchestration(store, "flow", *intended_transition)
        ctx.run.empirical_policy = FlowRunPolicy(
            retries=2, pause_keys={"k"}, resuming=True, retry_type="in_process"
        )

        ctx = await apply_rules(ctx, [HandleFlowTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.run.empirical_policy == FlowRunPolicy(retries=2)

    async def test_final_to_final_keeps_the_policy(self, store: InMemoryStore) -> None:
        """Moving between final states leaves the pause bookkeeping alone."""
        ctx = await initialize_orchestration(store, "flow", StateType.FAILED, StateType.COMPLETED)
        policy = FlowRunPolicy(pause_keys={"k"}, resuming=True, retry_type="in_process")
        ctx.run.empirical_policy = policy.model_copy(deep=True)

        ctx = await apply_rules(ctx, [HandleFlowTerminalStateTransitions])

        assert ctx.run.empirical_policy == policy

    async def test_cleanup_restores_the_empirical_policy_on_fizzle(
        self, store: InMemoryStore
    ) -> None:
        """If a later rule changes the transition, the policy reset is undone."""
        ctx = await initialize_orchestration(
            store, "flow", StateType.FAILED, StateType.SCHEDULED, deployment_id=uuid.uuid4()
        )
        policy = FlowRunPolicy(retries=3, pause_keys={"k"}, resuming=True, retry_type="in_process")
        ctx.run.empirical_policy = policy.model_copy(deep=True)

        ctx = await apply_rules(
            ctx, [HandleFlowTerminalStateTransitions, rejecting_rule(StateType.CANCELLED)]
        )

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.validated_state_type == StateType.CANCELLED
        assert ctx.run.empirical_policy == policy


class TestPreventResultDataLoss:
    transition = (StateType.COMPLETED, StateType.COMPLETED)

    async def test_rejects_completed_to_completed_when_result_data_is_lost(
        self, store: InMemoryStore
    ) -> None:
        """A bare COMPLETED cannot replace one that points at a persisted result."""
        ctx = await initialize_orchestration(
            store, "flow", *self.transition, initial_state_data=PERSISTED_RESULT
        )

        ctx = await apply_rules(ctx, [PreventResultDataLoss])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.response_details == StateRejectDetails(
            reason="Cannot overwrite a COMPLETED state that carries persisted result data "
            "with one that does not."
        )
        assert ctx.validated_state is not None
        assert ctx.validated_state.data == PERSISTED_RESULT

    async def test_allows_completed_to_completed_without_result_data(
        self, store: InMemoryStore
    ) -> None:
        """Nothing to lose: COMPLETED without data may be replaced."""
        ctx = await initialize_orchestration(store, "flow", *self.transition)

        ctx = await apply_rules(ctx, [PreventResultDataLoss])

        assert ctx.response_status == SetStateStatus.ACCEPT

    async def test_allows_completed_to_completed_with_unpersisted_initial(
        self, store: InMemoryStore
    ) -> None:
        """An unpersisted result is not protected."""
        ctx = await initialize_orchestration(
            store, "flow", *self.transition, initial_state_data={"type": "unpersisted"}
        )

        ctx = await apply_rules(ctx, [PreventResultDataLoss])

        assert ctx.response_status == SetStateStatus.ACCEPT

    async def test_handle_flow_terminal_also_rejects_data_loss(self, store: InMemoryStore) -> None:
        """The core terminal rule applies the same data-loss guard."""
        ctx = await initialize_orchestration(
            store, "flow", *self.transition, initial_state_data=PERSISTED_RESULT
        )

        ctx = await apply_rules(ctx, [HandleFlowTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.response_details == StateRejectDetails(
            reason="Cannot overwrite a COMPLETED state that carries persisted result data "
            "with one that does not."
        )

    @pytest.mark.parametrize("initial_data", SCALAR_DATA, ids=type_id)
    async def test_accepts_scalar_initial_data(
        self, store: InMemoryStore, initial_data: object
    ) -> None:
        """Inline (scalar or list) data is not a persisted result: no error, no reject."""
        ctx = await initialize_orchestration(
            store, "flow", *self.transition, initial_state_data=initial_data
        )

        ctx = await apply_rules(ctx, [PreventResultDataLoss])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.orchestration_error is None

    @pytest.mark.parametrize("proposed_data", SCALAR_DATA, ids=type_id)
    async def test_accepts_scalar_proposed_data_with_persisted_initial(
        self, store: InMemoryStore, proposed_data: object
    ) -> None:
        """Inline data does not replace a persisted result (Prefect's name; it rejects)."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            *self.transition,
            initial_state_data=PERSISTED_RESULT,
            proposed_state_data=proposed_data,
        )

        ctx = await apply_rules(ctx, [PreventResultDataLoss])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.orchestration_error is None

    @pytest.mark.parametrize("initial_data", SCALAR_DATA, ids=type_id)
    async def test_handle_flow_terminal_accepts_scalar_initial_data(
        self, store: InMemoryStore, initial_data: object
    ) -> None:
        """The terminal rule does not trip over inline data either."""
        ctx = await initialize_orchestration(
            store, "flow", *self.transition, initial_state_data=initial_data
        )

        ctx = await apply_rules(ctx, [HandleFlowTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.orchestration_error is None

    async def test_allows_replacing_a_persisted_result_with_another(
        self, store: InMemoryStore
    ) -> None:
        """A new persisted result may replace the old one."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            *self.transition,
            initial_state_data=PERSISTED_RESULT,
            proposed_state_data={"storage_key": "/results/def"},
        )

        ctx = await apply_rules(ctx, [PreventResultDataLoss])

        assert ctx.response_status == SetStateStatus.ACCEPT

    @pytest.mark.parametrize(
        "proposed_state_type",
        [StateType.FAILED, StateType.CANCELLED, StateType.CRASHED],
        ids=type_id,
    )
    async def test_other_terminal_targets_are_not_concerned(
        self, store: InMemoryStore, proposed_state_type: StateType
    ) -> None:
        """Only COMPLETED → COMPLETED is guarded."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.COMPLETED,
            proposed_state_type,
            initial_state_data=PERSISTED_RESULT,
        )

        ctx = await apply_rules(ctx, [PreventResultDataLoss])

        assert ctx.response_status == SetStateStatus.ACCEPT

    @pytest.mark.parametrize(
        ("data", "persisted"),
        [
            (PERSISTED_RESULT, True),
            ({"type": "literal", "value": 1}, True),
            ({}, True),
            ({"type": "unpersisted"}, False),
            (None, False),
            (1, False),
            ("hello", False),
            ([1, 2, 3], False),
        ],
        ids=type_id,
    )
    def test_has_persisted_result(self, data: object, persisted: bool) -> None:
        """Only dicts, and not unpersisted ones, are persisted results."""
        assert has_persisted_result(data) is persisted  # type: ignore[arg-type]


class TestEnsureOnlyScheduledFlowMarkedLate:
    @pytest.mark.parametrize(
        "initial_state_type",
        [
            StateType.RUNNING,
            StateType.PENDING,
            StateType.COMPLETED,
            StateType.FAILED,
            StateType.CANCELLING,
        ],
        ids=type_id,
    )
    async def test_reject_marking_states_other_than_scheduled_as_late(
        self, store: InMemoryStore, initial_state_type: StateType
    ) -> None:
        """A run that already left SCHEDULED cannot be marked late."""
        ctx = await initialize_orchestration(
            store, "flow", initial_state_type, StateType.SCHEDULED, proposed_state_name="Late"
        )

        ctx = await apply_rules(ctx, [EnsureOnlyScheduledFlowsMarkedLate])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.response_details == StateRejectDetails(
            reason="Only scheduled flows can be marked late."
        )
        assert ctx.validated_state_type == initial_state_type

    async def test_scheduled_to_late_transition_is_accepted(self, store: InMemoryStore) -> None:
        """A SCHEDULED run can be marked late."""
        ctx = await initialize_orchestration(
            store, "flow", StateType.SCHEDULED, StateType.SCHEDULED, proposed_state_name="Late"
        )

        ctx = await apply_rules(ctx, [EnsureOnlyScheduledFlowsMarkedLate])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.validated_state is not None
        assert ctx.validated_state.name == "Late"

    async def test_reject_marking_already_late_flow_as_late(self, store: InMemoryStore) -> None:
        """A run is marked late once."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.SCHEDULED,
            StateType.SCHEDULED,
            initial_state_name="Late",
            proposed_state_name="Late",
        )

        ctx = await apply_rules(ctx, [EnsureOnlyScheduledFlowsMarkedLate])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.response_details == StateRejectDetails(
            reason="This flow run is already marked late."
        )

    @pytest.mark.parametrize(
        "initial_state_type", [StateType.RUNNING, StateType.FAILED], ids=type_id
    )
    async def test_other_scheduled_states_are_not_concerned(
        self, store: InMemoryStore, initial_state_type: StateType
    ) -> None:
        """SCHEDULED states not named "Late" (AwaitingRetry) pass."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            initial_state_type,
            StateType.SCHEDULED,
            proposed_state_name="AwaitingRetry",
        )

        ctx = await apply_rules(ctx, [EnsureOnlyScheduledFlowsMarkedLate])

        assert ctx.response_status == SetStateStatus.ACCEPT


class TestPausingFlows:
    transition = (StateType.RUNNING, StateType.PAUSED)

    async def test_can_not_nonblocking_pause_subflows(self, store: InMemoryStore) -> None:
        """A subflow cannot suspend, even with a deployment: its parent holds the process.

        Prefect's test leaves the parent unset (a comparison instead of an
        assignment) and trips on the missing deployment; this one sets both.
        """
        ctx = await initialize_orchestration(
            store, "flow", *self.transition, deployment_id=uuid.uuid4()
        )
        ctx.proposed_state = paused_state(reschedule=True)
        ctx.run.parent_task_run_id = uuid.uuid4()

        ctx = await apply_rules(ctx, [HandlePausingFlows])

        assert ctx.response_status == SetStateStatus.ABORT
        assert ctx.response_details == StateAbortDetails(reason="Cannot pause subflows.")

    async def test_can_not_nonblocking_pause_flows_with_deployments_with_reschedule_flag(
        self, store: InMemoryStore
    ) -> None:
        """A run without a deployment cannot suspend (Prefect's name says the opposite)."""
        ctx = await initialize_orchestration(store, "flow", *self.transition)
        ctx.proposed_state = paused_state(reschedule=True)

        ctx = await apply_rules(ctx, [HandlePausingFlows])

        assert ctx.response_status == SetStateStatus.ABORT
        assert ctx.response_details == StateAbortDetails(
            reason="Cannot pause flows without a deployment."
        )

    async def test_can_nonblocking_pause_flows_with_deployments_with_reschedule_flag(
        self, store: InMemoryStore
    ) -> None:
        """A deployed run can suspend."""
        ctx = await initialize_orchestration(
            store, "flow", *self.transition, deployment_id=uuid.uuid4()
        )
        ctx.proposed_state = paused_state(reschedule=True)

        ctx = await apply_rules(ctx, [HandlePausingFlows])

        assert ctx.response_status == SetStateStatus.ACCEPT

    async def test_updates_pause_key_tracker(self, store: InMemoryStore) -> None:
        """An accepted pause records its key on the run."""
        ctx = await initialize_orchestration(store, "flow", *self.transition)
        ctx.proposed_state = paused_state(pause_key="hello", timeout_s=1000)

        ctx = await apply_rules(ctx, [HandlePausingFlows])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert "hello" in ctx.run.empirical_policy.pause_keys

    async def test_defaults_pause_key_to_random_uuid(self, store: InMemoryStore) -> None:
        """A pause without a key records a random UUID (Prefect's test passes a key)."""
        ctx = await initialize_orchestration(store, "flow", *self.transition)
        ctx.proposed_state = paused_state(timeout_s=1000)
        assert len(ctx.run.empirical_policy.pause_keys) == 0

        ctx = await apply_rules(ctx, [HandlePausingFlows])

        assert ctx.response_status == SetStateStatus.ACCEPT
        (key,) = ctx.run.empirical_policy.pause_keys
        assert uuid.UUID(key)

    async def test_does_not_permit_repeat_pauses(self, store: InMemoryStore) -> None:
        """The same pause key fires once per run."""
        ctx = await initialize_orchestration(store, "flow", *self.transition)
        ctx.proposed_state = paused_state(pause_key="hello", timeout_s=1000)
        ctx = await apply_rules(ctx, [HandlePausingFlows])
        assert ctx.response_status == SetStateStatus.ACCEPT

        ctx2 = await initialize_orchestration(store, "flow", *self.transition, run_override=ctx.run)
        ctx2.proposed_state = paused_state(pause_key="hello", timeout_s=1000)
        ctx2 = await apply_rules(ctx2, [HandlePausingFlows])

        assert ctx2.response_status == SetStateStatus.REJECT
        assert ctx2.response_details == StateRejectDetails(reason="This pause has already fired.")
        assert ctx2.validated_state_type == StateType.RUNNING

    @pytest.mark.parametrize("initial_state_type", ALL_STATES, ids=type_id)
    async def test_can_only_pause_running_flows(
        self, store: InMemoryStore, initial_state_type: StateTypeOrNone
    ) -> None:
        """No state aborts, RUNNING pauses, anything else is null-rejected."""
        ctx = await initialize_orchestration(
            store, "flow", initial_state_type, StateType.PAUSED, deployment_id=uuid.uuid4()
        )

        ctx = await apply_rules(ctx, [HandlePausingFlows])

        if initial_state_type is None:
            assert ctx.response_status == SetStateStatus.ABORT
            assert ctx.response_details == StateAbortDetails(
                reason="Cannot pause flows with no state."
            )
        elif initial_state_type == StateType.RUNNING:
            assert ctx.response_status == SetStateStatus.ACCEPT
        else:
            assert ctx.response_status == SetStateStatus.REJECT
            assert ctx.response_details == StateRejectDetails(
                reason="Cannot pause flows that are not currently running."
            )
            assert ctx.validated_state_type == initial_state_type

    async def test_suspensions_are_worded_as_such(self, store: InMemoryStore) -> None:
        """A "Suspended" proposal is refused with "suspend" in the reason."""
        ctx = await initialize_orchestration(store, "flow", StateType.PENDING, StateType.PAUSED)
        ctx.proposed_state = paused_state(reschedule=True, name="Suspended")

        ctx = await apply_rules(ctx, [HandlePausingFlows])

        assert ctx.response_details == StateRejectDetails(
            reason="Cannot suspend flows that are not currently running."
        )

    async def test_refused_pause_records_no_key(self, store: InMemoryStore) -> None:
        """A pause that is not written leaves the pause keys untouched."""
        ctx = await initialize_orchestration(store, "flow", *self.transition)
        ctx.proposed_state = paused_state(pause_key="hello", reschedule=True)

        ctx = await apply_rules(ctx, [HandlePausingFlows])

        assert ctx.response_status == SetStateStatus.ABORT
        assert ctx.run.empirical_policy.pause_keys == set()


class TestResumingFlows:
    async def test_cannot_leave_nonblocking_pausing_state_without_a_deployment(
        self, store: InMemoryStore
    ) -> None:
        """A suspended run is resumed through its deployment, so without one it stays PAUSED."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.PAUSED,
            StateType.RUNNING,
            orchestrator=frozen_orchestrator(),
            initial_details={
                "pause_timeout": NOW + dt.timedelta(minutes=5),
                "pause_reschedule": True,
            },
        )

        ctx = await apply_rules(ctx, [HandleResumingPausedFlows])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.response_details == StateRejectDetails(
            reason="Cannot reschedule a running flow run without a deployment."
        )
        assert ctx.validated_state_type == StateType.PAUSED

    async def test_can_leave_blocking_pausing_state_without_a_deployment(
        self, store: InMemoryStore
    ) -> None:
        """A blocking pause resumes in the same process, no deployment needed."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.PAUSED,
            StateType.RUNNING,
            orchestrator=frozen_orchestrator(),
            initial_details={"pause_timeout": NOW + dt.timedelta(minutes=5)},
        )

        ctx = await apply_rules(ctx, [HandleResumingPausedFlows])

        assert ctx.response_status == SetStateStatus.ACCEPT

    @pytest.mark.parametrize("proposed_state_type", CANONICAL_STATES, ids=type_id)
    async def test_transitions_out_of_pausing_states_are_restricted(
        self, store: InMemoryStore, proposed_state_type: StateType
    ) -> None:
        """PAUSED resumes into RUNNING, SCHEDULED or a final state; anything else is refused."""
        ctx = await initialize_orchestration(
            store, "flow", StateType.PAUSED, proposed_state_type, deployment_id=uuid.uuid4()
        )

        ctx = await apply_rules(ctx, [HandleResumingPausedFlows])

        permitted_resuming_states = [
            StateType.RUNNING,
            StateType.COMPLETED,
            StateType.SCHEDULED,
            StateType.FAILED,
            StateType.CRASHED,
            StateType.CANCELLED,
        ]
        if proposed_state_type in permitted_resuming_states:
            assert ctx.response_status == SetStateStatus.ACCEPT
        else:
            assert ctx.response_status == SetStateStatus.REJECT
            assert ctx.validated_state_type == StateType.PAUSED

    async def test_cannot_leave_pausing_state_if_pause_has_timed_out(
        self, store: InMemoryStore
    ) -> None:
        """A resume after the pause timed out fails the run instead."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.PAUSED,
            StateType.RUNNING,
            orchestrator=frozen_orchestrator(),
            deployment_id=uuid.uuid4(),
            initial_details={"pause_timeout": NOW - dt.timedelta(minutes=5)},
        )

        ctx = await apply_rules(ctx, [HandleResumingPausedFlows])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.response_details == StateRejectDetails(
            reason="The flow run pause has timed out and can no longer resume."
        )
        assert ctx.validated_state is not None
        assert ctx.validated_state.type == StateType.FAILED
        assert ctx.validated_state.message == "The flow was running and never resumed."

    async def test_allows_leaving_pausing_state(self, store: InMemoryStore) -> None:
        """A resume within the timeout is accepted."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.PAUSED,
            StateType.RUNNING,
            orchestrator=frozen_orchestrator(),
            deployment_id=uuid.uuid4(),
            initial_details={"pause_timeout": NOW + dt.timedelta(minutes=5)},
        )

        ctx = await apply_rules(ctx, [HandleResumingPausedFlows])

        assert ctx.response_status == SetStateStatus.ACCEPT

    async def test_marks_flow_run_as_resuming_upon_leaving_paused_state(
        self, store: InMemoryStore
    ) -> None:
        """A resumed run is flagged so its next RUNNING is not a new attempt."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.PAUSED,
            StateType.RUNNING,
            orchestrator=frozen_orchestrator(),
            deployment_id=uuid.uuid4(),
            initial_details={"pause_timeout": NOW + dt.timedelta(minutes=5)},
        )

        ctx = await apply_rules(ctx, [HandleResumingPausedFlows])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.run.empirical_policy.resuming

    @pytest.mark.parametrize(
        "proposed_state_type",
        [StateType.PENDING, StateType.PAUSED, StateType.CANCELLING],
        ids=type_id,
    )
    async def test_refusal_renders_state_types_as_prefect_does(
        self, store: InMemoryStore, proposed_state_type: StateType
    ) -> None:
        """The reason names both types as ``StateType.X`` (Prefect on Python ≥ 3.11)."""
        ctx = await initialize_orchestration(store, "flow", StateType.PAUSED, proposed_state_type)

        ctx = await apply_rules(ctx, [HandleResumingPausedFlows])

        assert ctx.response_details == StateRejectDetails(
            reason=f"This run cannot transition to the StateType.{proposed_state_type.name} "
            "state from the StateType.PAUSED state."
        )

    async def test_resuming_is_flagged_even_after_a_refused_resume(
        self, store: InMemoryStore
    ) -> None:
        """Prefect's after-hook also runs after the rule's own null reject (reference §6.10)."""
        ctx = await initialize_orchestration(store, "flow", StateType.PAUSED, StateType.PENDING)

        ctx = await apply_rules(ctx, [HandleResumingPausedFlows])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.run.empirical_policy.resuming is True

    async def test_suspended_resume_without_deployment_names_the_proposed_state(
        self, store: InMemoryStore
    ) -> None:
        """The refusal names the proposed state in lower case ("resuming")."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.PAUSED,
            StateType.SCHEDULED,
            proposed_state_name="Resuming",
            initial_details={"pause_reschedule": True},
        )

        ctx = await apply_rules(ctx, [HandleResumingPausedFlows])

        assert ctx.response_details == StateRejectDetails(
            reason="Cannot reschedule a resuming flow run without a deployment."
        )


class TestHandleCancellingStateTransitions:
    not_cancelled = [t for t in CANONICAL_STATES if t != StateType.CANCELLED]

    @pytest.mark.parametrize("proposed_state_type", not_cancelled, ids=type_id)
    async def test_rejects_cancelling_to_anything_but_cancelled(
        self, store: InMemoryStore, proposed_state_type: StateType
    ) -> None:
        """A cancelling run can only become CANCELLED."""
        ctx = await initialize_orchestration(
            store, "flow", StateType.CANCELLING, proposed_state_type
        )

        ctx = await apply_rules(ctx, [EnforceCancellingToCancelledTransition])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.response_details == StateRejectDetails(
            reason="Cannot transition flows that are cancelling to a state other than Cancelled."
        )
        assert ctx.validated_state_type == StateType.CANCELLING

    @pytest.mark.parametrize("proposed_state_type", not_cancelled, ids=type_id)
    async def test_rejects_cancelled_cancelling_to_anything_but_cancelled(
        self, store: InMemoryStore, proposed_state_type: StateType
    ) -> None:
        """Prefect's duplicate of the test above, kept for parity."""
        ctx = await initialize_orchestration(
            store, "flow", StateType.CANCELLING, proposed_state_type
        )

        ctx = await apply_rules(ctx, [EnforceCancellingToCancelledTransition])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.validated_state_type == StateType.CANCELLING

    @pytest.mark.parametrize("proposed_state_type", not_cancelled, ids=type_id)
    async def test_does_not_block_cancelled_to_other_states(
        self, store: InMemoryStore, proposed_state_type: StateType
    ) -> None:
        """A CANCELLED run may move on (a rerun): the rule does not apply."""
        transition = (StateType.CANCELLED, proposed_state_type)
        ctx = await initialize_orchestration(store, "flow", *transition)

        rule = EnforceCancellingToCancelledTransition(ctx, *transition)
        async with rule:
            await ctx.validate_proposed_state()

        assert await rule.invalid()
        assert ctx.response_status != SetStateStatus.REJECT

    async def test_cancelling_to_cancelled_is_accepted(self, store: InMemoryStore) -> None:
        """CANCELLING → CANCELLED is the one way out."""
        transition = (StateType.CANCELLING, StateType.CANCELLED)
        ctx = await initialize_orchestration(store, "flow", *transition)

        rule = EnforceCancellingToCancelledTransition(ctx, *transition)
        async with rule:
            await ctx.validate_proposed_state()

        assert await rule.invalid()
        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.validated_state_type == StateType.CANCELLED


class TestBypassCancellingFlowRunsWithNoInfra:
    transition = (StateType.SCHEDULED, StateType.CANCELLING)

    async def test_rejects_cancelling_scheduled_flow_and_sets_to_cancelled(
        self, store: InMemoryStore
    ) -> None:
        """A scheduled run without infrastructure goes straight to CANCELLED."""
        ctx = await initialize_orchestration(store, "flow", *self.transition)

        ctx = await apply_rules(ctx, [BypassCancellingFlowRunsWithNoInfra])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.response_details == StateRejectDetails(
            reason="Scheduled flow run has no infrastructure to terminate."
        )
        assert ctx.validated_state_type == StateType.CANCELLED

    async def test_rejects_cancelling_suspended_flow_and_sets_to_cancelled(
        self, store: InMemoryStore
    ) -> None:
        """A suspended run has no process left, so it goes straight to CANCELLED."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.PAUSED,
            StateType.CANCELLING,
            initial_details={"pause_reschedule": True},
        )

        ctx = await apply_rules(ctx, [BypassCancellingFlowRunsWithNoInfra])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.response_details == StateRejectDetails(
            reason="Suspended flow run has no infrastructure to terminate."
        )
        assert ctx.validated_state_type == StateType.CANCELLED

    async def test_rejects_cancelling_resuming_flow_and_sets_to_cancelled(
        self, store: InMemoryStore
    ) -> None:
        """A run "Resuming" from a suspension has no infrastructure yet, pid or not."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            *self.transition,
            initial_state_name="Resuming",
            infrastructure_pid="my-pid-42",
        )

        ctx = await apply_rules(ctx, [BypassCancellingFlowRunsWithNoInfra])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.validated_state_type == StateType.CANCELLED

    async def test_accepts_cancelling_flow_run_with_pid(self, store: InMemoryStore) -> None:
        """A scheduled run with a pid (AwaitingRetry, live infrastructure) is cancelled normally."""
        ctx = await initialize_orchestration(store, "flow", *self.transition)
        ctx = await apply_rules(ctx, [BypassCancellingFlowRunsWithNoInfra])
        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.validated_state_type == StateType.CANCELLED

        ctx = await initialize_orchestration(store, "flow", *self.transition)
        ctx.run.infrastructure_pid = "my-pid-42"
        ctx = await apply_rules(ctx, [BypassCancellingFlowRunsWithNoInfra])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.validated_state_type == StateType.CANCELLING

    async def test_accepts_cancelling_paused_flow_run_with_no_reschedule(
        self, store: InMemoryStore
    ) -> None:
        """A blocking pause still has its process to tear down."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.PAUSED,
            StateType.CANCELLING,
            initial_details={"pause_reschedule": False},
        )

        ctx = await apply_rules(ctx, [BypassCancellingFlowRunsWithNoInfra])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.validated_state_type == StateType.CANCELLING

    @pytest.mark.parametrize(
        "initial_state_type",
        [t for t in ALL_STATES if t not in (StateType.SCHEDULED, StateType.PAUSED)],
        ids=type_id,
    )
    async def test_allows_all_other_transitions(
        self, store: InMemoryStore, initial_state_type: StateTypeOrNone
    ) -> None:
        """Cancelling a run in any other state is left alone."""
        ctx = await initialize_orchestration(
            store, "flow", initial_state_type, StateType.CANCELLING
        )

        ctx = await apply_rules(ctx, [BypassCancellingFlowRunsWithNoInfra])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.validated_state_type == StateType.CANCELLING

    async def test_the_cancelled_state_is_a_fresh_state(self, store: InMemoryStore) -> None:
        """The replacement is a new CANCELLED state, stamped by the server's clock."""
        ctx = await initialize_orchestration(
            store, "flow", *self.transition, orchestrator=frozen_orchestrator()
        )
        assert ctx.proposed_state is not None
        proposed_id = ctx.proposed_state.id

        ctx = await apply_rules(ctx, [BypassCancellingFlowRunsWithNoInfra])

        assert ctx.validated_state is not None
        assert ctx.validated_state.id != proposed_id
        assert (ctx.validated_state.name, ctx.validated_state.timestamp) == ("Cancelled", NOW)


class TestPreventDuplicateTransitions:
    transition = (StateType.PENDING, StateType.PENDING)

    async def test_no_transition_ids(self, store: InMemoryStore) -> None:
        """Proposals without transition ids are never deduplicated."""
        ctx = await initialize_orchestration(store, "flow", *self.transition)

        ctx = await apply_rules(ctx, [PreventDuplicateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT

    async def test_proposed_state_no_transition_id(self, store: InMemoryStore) -> None:
        """Only the current state has an id: not a replay."""
        ctx = await initialize_orchestration(
            store, "flow", *self.transition, initial_details={"transition_id": uuid.uuid4()}
        )

        ctx = await apply_rules(ctx, [PreventDuplicateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT

    async def test_initial_state_no_transition_id(self, store: InMemoryStore) -> None:
        """Only the proposal has an id: not a replay."""
        ctx = await initialize_orchestration(
            store, "flow", *self.transition, proposed_details={"transition_id": uuid.uuid4()}
        )

        ctx = await apply_rules(ctx, [PreventDuplicateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT

    async def test_different_transition_ids(self, store: InMemoryStore) -> None:
        """Different ids are different transitions."""
        ctx = await initialize_orchestration(
            store,
            "flow",
            *self.transition,
            initial_details={"transition_id": uuid.uuid4()},
            proposed_details={"transition_id": uuid.uuid4()},
        )

        ctx = await apply_rules(ctx, [PreventDuplicateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT

    async def test_same_transition_id(self, store: InMemoryStore) -> None:
        """A replayed transition is null-rejected and the state already written is returned."""
        transition_id_ = uuid.uuid4()
        ctx = await initialize_orchestration(
            store,
            "flow",
            *self.transition,
            initial_details={"transition_id": transition_id_},
            proposed_details={"transition_id": transition_id_},
        )
        current_state_id = ctx.run.state_id

        ctx = await apply_rules(ctx, [PreventDuplicateTransitions])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.response_details == StateRejectDetails(
            reason="This run has already made this state transition."
        )
        assert ctx.validated_state is not None
        assert ctx.validated_state.id == current_state_id
