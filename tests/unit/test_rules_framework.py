"""The rule framework: outcomes, rule lifecycle, universal transforms, contexts, null rejects.

A port of Prefect's ``tests/server/orchestration/test_rules.py`` (reference §5.1), with
the same test names so a parity table can map them. Rules are entered by hand, alone or
nested through an ``AsyncExitStack``, exactly as the orchestration loop nests them.

Differences from Prefect: the context carries a ``Store`` instead of a session, and the
result data lives on the state itself, so the three "result artifact" scenarios check
that the validated state and the stored history state carry the data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from itertools import product
from typing import Any, TypeAlias

import pytest

from rules.base import (
    ALL_ORCHESTRATION_STATES,
    BaseOrchestrationRule,
    BaseUniversalTransform,
    StateTypeOrNone,
)
from rules.context import OrchestrationContext, TaskOrchestrationContext
from rules.errors import OrchestrationError, StoreError
from rules.memory import InMemoryStore
from rules.results import (
    OrchestrationResult,
    SetStateStatus,
    StateAbortDetails,
    StateRejectDetails,
    StateWaitDetails,
)
from schemas.runs import FlowRun, RunKind, TaskRun
from schemas.states import State, StateType
from tests.factories import RunType, initialize_orchestration, make_state

AnyContext: TypeAlias = OrchestrationContext[Any]
Transition: TypeAlias = tuple[StateTypeOrNone, StateTypeOrNone]

# Sorted so the parametrized ids come out in a stable order.
ALL_STATES: list[StateTypeOrNone] = sorted(ALL_ORCHESTRATION_STATES, key=str)
TYPES: list[StateType] = list(StateType)
RUN_TYPES: list[RunType] = ["task", "flow"]


def transition_id(transition: Transition) -> str:
    """``RUNNING->COMPLETED``, ``None->PENDING``: readable parametrize ids."""
    initial, proposed = transition
    return f"{initial.name if initial else None}->{proposed.name if proposed else None}"


def transitions(
    initials: Sequence[StateTypeOrNone], proposeds: Sequence[StateTypeOrNone]
) -> list[Transition]:
    return list(product(initials, proposeds))


def other_type(*excluded: StateTypeOrNone) -> StateType:
    """The first state type that is none of ``excluded``: a deterministic 'something else'."""
    return next(t for t in StateType if t not in excluded)


class SpyRule(BaseOrchestrationRule[AnyContext]):
    """A rule valid for every transition that counts its hooks; subclasses add ``act``.

    Each before or after hook leaves one side effect and each cleanup undoes one,
    so ``side_effects`` is 0 exactly when the rule cleaned up everything it did.
    """

    FROM_STATES = ALL_ORCHESTRATION_STATES
    TO_STATES = ALL_ORCHESTRATION_STATES

    def __init__(
        self,
        context: AnyContext,
        from_state_type: StateTypeOrNone,
        to_state_type: StateTypeOrNone,
    ) -> None:
        super().__init__(context, from_state_type, to_state_type)
        self.before = 0
        self.after = 0
        self.cleaned = 0

    @property
    def side_effects(self) -> int:
        return self.before + self.after - self.cleaned

    async def act(
        self, initial_state: State | None, proposed_state: State | None, context: AnyContext
    ) -> None:
        """What the rule does on entry besides counting; nothing by default."""

    async def before_transition(
        self, initial_state: State | None, proposed_state: State | None, context: AnyContext
    ) -> None:
        self.before += 1
        await self.act(initial_state, proposed_state, context)

    async def after_transition(
        self, initial_state: State | None, validated_state: State | None, context: AnyContext
    ) -> None:
        self.after += 1

    async def cleanup(
        self, initial_state: State | None, validated_state: State | None, context: AnyContext
    ) -> None:
        self.cleaned += 1


class RejectToOtherType(SpyRule):
    """Rejects the transition to a state whose type is neither the initial nor the proposed one."""

    async def act(
        self, initial_state: State | None, proposed_state: State | None, context: AnyContext
    ) -> None:
        replacement = make_state(other_type(self.from_state_type, self.to_state_type))
        await self.reject_transition(replacement, reason="for testing, of course")


class NullRejectionRule(SpyRule):
    """Rejects the transition without a replacement: nothing is written."""

    async def act(
        self, initial_state: State | None, proposed_state: State | None, context: AnyContext
    ) -> None:
        await self.reject_transition(None, reason="its okay")


class RaisingRule(SpyRule):
    """Fails in its before-hook."""

    async def act(
        self, initial_state: State | None, proposed_state: State | None, context: AnyContext
    ) -> None:
        raise RuntimeError("Test!")


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


class FailingStore(InMemoryStore):
    """An in-memory store whose next ``insert_state`` raises a chosen error, once."""

    _next_error: Exception | None = None

    def fail_next_insert(self, error: Exception) -> None:
        self._next_error = error

    async def insert_state(self, kind: RunKind, run: FlowRun | TaskRun, state: State) -> None:
        error, self._next_error = self._next_error, None
        if error is not None:
            raise error
        await super().insert_state(kind, run, state)


class TestOrchestrationResult:
    @pytest.mark.parametrize(
        ("details_type", "details"),
        [
            (StateWaitDetails, StateWaitDetails(delay_seconds=20, reason="No!")),
            (StateRejectDetails, StateRejectDetails(reason="I don't want to change!")),
            (StateAbortDetails, StateAbortDetails(reason="I don't need to change!")),
        ],
        ids=["wait", "reject", "abort"],
    )
    def test_details_are_not_improperly_coerced(
        self,
        details_type: type[StateWaitDetails | StateRejectDetails | StateAbortDetails],
        details: StateWaitDetails | StateRejectDetails | StateAbortDetails,
    ) -> None:
        """Details decode into the class named by their ``type``, whatever the status."""
        result = OrchestrationResult.model_validate(
            {"state": None, "status": SetStateStatus.ACCEPT, "details": details.model_dump()}
        )
        assert type(result.details) is details_type
        assert result.details == details


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


@pytest.mark.parametrize("run_type", RUN_TYPES)
class TestOrchestrationContext:
    async def test_context_is_protected_from_mutation_at_all_costs(
        self, store: InMemoryStore, run_type: RunType
    ) -> None:
        """Reassigning state fields on the copies a hook receives never reaches the context."""
        transition = (StateType.PENDING, StateType.RUNNING)
        ctx = await initialize_orchestration(store, run_type, *transition)

        class EvilVillainRule(SpyRule):
            async def act(
                self,
                initial_state: State | None,
                proposed_state: State | None,
                context: AnyContext,
            ) -> None:
                assert context.initial_state is not None
                assert context.proposed_state is not None
                context.initial_state.type = StateType.CANCELLED
                context.proposed_state.type = StateType.COMPLETED

            async def after_transition(
                self,
                initial_state: State | None,
                validated_state: State | None,
                context: AnyContext,
            ) -> None:
                await super().after_transition(initial_state, validated_state, context)
                assert context.initial_state is not None
                assert context.validated_state is not None
                context.initial_state.type = StateType.CANCELLED
                context.validated_state.type = StateType.SCHEDULED

        class MutatingSlimeRule(SpyRule):
            async def act(
                self,
                initial_state: State | None,
                proposed_state: State | None,
                context: AnyContext,
            ) -> None:
                assert initial_state is not None
                assert proposed_state is not None
                initial_state.type = StateType.CANCELLED
                proposed_state.type = StateType.COMPLETED

            async def after_transition(
                self,
                initial_state: State | None,
                validated_state: State | None,
                context: AnyContext,
            ) -> None:
                await super().after_transition(initial_state, validated_state, context)
                assert initial_state is not None
                assert validated_state is not None
                initial_state.type = StateType.CANCELLED
                validated_state.type = StateType.COMPLETED

        villain = EvilVillainRule(ctx, *transition)
        slime = MutatingSlimeRule(ctx, *transition)
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(villain)
            assert (ctx.initial_state_type, ctx.proposed_state_type) == transition
            await stack.enter_async_context(slime)
            assert (ctx.initial_state_type, ctx.proposed_state_type) == transition
            await ctx.validate_proposed_state()

        assert ctx.orchestration_error is None
        assert villain.after == slime.after == 1
        assert ctx.initial_state_type is StateType.PENDING
        assert ctx.proposed_state_type is StateType.RUNNING
        assert ctx.validated_state_type is StateType.RUNNING

    async def test_context_will_mutate_if_asked_politely(
        self, store: InMemoryStore, run_type: RunType
    ) -> None:
        """A rule changes the transition by rejecting it with the state it wants written."""
        transition = (StateType.PENDING, StateType.RUNNING)
        ctx = await initialize_orchestration(store, run_type, *transition)

        class PoliteHeroRule(SpyRule):
            async def act(
                self,
                initial_state: State | None,
                proposed_state: State | None,
                context: AnyContext,
            ) -> None:
                assert proposed_state is not None
                proposed_state.type = StateType.COMPLETED
                await self.reject_transition(proposed_state, reason="heroes ask permission")

        async with PoliteHeroRule(ctx, *transition):
            await ctx.validate_proposed_state()

        assert ctx.proposed_state_type is StateType.COMPLETED
        assert ctx.validated_state_type is StateType.COMPLETED

    async def test_context_will_not_mutate_if_asked_too_late(
        self, store: InMemoryStore, run_type: RunType
    ) -> None:
        """Rejecting after validation raises: the state is already written."""
        transition = (StateType.PENDING, StateType.RUNNING)
        ctx = await initialize_orchestration(store, run_type, *transition)

        class TardyHeroRule(SpyRule):
            async def after_transition(
                self,
                initial_state: State | None,
                validated_state: State | None,
                context: AnyContext,
            ) -> None:
                assert validated_state is not None
                validated_state.type = StateType.COMPLETED
                await self.reject_transition(validated_state, reason="heroes should not be late")

        with pytest.raises(RuntimeError, match="already validated"):
            async with TardyHeroRule(ctx, *transition):
                await ctx.validate_proposed_state()

        assert ctx.validated_state_type is StateType.RUNNING

    @pytest.mark.parametrize("delay", [42, 424242])
    async def test_context_will_propose_no_state_if_asked_to_wait(
        self, store: InMemoryStore, run_type: RunType, delay: int
    ) -> None:
        """A delay proposes no state and answers WAIT with the delay."""
        transition = (StateType.PENDING, StateType.RUNNING)
        ctx = await initialize_orchestration(store, run_type, *transition)

        class WaitingRule(SpyRule):
            async def act(
                self,
                initial_state: State | None,
                proposed_state: State | None,
                context: AnyContext,
            ) -> None:
                await self.delay_transition(delay, reason="heroes should not be late")

        async with WaitingRule(ctx, *transition):
            await ctx.validate_proposed_state()

        assert ctx.proposed_state is None
        assert ctx.response_status is SetStateStatus.WAIT
        assert isinstance(ctx.response_details, StateWaitDetails)
        assert ctx.response_details.delay_seconds == delay

    @pytest.mark.parametrize("delay", [42, 424242])
    async def test_rules_cant_try_to_wait_after_validation(
        self, store: InMemoryStore, run_type: RunType, delay: int
    ) -> None:
        """Delaying after validation raises and leaves the accepted state in place."""
        transition = (StateType.PENDING, StateType.RUNNING)
        ctx = await initialize_orchestration(store, run_type, *transition)

        class WaitingRule(SpyRule):
            async def after_transition(
                self,
                initial_state: State | None,
                validated_state: State | None,
                context: AnyContext,
            ) -> None:
                await self.delay_transition(delay, reason="heroes should not be late")

        with pytest.raises(RuntimeError, match="already validated"):
            async with WaitingRule(ctx, *transition):
                await ctx.validate_proposed_state()

        assert ctx.validated_state_type is StateType.RUNNING
        assert ctx.response_status is SetStateStatus.ACCEPT

    async def test_context_will_propose_no_state_if_aborted(
        self, store: InMemoryStore, run_type: RunType
    ) -> None:
        """An abort proposes no state; validation keeps the run's current state."""
        transition = (StateType.PENDING, StateType.RUNNING)
        ctx = await initialize_orchestration(store, run_type, *transition)

        class AbortingRule(SpyRule):
            async def act(
                self,
                initial_state: State | None,
                proposed_state: State | None,
                context: AnyContext,
            ) -> None:
                await self.abort_transition(reason="stop the transition if possible")

        async with AbortingRule(ctx, *transition):
            current_state = ctx.run.state
            await ctx.validate_proposed_state()

        assert current_state is not None
        assert ctx.proposed_state is None
        assert ctx.validated_state == current_state
        assert ctx.response_status is SetStateStatus.ABORT

    async def test_rules_cant_abort_after_validation(
        self, store: InMemoryStore, run_type: RunType
    ) -> None:
        """Aborting after validation raises and leaves the accepted state in place."""
        transition = (StateType.PENDING, StateType.RUNNING)
        ctx = await initialize_orchestration(store, run_type, *transition)

        class AbortingRule(SpyRule):
            async def after_transition(
                self,
                initial_state: State | None,
                validated_state: State | None,
                context: AnyContext,
            ) -> None:
                await self.abort_transition(reason="stop the transition if possible")

        with pytest.raises(RuntimeError, match="already validated"):
            async with AbortingRule(ctx, *transition):
                await ctx.validate_proposed_state()

        assert ctx.validated_state_type is StateType.RUNNING
        assert ctx.response_status is SetStateStatus.ACCEPT

    @pytest.mark.parametrize(
        "intended_transition", transitions(ALL_STATES, ALL_STATES), ids=transition_id
    )
    async def test_contexts_validate_proposed_states(
        self, store: InMemoryStore, run_type: RunType, intended_transition: Transition
    ) -> None:
        """Validation writes the proposed state, or keeps the current one when none is proposed."""
        initial_type, proposed_type = intended_transition
        ctx = await initialize_orchestration(store, run_type, *intended_transition)
        assert ctx.validated_state is None

        await ctx.validate_proposed_state()

        expected = proposed_type if proposed_type is not None else initial_type
        assert ctx.validated_state_type == expected

    async def test_context_validation_returns_none(
        self, store: InMemoryStore, run_type: RunType
    ) -> None:
        """``validate_proposed_state`` reports through the context, not a return value."""
        ctx = await initialize_orchestration(store, run_type, StateType.PENDING, StateType.RUNNING)

        returned = await ctx.validate_proposed_state()  # type: ignore[func-returns-value]

        assert returned is None

    async def test_context_validation_sets_run_state(
        self, store: InMemoryStore, run_type: RunType
    ) -> None:
        """The validated state is the proposed one, with its id, and becomes the run's state."""
        ctx = await initialize_orchestration(store, run_type, StateType.PENDING, StateType.RUNNING)
        assert ctx.run.state is not None
        assert ctx.proposed_state is not None
        assert ctx.run.state.id != ctx.proposed_state.id

        await ctx.validate_proposed_state()

        assert ctx.validated_state is not None
        assert ctx.run.state.id == ctx.validated_state.id == ctx.proposed_state.id

    async def test_context_validation_writes_result_artifact(
        self, store: InMemoryStore, run_type: RunType
    ) -> None:
        """The proposed data is on the validated state and on the state stored in the history."""
        data = {"value": "some special data"}
        ctx = await initialize_orchestration(
            store, run_type, StateType.PENDING, StateType.RUNNING, proposed_state_data=data
        )

        await ctx.validate_proposed_state()

        assert ctx.validated_state is not None
        assert ctx.validated_state.data == data
        assert ctx.run.state is not None
        assert ctx.run.state.data == data
        stored = await store.read_history(ctx.run_kind, ctx.run.id)
        assert stored[-1].id == ctx.validated_state.id
        assert stored[-1].data == data

    async def test_context_validation_writes_result_artifact_with_metadata(
        self, store: InMemoryStore, run_type: RunType
    ) -> None:
        """Without result artifacts, data carrying artifact metadata keys is stored verbatim."""
        data = {
            "value": "some special data",
            "artifact_type": "a special type",
            "artifact_description": "it's so pretty",
        }
        ctx = await initialize_orchestration(
            store, run_type, StateType.PENDING, StateType.RUNNING, proposed_state_data=dict(data)
        )

        await ctx.validate_proposed_state()

        assert ctx.validated_state is not None
        assert ctx.validated_state.data == data
        stored = await store.read_history(ctx.run_kind, ctx.run.id)
        assert stored[-1].id == ctx.validated_state.id
        assert stored[-1].data == data

    async def test_context_validation_does_not_write_artifact_when_no_result(
        self, store: InMemoryStore, run_type: RunType
    ) -> None:
        """A state proposed without data is validated and stored without data."""
        ctx = await initialize_orchestration(store, run_type, StateType.PENDING, StateType.RUNNING)
        assert ctx.proposed_state is not None
        assert ctx.proposed_state.data is None

        await ctx.validate_proposed_state()

        assert ctx.validated_state is not None
        assert ctx.validated_state.data is None
        stored = await store.read_history(ctx.run_kind, ctx.run.id)
        assert stored[-1].id == ctx.validated_state.id
        assert stored[-1].data is None

    @pytest.mark.parametrize(
        "intended_transition",
        [(i, p) for i, p in transitions(ALL_STATES, TYPES) if i != p],
        ids=transition_id,
    )
    async def test_context_state_validation_encounters_exception(
        self, run_type: RunType, intended_transition: Transition
    ) -> None:
        """A store failure while writing aborts the transition and the rules clean up."""
        store = FailingStore()
        ctx = await initialize_orchestration(store, run_type, *intended_transition)
        store.fail_next_insert(RuntimeError("One time error!"))

        rule = SpyRule(ctx, *intended_transition)
        async with rule:
            await ctx.validate_proposed_state()

        assert (rule.before, rule.after, rule.cleaned) == (1, 0, 1)
        assert ctx.proposed_state is None
        assert ctx.response_status is SetStateStatus.ABORT
        assert isinstance(ctx.response_details, StateAbortDetails)
        reason = "Error validating state: RuntimeError('One time error!')"
        assert ctx.response_details.reason == reason

    # Beyond Prefect's suite: the non-retryable StoreError branch of validation.
    async def test_context_state_validation_encounters_permanent_store_error(
        self, run_type: RunType
    ) -> None:
        """A store error marked permanent aborts the transition like any other error."""
        transition = (StateType.PENDING, StateType.RUNNING)
        store = FailingStore()
        ctx = await initialize_orchestration(store, run_type, *transition)
        store.fail_next_insert(StoreError("check constraint violated", retryable=False))

        rule = SpyRule(ctx, *transition)
        async with rule:
            await ctx.validate_proposed_state()

        assert (rule.before, rule.after, rule.cleaned) == (1, 0, 1)
        assert ctx.proposed_state is None
        assert ctx.response_status is SetStateStatus.ABORT
        assert isinstance(ctx.response_details, StateAbortDetails)
        assert ctx.response_details.reason == (
            "Error validating state: StoreError('check constraint violated')"
        )

    async def test_context_state_validation_encounters_sqlite_busy_exception(
        self, run_type: RunType
    ) -> None:
        """A retryable store error propagates, for a retry, once the rules have cleaned up."""
        transition = (StateType.PENDING, StateType.RUNNING)
        store = FailingStore()
        ctx = await initialize_orchestration(store, run_type, *transition)
        store.fail_next_insert(StoreError("database is locked", retryable=True))

        rule = SpyRule(ctx, *transition)
        with pytest.raises(StoreError, match="database is locked"):
            async with rule:
                await ctx.validate_proposed_state()

        assert (rule.before, rule.after, rule.cleaned) == (1, 0, 1)
        assert ctx.proposed_state is None


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
