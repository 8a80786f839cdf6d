"""How the orchestration context (``rules/context.py``) may change: hooks get copies that cannot
change it, and rules change the transition only by rejecting, delaying or aborting before
validation; afterwards they raise. Validation itself is in ``test_context_validation.py``.

Part of the port of Prefect's ``test_rules.py`` (see the package docstring). The class keeps
Prefect's name, ``TestOrchestrationContext``, which it shares with the validation module.
"""

from __future__ import annotations

import contextlib

import pytest

from arbiter.rules.memory import InMemoryStore
from arbiter.rules.results import SetStateStatus, StateWaitDetails
from arbiter.schemas.states import State, StateType
from tests.factories import RunType, initialize_orchestration
from tests.unit.framework.helpers import RUN_TYPES, AnyContext, SpyRule


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
