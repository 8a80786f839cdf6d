"""Null rejects (``rules/base.py``): a rule that rejects without a replacement state fizzles
the rules entered before it, invalidates the ones after, writes nothing and answers with the
run's current state; a run with no state cannot be null-rejected.

Part of the port of Prefect's ``test_rules.py`` (see the package docstring), for task and flow
runs alike.
"""

from __future__ import annotations

import contextlib

import pytest

from arbiter.rules.errors import OrchestrationError
from arbiter.rules.memory import InMemoryStore
from arbiter.rules.results import SetStateStatus
from arbiter.schemas.states import State, StateType
from tests.factories import RunType, initialize_orchestration
from tests.unit.framework.helpers import (
    RUN_TYPES,
    TYPES,
    AnyContext,
    SpyRule,
    Transition,
    transition_id,
    transitions,
)


class NullRejectionRule(SpyRule):
    """Rejects the transition without a replacement: nothing is written."""

    async def act(
        self, initial_state: State | None, proposed_state: State | None, context: AnyContext
    ) -> None:
        await self.reject_transition(None, reason="its okay")


@pytest.mark.parametrize("run_type", RUN_TYPES)
class TestNullRejection:
    @pytest.mark.parametrize("intended_transition", transitions(TYPES, TYPES), ids=transition_id)
    async def test_null_rejects_fizzle_all_prior_rules(
        self, store: InMemoryStore, run_type: RunType, intended_transition: Transition
    ) -> None:
        """A null reject fizzles the rules entered before it, which undo their side effects."""
        ctx = await initialize_orchestration(store, run_type, *intended_transition)

        minimal = SpyRule(ctx, *intended_transition)
        rejector = NullRejectionRule(ctx, *intended_transition)
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(minimal)
            assert minimal.side_effects == 1
            await stack.enter_async_context(rejector)
            assert minimal.side_effects == 1
            assert (rejector.before, rejector.after, rejector.cleaned) == (1, 0, 0)
            await ctx.validate_proposed_state()

        assert minimal.side_effects == 0
        assert await minimal.fizzled() is True
        assert (minimal.after, minimal.cleaned) == (0, 1)
        assert await rejector.invalid() is False
        assert await rejector.fizzled() is False
        assert ctx.response_status is SetStateStatus.REJECT

    @pytest.mark.parametrize("intended_transition", transitions(TYPES, TYPES), ids=transition_id)
    async def test_null_rejects_abort_all_subsequent_rules(
        self, store: InMemoryStore, run_type: RunType, intended_transition: Transition
    ) -> None:
        """Rules entered after a null reject are invalid and fire no hook."""
        ctx = await initialize_orchestration(store, run_type, *intended_transition)

        rejector = NullRejectionRule(ctx, *intended_transition)
        minimal = SpyRule(ctx, *intended_transition)
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(rejector)
            await stack.enter_async_context(minimal)
            assert rejector.before == 1
            assert minimal.side_effects == 0
            await ctx.validate_proposed_state()

        assert await minimal.invalid() is True
        assert (minimal.before, minimal.after, minimal.cleaned) == (0, 0, 0)
        assert await rejector.invalid() is False
        assert await rejector.fizzled() is False
        assert ctx.response_status is SetStateStatus.REJECT

    @pytest.mark.parametrize("proposed_state_type", TYPES, ids=str)
    async def test_cannot_null_reject_runs_with_no_state(
        self, store: InMemoryStore, run_type: RunType, proposed_state_type: StateType
    ) -> None:
        """A run without a state has nothing to keep: a null reject errors and aborts."""
        transition = (None, proposed_state_type)
        ctx = await initialize_orchestration(store, run_type, *transition)

        async with NullRejectionRule(ctx, *transition):
            await ctx.validate_proposed_state()

        assert isinstance(ctx.orchestration_error, OrchestrationError)
        assert ctx.response_status is SetStateStatus.ABORT

    async def test_context_will_not_write_new_state_with_null_reject(
        self, store: InMemoryStore, run_type: RunType
    ) -> None:
        """A null reject writes nothing and answers with the run's current state."""
        transition = (StateType.PENDING, StateType.RUNNING)
        ctx = await initialize_orchestration(store, run_type, *transition)
        history_before = await store.read_history(ctx.run_kind, ctx.run.id)

        async with NullRejectionRule(ctx, *transition):
            current_state = ctx.run.state
            await ctx.validate_proposed_state()

        assert current_state is not None
        assert ctx.proposed_state is None
        assert ctx.validated_state == current_state
        assert ctx.response_status is SetStateStatus.REJECT
        assert await store.read_history(ctx.run_kind, ctx.run.id) == history_before

    async def test_rules_that_reject_state_with_null_do_not_fizzle_themselves(
        self, store: InMemoryStore, run_type: RunType
    ) -> None:
        """The null-rejecting rule finishes normally: before and after fire, cleanup does not."""
        transition = (StateType.PENDING, StateType.RUNNING)
        ctx = await initialize_orchestration(store, run_type, *transition)

        rejector = NullRejectionRule(ctx, *transition)
        async with rejector:
            pass

        assert await rejector.invalid() is False
        assert await rejector.fizzled() is False
        assert (rejector.before, rejector.after, rejector.cleaned) == (1, 1, 0)
