"""Validating the proposed state (``rules/context.py``): validation writes the proposed state
(with its data) and makes it the run's state, or keeps the current one when none is proposed;
a store failure aborts the transition, or propagates for a retry when it is retryable.

Part of the port of Prefect's ``test_rules.py`` (see the package docstring). Differences from
Prefect: the context carries a ``Store`` instead of a session, and the result data lives on the
state itself, so the three "result artifact" scenarios check that the validated state and the
stored history state carry the data. The class keeps Prefect's name,
``TestOrchestrationContext``, which it shares with ``test_context_mutation.py``.
"""

from __future__ import annotations

import pytest

from arbiter.rules.errors import StoreError
from arbiter.rules.memory import InMemoryStore
from arbiter.rules.results import SetStateStatus, StateAbortDetails
from arbiter.schemas.runs import FlowRun, RunKind, TaskRun
from arbiter.schemas.states import State, StateType
from tests.factories import RunType, initialize_orchestration
from tests.unit.framework.helpers import (
    ALL_STATES,
    RUN_TYPES,
    TYPES,
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
