"""Orchestration rules (``rules/base.py``): the hook lifecycle of valid, invalid and fizzled
rules, rejecting, delaying and aborting, parameters passed between rules, errors in a
before-hook, and nested rules. Null rejects are in ``test_null_rejection.py``.

Part of the port of Prefect's ``test_rules.py`` (see the package docstring). Rules are entered
by hand, alone or nested through an ``AsyncExitStack``, exactly as the orchestration loop nests
them.
"""

from __future__ import annotations

import contextlib

import pytest

from arbiter.rules.base import ALL_ORCHESTRATION_STATES, StateTypeOrNone
from arbiter.rules.context import TaskOrchestrationContext
from arbiter.rules.memory import InMemoryStore
from arbiter.rules.results import SetStateStatus
from arbiter.schemas.states import State, StateType
from tests.factories import initialize_orchestration, make_state
from tests.unit.framework.helpers import (
    ALL_STATES,
    TYPES,
    AnyContext,
    SpyRule,
    Transition,
    other_type,
    transition_id,
    transitions,
)


class RejectToOtherType(SpyRule):
    """Rejects the transition to a state whose type is neither the initial nor the proposed one."""

    async def act(
        self, initial_state: State | None, proposed_state: State | None, context: AnyContext
    ) -> None:
        replacement = make_state(other_type(self.from_state_type, self.to_state_type))
        await self.reject_transition(replacement, reason="for testing, of course")


class RaisingRule(SpyRule):
    """Fails in its before-hook."""

    async def act(
        self, initial_state: State | None, proposed_state: State | None, context: AnyContext
    ) -> None:
        raise RuntimeError("Test!")


