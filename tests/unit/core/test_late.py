"""Marking runs late (``rules/core/late.py``): only a SCHEDULED run can be late, and
only once.

Ported from Prefect's ``tests/server/orchestration/test_core_policy.py``
(reference §5.2, tests 50-52): Prefect's class and test names are kept so
``docs/parity.md`` can map them; classes named after a rule hold the extra scenarios.
"""

from __future__ import annotations

import pytest

from arbiter.rules.core.late import EnsureOnlyScheduledFlowsMarkedLate
from arbiter.rules.results import (
    SetStateStatus,
    StateRejectDetails,
)
from arbiter.rules.store import AdminStore
from arbiter.schemas.states import StateType
from tests.factories import initialize_orchestration
from tests.unit.core.helpers import (
    apply_rules,
    type_id,
)


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
        self, store: AdminStore, initial_state_type: StateType
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

    async def test_scheduled_to_late_transition_is_accepted(self, store: AdminStore) -> None:
        """A SCHEDULED run can be marked late."""
        ctx = await initialize_orchestration(
            store, "flow", StateType.SCHEDULED, StateType.SCHEDULED, proposed_state_name="Late"
        )

        ctx = await apply_rules(ctx, [EnsureOnlyScheduledFlowsMarkedLate])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.validated_state is not None
        assert ctx.validated_state.name == "Late"

    async def test_reject_marking_already_late_flow_as_late(self, store: AdminStore) -> None:
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
        self, store: AdminStore, initial_state_type: StateType
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
