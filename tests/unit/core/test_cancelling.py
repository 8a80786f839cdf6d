"""Cancellation (``rules/core/cancelling.py``): CANCELLING ends in CANCELLED, and runs
without infrastructure skip it.

Ported from Prefect's ``tests/server/orchestration/test_core_policy.py``
(reference §5.2, tests 90-98): Prefect's class and test names are kept so
``docs/parity.md`` can map them; classes named after a rule hold the extra scenarios.
"""

from __future__ import annotations

import pytest

from arbiter.rules.base import (
    StateTypeOrNone,
)
from arbiter.rules.core.cancelling import (
    BypassCancellingFlowRunsWithNoInfra,
    EnforceCancellingToCancelledTransition,
)
from arbiter.rules.results import (
    SetStateStatus,
    StateRejectDetails,
)
from arbiter.rules.store import AdminStore
from arbiter.schemas.states import StateType
from tests.factories import initialize_orchestration
from tests.unit.core.helpers import (
    ALL_STATES,
    CANONICAL_STATES,
    NOW,
    apply_rules,
    frozen_orchestrator,
    type_id,
)


class TestHandleCancellingStateTransitions:
    not_cancelled = [t for t in CANONICAL_STATES if t != StateType.CANCELLED]

    @pytest.mark.parametrize("proposed_state_type", not_cancelled, ids=type_id)
    async def test_rejects_cancelling_to_anything_but_cancelled(
        self, store: AdminStore, proposed_state_type: StateType
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
        self, store: AdminStore, proposed_state_type: StateType
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
        self, store: AdminStore, proposed_state_type: StateType
    ) -> None:
        """A CANCELLED run may move on (a rerun): the rule does not apply."""
        transition = (StateType.CANCELLED, proposed_state_type)
        ctx = await initialize_orchestration(store, "flow", *transition)

        rule = EnforceCancellingToCancelledTransition(ctx, *transition)
        async with rule:
            await ctx.validate_proposed_state()

        assert await rule.invalid()
        assert ctx.response_status != SetStateStatus.REJECT

    async def test_cancelling_to_cancelled_is_accepted(self, store: AdminStore) -> None:
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
        self, store: AdminStore
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
        self, store: AdminStore
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
        self, store: AdminStore
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

    async def test_accepts_cancelling_flow_run_with_pid(self, store: AdminStore) -> None:
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
        self, store: AdminStore
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
        self, store: AdminStore, initial_state_type: StateTypeOrNone
    ) -> None:
        """Cancelling a run in any other state is left alone."""
        ctx = await initialize_orchestration(
            store, "flow", initial_state_type, StateType.CANCELLING
        )

        ctx = await apply_rules(ctx, [BypassCancellingFlowRunsWithNoInfra])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.validated_state_type == StateType.CANCELLING

    async def test_the_cancelled_state_is_a_fresh_state(self, store: AdminStore) -> None:
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
