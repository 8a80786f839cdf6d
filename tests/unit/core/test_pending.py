"""PreventPendingTransitions: PENDING is entered once per attempt; renames within it are progress.

A port of Prefect's ``TestPreventPendingTransitions`` (reference §5.2, tests 53-58), on
flow runs as in Prefect.
"""

from __future__ import annotations

import datetime as dt
import uuid
from itertools import product

import pytest

from arbiter.rules.base import StateTypeOrNone
from arbiter.rules.core.pending import PreventPendingTransitions
from arbiter.rules.memory import InMemoryStore
from arbiter.rules.results import SetStateStatus, StateAbortDetails
from arbiter.schemas.states import StateType
from tests.factories import initialize_orchestration

Transition = tuple[StateTypeOrNone, StateTypeOrNone]

BANNED_INITIAL_TYPES = [
    StateType.CANCELLING,
    StateType.CANCELLED,
    StateType.RUNNING,
    StateType.PENDING,
]
BANNED_TRANSITIONS: list[Transition] = [(t, StateType.PENDING) for t in BANNED_INITIAL_TYPES]
ALLOWED_TRANSITIONS: list[Transition] = [
    pair for pair in product(StateType, StateType) if pair not in BANNED_TRANSITIONS
]


def transition_id(transition: Transition) -> str:
    """``RUNNING->PENDING``: readable parametrize ids."""
    initial, proposed = transition
    return f"{initial.name if initial else None}->{proposed.name if proposed else None}"


class TestPreventPendingTransitions:
    @pytest.mark.parametrize("intended_transition", BANNED_TRANSITIONS, ids=transition_id)
    async def test_banned_transitions_are_aborted(
        self, store: InMemoryStore, intended_transition: Transition
    ) -> None:
        """A run that is pending, running or cancelling/cancelled cannot go back to PENDING."""
        initial_type, _ = intended_transition
        assert initial_type is not None
        ctx = await initialize_orchestration(store, "flow", *intended_transition)

        async with PreventPendingTransitions(ctx, *intended_transition):
            await ctx.validate_proposed_state()

        assert ctx.response_status is SetStateStatus.ABORT
        assert ctx.response_details == StateAbortDetails(
            reason=f"This run is in a {initial_type.name} state and cannot transition "
            "to a PENDING state."
        )
        assert ctx.validated_state_type is initial_type

    @pytest.mark.parametrize("intended_transition", ALLOWED_TRANSITIONS, ids=transition_id)
    async def test_all_other_transitions_are_accepted(
        self, store: InMemoryStore, intended_transition: Transition
    ) -> None:
        """Every other transition between two states is accepted."""
        _, proposed_type = intended_transition
        ctx = await initialize_orchestration(store, "flow", *intended_transition)

        async with PreventPendingTransitions(ctx, *intended_transition):
            await ctx.validate_proposed_state()

        assert ctx.response_status is SetStateStatus.ACCEPT
        assert ctx.validated_state_type is proposed_type

    @pytest.mark.parametrize(
        ("initial_state_name", "proposed_state_name"),
        [
            ("Pending", "Submitting"),
            ("Submitting", "InfrastructurePending"),
            ("Pending", "InfrastructurePending"),
        ],
    )
    async def test_pending_to_pending_with_different_name_is_accepted(
        self, store: InMemoryStore, initial_state_name: str, proposed_state_name: str
    ) -> None:
        """Renaming forward within PENDING (to Submitting, InfrastructurePending) is progress."""
        transition = (StateType.PENDING, StateType.PENDING)
        ctx = await initialize_orchestration(
            store,
            "flow",
            *transition,
            initial_state_name=initial_state_name,
            proposed_state_name=proposed_state_name,
        )

        async with PreventPendingTransitions(ctx, *transition):
            await ctx.validate_proposed_state()

        assert ctx.response_status is SetStateStatus.ACCEPT
        assert ctx.validated_state is not None
        assert ctx.validated_state.name == proposed_state_name

    async def test_pending_to_pending_with_same_name_is_aborted(self, store: InMemoryStore) -> None:
        """Proposing Pending again while Pending is a second claim on the run."""
        transition = (StateType.PENDING, StateType.PENDING)
        ctx = await initialize_orchestration(
            store, "flow", *transition, initial_state_name="Pending", proposed_state_name="Pending"
        )

        async with PreventPendingTransitions(ctx, *transition):
            await ctx.validate_proposed_state()

        assert ctx.response_status is SetStateStatus.ABORT

    @pytest.mark.parametrize("initial_state_name", ["Submitting", "InfrastructurePending"])
    async def test_pending_back_to_pending_is_aborted(
        self, store: InMemoryStore, initial_state_name: str
    ) -> None:
        """A renamed PENDING state cannot be renamed back to plain "Pending"."""
        transition = (StateType.PENDING, StateType.PENDING)
        ctx = await initialize_orchestration(
            store,
            "flow",
            *transition,
            initial_state_name=initial_state_name,
            proposed_state_name="Pending",
        )

        async with PreventPendingTransitions(ctx, *transition):
            await ctx.validate_proposed_state()

        assert ctx.response_status is SetStateStatus.ABORT
        assert ctx.validated_state is not None
        assert ctx.validated_state.name == initial_state_name

    async def test_pending_name_change_preserves_state_details(self, store: InMemoryStore) -> None:
        """A forward rename keeps the initial state's scheduled time and concurrency lease."""
        transition = (StateType.PENDING, StateType.PENDING)
        lease_id = uuid.uuid4()
        scheduled_time = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
        ctx = await initialize_orchestration(
            store,
            "flow",
            *transition,
            initial_state_name="Pending",
            initial_details={
                "deployment_concurrency_lease_id": lease_id,
                "scheduled_time": scheduled_time,
            },
            proposed_state_name="Submitting",
        )

        async with PreventPendingTransitions(ctx, *transition):
            await ctx.validate_proposed_state()

        assert ctx.response_status is SetStateStatus.ACCEPT
        assert ctx.proposed_state is not None
        assert ctx.proposed_state.state_details.deployment_concurrency_lease_id == lease_id
        assert ctx.proposed_state.state_details.scheduled_time == scheduled_time