class TestBaseOrchestrationRule:
    async def test_orchestration_rules_are_context_managers(self, store: InMemoryStore) -> None:
        """A rule is an async context manager whose body runs exactly once."""
        transition = (StateType.PENDING, StateType.RUNNING)
        ctx = await initialize_orchestration(store, "task", *transition)
        body_runs = 0

        async with SpyRule(ctx, *transition) as entered:
            body_runs += 1
            assert entered is ctx

        assert body_runs == 1

    async def test_valid_rules_fire_before_and_after_transitions(
        self, store: InMemoryStore
    ) -> None:
        """A rule matching the transition fires its before and after hooks, never cleanup."""
        transition = (StateType.PENDING, StateType.RUNNING)
        ctx = await initialize_orchestration(store, "task", *transition)

        rule = SpyRule(ctx, *transition)
        async with rule:
            pass

        assert await rule.invalid() is False
        assert await rule.fizzled() is False
        assert (rule.before, rule.after, rule.cleaned) == (1, 1, 0)

    async def test_invalid_rules_are_noops(self, store: InMemoryStore) -> None:
        """A rule built for another transition than the context's fires no hook at all."""
        ctx = await initialize_orchestration(store, "task", StateType.PENDING, StateType.RUNNING)

        class DefaultScopeRule(SpyRule):
            FROM_STATES = frozenset()
            TO_STATES = frozenset()

        rule = DefaultScopeRule(ctx, StateType.SCHEDULED, StateType.COMPLETED)
        async with rule:
            pass

        assert await rule.invalid() is True
        assert await rule.fizzled() is False
        assert (rule.before, rule.after, rule.cleaned) == (0, 0, 0)

    @pytest.mark.parametrize("mutating_state", ["initial", "proposed"])
    async def test_fizzled_rules_fire_before_hooks_then_cleanup(
        self, store: InMemoryStore, mutating_state: str
    ) -> None:
        """When the transition changes under a valid rule, it cleans up instead of finishing."""
        transition = (StateType.PENDING, StateType.RUNNING)
        ctx = await initialize_orchestration(store, "task", *transition)

        rule = SpyRule(ctx, *transition)
        async with rule:
            assert rule.side_effects == 1
            replacement = make_state(other_type(*transition))
            if mutating_state == "initial":
                ctx.initial_state = replacement
            else:
                ctx.proposed_state = replacement

        assert rule.side_effects == 0
        assert await rule.invalid() is False
        assert await rule.fizzled() is True
        assert (rule.before, rule.after, rule.cleaned) == (1, 0, 1)

    async def test_rules_that_reject_state_do_not_fizzle_themselves(
        self, store: InMemoryStore
    ) -> None:
        """The rule that rejects knows about the new transition, so it finishes normally."""
        transition = (StateType.PENDING, StateType.RUNNING)
        ctx = await initialize_orchestration(store, "task", *transition)

        rule = RejectToOtherType(ctx, *transition)
        async with rule:
            pass

        assert ctx.proposed_state_type not in transition
        assert await rule.invalid() is False
        assert await rule.fizzled() is False
        assert (rule.before, rule.after, rule.cleaned) == (1, 1, 0)

    async def test_rules_that_wait_do_not_fizzle_themselves(self, store: InMemoryStore) -> None:
        """The rule that delays the transition finishes normally (its TO_STATES include None)."""
        transition = (StateType.PENDING, StateType.RUNNING)
        ctx = await initialize_orchestration(store, "task", *transition)

        class WaitingRule(SpyRule):
            async def act(
                self,
                initial_state: State | None,
                proposed_state: State | None,
                context: AnyContext,
            ) -> None:
                await self.delay_transition(42, reason="for testing, of course")

        rule = WaitingRule(ctx, *transition)
        async with rule:
            pass

        assert ctx.response_status is SetStateStatus.WAIT
        assert await rule.invalid() is False
        assert await rule.fizzled() is False
        assert (rule.before, rule.after, rule.cleaned) == (1, 1, 0)

    async def test_rules_that_abort_do_not_fizzle_themselves(self, store: InMemoryStore) -> None:
        """The rule that aborts the transition finishes normally (its TO_STATES include None)."""
        transition = (StateType.PENDING, StateType.RUNNING)
        ctx = await initialize_orchestration(store, "task", *transition)

        class AbortingRule(SpyRule):
            async def act(
                self,
                initial_state: State | None,
                proposed_state: State | None,
                context: AnyContext,
            ) -> None:
                await self.abort_transition(reason="for testing, of course")

        rule = AbortingRule(ctx, *transition)
        async with rule:
            pass

        assert ctx.response_status is SetStateStatus.ABORT
        assert await rule.invalid() is False
        assert await rule.fizzled() is False
        assert (rule.before, rule.after, rule.cleaned) == (1, 1, 0)

    async def test_rules_can_pass_parameters_via_context(self, store: InMemoryStore) -> None:
        """``update_context_parameters`` reaches later rules; writes to a hook's copy do not."""
        transition = (StateType.PENDING, StateType.RUNNING)
        ctx = await initialize_orchestration(store, "task", *transition)
        heard: list[object] = []

        class MessagePassingRule(SpyRule):
            async def act(
                self,
                initial_state: State | None,
                proposed_state: State | None,
                context: AnyContext,
            ) -> None:
                await self.update_context_parameters("a special message", "hello!")
                context.parameters["a special message"] = "I can't hear you"

        class MessageReadingRule(SpyRule):
            async def act(
                self,
                initial_state: State | None,
                proposed_state: State | None,
                context: AnyContext,
            ) -> None:
                heard.append(context.parameters["a special message"])

        reader = MessageReadingRule(ctx, *transition)
        async with MessagePassingRule(ctx, *transition), reader:
            pass

        assert reader.before == 1
        assert heard == ["hello!"]
        assert ctx.parameters == {"a special message": "hello!"}

    @pytest.mark.parametrize(
        "intended_transition", transitions(ALL_STATES, TYPES), ids=transition_id
    )
    async def test_rules_that_raise_exceptions_during_before_transition(
        self, store: InMemoryStore, intended_transition: Transition
    ) -> None:
        """A before-hook error aborts the transition; it and every earlier rule clean up."""
        ctx = await initialize_orchestration(store, "task", *intended_transition)
        assert isinstance(ctx, TaskOrchestrationContext)

        outer = SpyRule(ctx, *intended_transition)
        raising = RaisingRule(ctx, *intended_transition)
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(outer)
            await stack.enter_async_context(raising)

        assert ctx.proposed_state is None
        assert await outer.fizzled() is True
        assert (outer.before, outer.after, outer.cleaned) == (1, 0, 1)
        # Rules that error on entry are fizzled so they can try to clean up.
        assert await raising.invalid() is False
        assert await raising.fizzled() is True
        assert (raising.before, raising.after, raising.cleaned) == (1, 0, 1)
        assert isinstance(ctx.orchestration_error, RuntimeError)
        assert ctx.response_status is SetStateStatus.ABORT

    @pytest.mark.parametrize("initial_state_type", ALL_STATES, ids=str)
    async def test_rules_enforce_initial_state_validity(
        self, store: InMemoryStore, initial_state_type: StateTypeOrNone
    ) -> None:
        """A rule whose FROM_STATES lack the initial type is invalid and fires nothing."""
        transition = (initial_state_type, None)
        ctx = await initialize_orchestration(store, "task", *transition)

        class StateEnforcingRule(SpyRule):
            FROM_STATES = ALL_ORCHESTRATION_STATES - {initial_state_type}

        rule = StateEnforcingRule(ctx, *transition)
        async with rule:
            pass

        assert await rule.invalid() is True
        assert (rule.before, rule.after, rule.cleaned) == (0, 0, 0)

    @pytest.mark.parametrize("proposed_state_type", ALL_STATES, ids=str)
    async def test_rules_enforce_proposed_state_validity(
        self, store: InMemoryStore, proposed_state_type: StateTypeOrNone
    ) -> None:
        """A rule whose TO_STATES lack the proposed type is invalid and fires nothing."""
        transition = (None, proposed_state_type)
        ctx = await initialize_orchestration(store, "task", *transition)

        class StateEnforcingRule(SpyRule):
            TO_STATES = ALL_ORCHESTRATION_STATES - {proposed_state_type}

        rule = StateEnforcingRule(ctx, *transition)
        async with rule:
            pass

        assert await rule.invalid() is True
        assert (rule.before, rule.after, rule.cleaned) == (0, 0, 0)

    # Beyond Prefect's suite: the sticky FROM/TO re-check on exit (reference §1.3).
    async def test_rules_that_reject_outside_their_to_states_fire_no_exit_hook(
        self, store: InMemoryStore
    ) -> None:
        """A rule that rejects into a type outside its TO_STATES runs neither after nor cleanup."""
        transition = (StateType.RUNNING, StateType.FAILED)
        ctx = await initialize_orchestration(store, "task", *transition)

        class RetryLikeRule(SpyRule):
            TO_STATES = frozenset({StateType.FAILED})

            async def act(
                self,
                initial_state: State | None,
                proposed_state: State | None,
                context: AnyContext,
            ) -> None:
                await self.reject_transition(make_state(StateType.SCHEDULED), reason="Retrying")

        rule = RetryLikeRule(ctx, *transition)
        async with rule:
            await ctx.validate_proposed_state()

        assert ctx.validated_state_type is StateType.SCHEDULED
        assert await rule.invalid() is True
        assert (rule.before, rule.after, rule.cleaned) == (1, 0, 0)

    @pytest.mark.parametrize(
        "intended_transition", transitions(ALL_STATES, ALL_STATES), ids=transition_id
    )
    async def test_nested_valid_rules_fire_hooks(
        self, store: InMemoryStore, intended_transition: Transition
    ) -> None:
        """Nested valid rules fire before hooks on entry in order and after hooks on exit."""
        ctx = await initialize_orchestration(store, "task", *intended_transition)

        first = SpyRule(ctx, *intended_transition)
        second = SpyRule(ctx, *intended_transition)
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(first)
            assert (first.before, second.before) == (1, 0)
            await stack.enter_async_context(second)
            assert (first.before, second.before) == (1, 1)
            assert first.after == second.after == 0

        for rule in (first, second):
            assert await rule.invalid() is False
            assert await rule.fizzled() is False
            assert (rule.before, rule.after, rule.cleaned) == (1, 1, 0)
        assert first.side_effects + second.side_effects == 4

    @pytest.mark.parametrize(
        "intended_transition", transitions(ALL_STATES, ALL_STATES), ids=transition_id
    )
    async def test_complex_nested_rules_interact_sensibly(
        self, store: InMemoryStore, intended_transition: Transition
    ) -> None:
        """A rejection fizzles earlier rules and invalidates later ones: no side effects remain."""
        ctx = await initialize_orchestration(store, "task", *intended_transition)

        first = SpyRule(ctx, *intended_transition)
        mutator = RejectToOtherType(ctx, *intended_transition)
        invalidated = SpyRule(ctx, *intended_transition)
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(first)
            await stack.enter_async_context(mutator)
            await stack.enter_async_context(invalidated)
            assert (first.before, mutator.before, invalidated.before) == (1, 1, 0)
            assert first.side_effects == 1

        assert await invalidated.invalid() is True
        assert await invalidated.fizzled() is False
        assert (invalidated.before, invalidated.after, invalidated.cleaned) == (0, 0, 0)

        assert await mutator.invalid() is False
        assert await mutator.fizzled() is False
        assert (mutator.before, mutator.after, mutator.cleaned) == (1, 1, 0)

        assert await first.invalid() is False
        assert await first.fizzled() is True
        assert (first.before, first.after, first.cleaned) == (1, 0, 1)
        assert first.side_effects + invalidated.side_effects == 0
