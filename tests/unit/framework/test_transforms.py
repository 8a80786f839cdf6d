"""Universal transforms (``rules/base.py``): they fire on every transition, nullified ones
included, and skip their after-hook once a rule has failed.

Part of the port of Prefect's ``test_rules.py`` (see the package docstring).
"""

from __future__ import annotations

import pytest

from arbiter.rules.base import BaseUniversalTransform, StateTypeOrNone
from arbiter.rules.memory import InMemoryStore
from arbiter.schemas.states import StateType
from tests.factories import initialize_orchestration, make_state
from tests.unit.framework.helpers import (
    ALL_STATES,
    TYPES,
    AnyContext,
    Transition,
    other_type,
    transition_id,
    transitions,
)


class SpyTransform(BaseUniversalTransform[AnyContext]):
    """A universal transform that counts its hooks."""

    def __init__(
        self,
        context: AnyContext,
        from_state_type: StateTypeOrNone,
        to_state_type: StateTypeOrNone,
    ) -> None:
        super().__init__(context, from_state_type, to_state_type)
        self.before = 0
        self.after = 0

    async def before_transition(self, context: AnyContext) -> None:
        self.before += 1

    async def after_transition(self, context: AnyContext) -> None:
        self.after += 1


class TestBaseUniversalTransform:
    async def test_universal_transforms_are_context_managers(self, store: InMemoryStore) -> None:
        """A transform is an async context manager that fires both hooks around its body."""
        transition = (StateType.RUNNING, StateType.COMPLETED)
        ctx = await initialize_orchestration(store, "task", *transition)
        body_runs = 0

        transform = SpyTransform(ctx, *transition)
        async with transform as entered:
            body_runs += 1
            assert entered is ctx

        assert body_runs == 1
        assert transform.before + transform.after == 2

    @pytest.mark.parametrize(
        "intended_transition", transitions(ALL_STATES, TYPES), ids=transition_id
    )
    async def test_universal_transforms_always_fire_on_all_transitions(
        self, store: InMemoryStore, intended_transition: Transition
    ) -> None:
        """A transform fires both hooks even when the transition changes under it."""
        ctx = await initialize_orchestration(store, "task", *intended_transition)

        transform = SpyTransform(ctx, *intended_transition)
        async with transform:
            ctx.initial_state = make_state(other_type(*intended_transition))

        assert (transform.before, transform.after) == (1, 1)

    @pytest.mark.parametrize(
        "intended_transition", transitions(ALL_STATES, [None]), ids=transition_id
    )
    async def test_universal_transforms_always_fire_on_nullified_transitions(
        self, store: InMemoryStore, intended_transition: Transition
    ) -> None:
        """A transform fires both hooks when nothing is proposed; it decides itself what to skip."""
        ctx = await initialize_orchestration(store, "task", *intended_transition)

        transform = SpyTransform(ctx, *intended_transition)
        async with transform:
            assert await transform.nullified_transition() is True
            ctx.initial_state = make_state(other_type(*intended_transition))

        assert (transform.before, transform.after) == (1, 1)

    @pytest.mark.parametrize(
        "intended_transition", transitions(ALL_STATES, TYPES), ids=transition_id
    )
    async def test_universal_transforms_never_fire_after_transition_on_errored_transitions(
        self, store: InMemoryStore, intended_transition: Transition
    ) -> None:
        """A transform skips its after-hook once a rule's before-hook has raised."""
        ctx = await initialize_orchestration(store, "task", *intended_transition)

        transform = SpyTransform(ctx, *intended_transition)
        async with transform:
            ctx.orchestration_error = RuntimeError("a rule failed")

        assert (transform.before, transform.after) == (1, 0)
