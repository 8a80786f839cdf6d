"""Idempotent state proposals (``rules/core/duplicates.py``): a transition sent twice
is written once.

Ported from Prefect's ``tests/server/orchestration/test_core_policy.py``
(reference §5.2, tests 99-103): Prefect's class and test names are kept so
``docs/parity.md`` can map them; classes named after a rule hold the extra scenarios.
"""

from __future__ import annotations

import uuid

from arbiter.rules.core.duplicates import PreventDuplicateTransitions
from arbiter.rules.results import (
    SetStateStatus,
    StateRejectDetails,
)
from arbiter.rules.store import AdminStore
from arbiter.schemas.states import StateType
from tests.factories import initialize_orchestration
from tests.unit.core.helpers import (
    apply_rules,
)


class TestPreventDuplicateTransitions:
    transition = (StateType.PENDING, StateType.PENDING)

    async def test_no_transition_ids(self, store: AdminStore) -> None:
        """Proposals without transition ids are never deduplicated."""
        ctx = await initialize_orchestration(store, "flow", *self.transition)

        ctx = await apply_rules(ctx, [PreventDuplicateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT

    async def test_proposed_state_no_transition_id(self, store: AdminStore) -> None:
        """Only the current state has an id: not a replay."""
        ctx = await initialize_orchestration(
            store, "flow", *self.transition, initial_details={"transition_id": uuid.uuid4()}
        )

        ctx = await apply_rules(ctx, [PreventDuplicateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT

    async def test_initial_state_no_transition_id(self, store: AdminStore) -> None:
        """Only the proposal has an id: not a replay."""
        ctx = await initialize_orchestration(
            store, "flow", *self.transition, proposed_details={"transition_id": uuid.uuid4()}
        )

        ctx = await apply_rules(ctx, [PreventDuplicateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT

    async def test_different_transition_ids(self, store: AdminStore) -> None:
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

    async def test_same_transition_id(self, store: AdminStore) -> None:
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
