"""Task runs in a terminal state (``rules/core/task_terminal.py``): a finished task keeps
its result; leaving a terminal state starts a new series of attempts.

Ported from Prefect's ``tests/server/orchestration/test_core_policy.py``
(reference §5.2, the task variants of tests 38-42): Prefect's class and test names are kept so
``docs/parity.md`` can map them; classes named after a rule hold the extra scenarios.
"""

from __future__ import annotations

from itertools import product

import pytest

from arbiter.rules.base import (
    StateTypeOrNone,
)
from arbiter.rules.core.task_terminal import HandleTaskTerminalStateTransitions
from arbiter.rules.errors import OrchestrationError
from arbiter.rules.results import SetStateStatus, StateRejectDetails
from arbiter.rules.store import AdminStore
from arbiter.schemas.states import StateType
from tests.factories import initialize_orchestration
from tests.unit.core.helpers import (
    ALL_STATES,
    CANONICAL_STATES,
    PERSISTED_RESULT,
    TERMINAL_STATES,
    apply_rules,
    transition_id,
    type_id,
)


class TestTransitionsFromTerminalStatesRuleForTasks:
    active_transitions = sorted(
        set(product(ALL_STATES, CANONICAL_STATES)) - set(product(TERMINAL_STATES, ALL_STATES)),
        key=str,
    )
    completed_to_non_final = [
        (StateType.COMPLETED, t)
        for t in (StateType.PENDING, StateType.RUNNING, StateType.SCHEDULED)
    ]

    @pytest.mark.parametrize(
        "intended_transition",
        [(t, StateType.CRASHED) for t in TERMINAL_STATES],
        ids=transition_id,
    )
    async def test_transitions_from_terminal_states_to_crashed_are_aborted(
        self, store: AdminStore, intended_transition: tuple[StateType, StateType]
    ) -> None:
        """A terminal task cannot crash afterwards."""
        ctx = await initialize_orchestration(store, "task", *intended_transition)

        ctx = await apply_rules(ctx, [HandleTaskTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ABORT

    @pytest.mark.parametrize(
        "intended_transition",
        [(t, StateType.CANCELLING) for t in TERMINAL_STATES],
        ids=transition_id,
    )
    async def test_transitions_from_terminal_states_to_cancelling_are_aborted(
        self, store: AdminStore, intended_transition: tuple[StateType, StateType]
    ) -> None:
        """A terminal task cannot be cancelled afterwards."""
        ctx = await initialize_orchestration(store, "task", *intended_transition)

        ctx = await apply_rules(ctx, [HandleTaskTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ABORT

    @pytest.mark.parametrize(
        "initial_data", [None, {"type": "unpersisted"}], ids=["no-data", "unpersisted"]
    )
    @pytest.mark.parametrize("intended_transition", completed_to_non_final, ids=transition_id)
    async def test_transitions_from_completed_to_non_final_states_allowed_without_persisted_result(
        self,
        store: AdminStore,
        intended_transition: tuple[StateType, StateType],
        initial_data: dict[str, str] | None,
    ) -> None:
        """A COMPLETED task without a persisted result may run again."""
        ctx = await initialize_orchestration(
            store, "task", *intended_transition, initial_state_data=initial_data
        )

        ctx = await apply_rules(ctx, [HandleTaskTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT

    @pytest.mark.parametrize("intended_transition", completed_to_non_final, ids=transition_id)
    async def test_transitions_from_completed_to_non_final_states_rejected_with_persisted_result(
        self, store: AdminStore, intended_transition: tuple[StateType, StateType]
    ) -> None:
        """A COMPLETED task with a persisted result stays COMPLETED."""
        ctx = await initialize_orchestration(
            store, "task", *intended_transition, initial_state_data=PERSISTED_RESULT
        )

        ctx = await apply_rules(ctx, [HandleTaskTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.REJECT, ctx.response_details

    @pytest.mark.parametrize("intended_transition", active_transitions, ids=transition_id)
    async def test_does_not_block_transitions_from_non_terminal_states(
        self,
        store: AdminStore,
        intended_transition: tuple[StateTypeOrNone, StateType],
    ) -> None:
        """The rule does not apply to runs that are not in a terminal state."""
        ctx = await initialize_orchestration(store, "task", *intended_transition)

        ctx = await apply_rules(ctx, [HandleTaskTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT


class TestHandleTaskTerminalStateTransitions:
    @pytest.mark.parametrize(
        ("intended_transition", "reason"),
        [
            pytest.param(
                (StateType.COMPLETED, StateType.CRASHED),
                "Run is already COMPLETED.",
                id="COMPLETED->CRASHED",
            ),
            pytest.param(
                (StateType.FAILED, StateType.PAUSED), "Run is already FAILED.", id="FAILED->PAUSED"
            ),
            pytest.param(
                (StateType.CANCELLED, StateType.CANCELLING),
                "Run is already CANCELLED.",
                id="CANCELLED->CANCELLING",
            ),
        ],
    )
    async def test_abort_reason_names_the_terminal_type(
        self,
        store: AdminStore,
        intended_transition: tuple[StateType, StateType],
        reason: str,
    ) -> None:
        """The abort reason carries the initial type's value."""
        ctx = await initialize_orchestration(store, "task", *intended_transition)

        ctx = await apply_rules(ctx, [HandleTaskTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ABORT
        assert ctx.response_details.model_dump()["reason"] == reason

    @pytest.mark.parametrize(
        "proposed_state_type",
        [StateType.COMPLETED, StateType.FAILED, StateType.RUNNING],
        ids=type_id,
    )
    async def test_persisted_completed_result_blocks_every_target(
        self, store: AdminStore, proposed_state_type: StateType
    ) -> None:
        """Unlike flows, a persisted COMPLETED task also refuses final targets (null reject)."""
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.COMPLETED,
            proposed_state_type,
            initial_state_data=PERSISTED_RESULT,
        )

        ctx = await apply_rules(ctx, [HandleTaskTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.response_details == StateRejectDetails(reason="This run is already completed.")
        assert ctx.validated_state_type == StateType.COMPLETED

    async def test_leaving_a_terminal_state_resets_run_count(self, store: AdminStore) -> None:
        """A terminal → non-final move gives the task its retry budget back."""
        ctx = await initialize_orchestration(store, "task", StateType.FAILED, StateType.SCHEDULED)
        ctx.run.run_count = 3

        ctx = await apply_rules(ctx, [HandleTaskTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.run.run_count == 0

    async def test_final_to_final_keeps_run_count(self, store: AdminStore) -> None:
        """A terminal → terminal move leaves run_count alone."""
        ctx = await initialize_orchestration(store, "task", StateType.FAILED, StateType.COMPLETED)
        ctx.run.run_count = 3

        ctx = await apply_rules(ctx, [HandleTaskTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.run.run_count == 3

    async def test_non_dict_completed_data_aborts_through_the_error_path(
        self, store: AdminStore
    ) -> None:
        """Scalar COMPLETED data fails the rule (Prefect's .get) and run_count is restored."""
        ctx = await initialize_orchestration(
            store, "task", StateType.COMPLETED, StateType.RUNNING, initial_state_data="hello"
        )
        ctx.run.run_count = 3

        ctx = await apply_rules(ctx, [HandleTaskTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ABORT
        assert isinstance(ctx.orchestration_error, OrchestrationError)
        assert ctx.run.run_count == 3
