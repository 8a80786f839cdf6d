"""The orchestration context (``rules/context.py``): hooks get copies that cannot change it,
rules change the transition only by rejecting, delaying or aborting before validation, and
validation writes the proposed state or aborts when the store fails.

Part of the port of Prefect's ``test_rules.py`` (see the package docstring). Differences from
Prefect: the context carries a ``Store`` instead of a session, and the result data lives on the
state itself, so the three "result artifact" scenarios check that the validated state and the
stored history state carry the data.
"""

from __future__ import annotations

import contextlib

import pytest

from rules.errors import StoreError
from rules.memory import InMemoryStore
from rules.results import SetStateStatus, StateAbortDetails, StateWaitDetails
from schemas.runs import FlowRun, RunKind, TaskRun
from schemas.states import State, StateType
from tests.factories import RunType, initialize_orchestration
from tests.unit.framework.helpers import (
    ALL_STATES,
    RUN_TYPES,
    TYPES,
    AnyContext,
    SpyRule,
    Transition,
    transition_id,
    transitions,
)


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
