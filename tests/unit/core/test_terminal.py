"""Flow runs in a terminal state (``rules/core/terminal.py``): leaving one, and keeping
a COMPLETED run's persisted result.

Ported from Prefect's ``tests/server/orchestration/test_core_policy.py``
(reference §5.2, tests 38-49): Prefect's class and test names are kept so
``docs/parity.md`` can map them; classes named after a rule hold the extra scenarios.

The task variants of tests 38-42 are in ``tests/unit/core/test_task_terminal.py``.
"""

from __future__ import annotations

import uuid
from itertools import product

import pytest

from arbiter.rules.base import (
    FlowRunOrchestrationRule,
    StateTypeOrNone,
)
from arbiter.rules.core.terminal import (
    HandleFlowTerminalStateTransitions,
    PreventResultDataLoss,
    has_persisted_result,
)
from arbiter.rules.results import (
    SetStateStatus,
    StateAbortDetails,
    StateRejectDetails,
)
from arbiter.rules.store import AdminStore
from arbiter.schemas.runs import FlowRunPolicy
from arbiter.schemas.states import StateType
from tests.factories import initialize_orchestration
from tests.unit.core.helpers import (
    ALL_STATES,
    CANONICAL_STATES,
    PERSISTED_RESULT,
    TERMINAL_STATES,
    apply_rules,
    rejecting_rule,
    transition_id,
    type_id,
)

SCALAR_DATA = [1, "hello", True, [1, 2, 3]]


Transition = tuple[StateTypeOrNone, StateTypeOrNone]


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
        self, store: AdminStore, intended_transition: Transition
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
        self, store: AdminStore, intended_transition: Transition
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
        store: AdminStore,
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
        self, store: AdminStore, intended_transition: Transition, initial_data: object
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
        self, store: AdminStore, intended_transition: Transition
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
        self, store: AdminStore, intended_transition: tuple[StateType, StateType]
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
        self, store: AdminStore, proposed_state_type: StateType
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
        self, store: AdminStore, intended_transition: tuple[StateType, StateType]
    ) -> None:
        """A rerun starts without pause keys, resuming flag or retry type."""
        ctx = await initialize_orchestration(store, "flow", *intended_transition)
        ctx.run.empirical_policy = FlowRunPolicy(
            retries=2, pause_keys={"k"}, resuming=True, retry_type="in_process"
        )

        ctx = await apply_rules(ctx, [HandleFlowTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.run.empirical_policy == FlowRunPolicy(retries=2)

    async def test_final_to_final_keeps_the_policy(self, store: AdminStore) -> None:
        """Moving between final states leaves the pause bookkeeping alone."""
        ctx = await initialize_orchestration(store, "flow", StateType.FAILED, StateType.COMPLETED)
        policy = FlowRunPolicy(pause_keys={"k"}, resuming=True, retry_type="in_process")
        ctx.run.empirical_policy = policy.model_copy(deep=True)

        ctx = await apply_rules(ctx, [HandleFlowTerminalStateTransitions])

        assert ctx.run.empirical_policy == policy

    async def test_cleanup_restores_the_empirical_policy_on_fizzle(self, store: AdminStore) -> None:
        """If a later rule changes the transition, the policy reset is undone."""
        ctx = await initialize_orchestration(
            store, "flow", StateType.FAILED, StateType.SCHEDULED, deployment_id=uuid.uuid4()
        )
        policy = FlowRunPolicy(retries=3, pause_keys={"k"}, resuming=True, retry_type="in_process")
        ctx.run.empirical_policy = policy.model_copy(deep=True)

        to_cancelled = rejecting_rule(StateType.CANCELLED, FlowRunOrchestrationRule)
        ctx = await apply_rules(ctx, [HandleFlowTerminalStateTransitions, to_cancelled])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.validated_state_type == StateType.CANCELLED
        assert ctx.run.empirical_policy == policy


class TestPreventResultDataLoss:
    transition = (StateType.COMPLETED, StateType.COMPLETED)

    async def test_rejects_completed_to_completed_when_result_data_is_lost(
        self, store: AdminStore
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
        self, store: AdminStore
    ) -> None:
        """Nothing to lose: COMPLETED without data may be replaced."""
        ctx = await initialize_orchestration(store, "flow", *self.transition)

        ctx = await apply_rules(ctx, [PreventResultDataLoss])

        assert ctx.response_status == SetStateStatus.ACCEPT

    async def test_allows_completed_to_completed_with_unpersisted_initial(
        self, store: AdminStore
    ) -> None:
        """An unpersisted result is not protected."""
        ctx = await initialize_orchestration(
            store, "flow", *self.transition, initial_state_data={"type": "unpersisted"}
        )

        ctx = await apply_rules(ctx, [PreventResultDataLoss])

        assert ctx.response_status == SetStateStatus.ACCEPT

    async def test_handle_flow_terminal_also_rejects_data_loss(self, store: AdminStore) -> None:
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
        self, store: AdminStore, initial_data: object
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
        self, store: AdminStore, proposed_data: object
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
        self, store: AdminStore, initial_data: object
    ) -> None:
        """The terminal rule does not trip over inline data either."""
        ctx = await initialize_orchestration(
            store, "flow", *self.transition, initial_state_data=initial_data
        )

        ctx = await apply_rules(ctx, [HandleFlowTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.orchestration_error is None

    async def test_allows_replacing_a_persisted_result_with_another(
        self, store: AdminStore
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
        self, store: AdminStore, proposed_state_type: StateType
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
