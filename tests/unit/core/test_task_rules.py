"""Task-run rules of the core policies, on the in-memory store and on PostgreSQL.

Ported from Prefect's ``tests/server/orchestration/test_core_policy.py``
(reference §5.2): Prefect's class and test names are kept so a parity table
can map them; classes named after a rule hold the extra scenarios.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import uuid
from collections.abc import Callable, Sequence
from itertools import product

import pytest

from rules.base import (
    ALL_ORCHESTRATION_STATES,
    StateTypeOrNone,
    TaskRunOrchestrationRule,
)
from rules.context import OutboxMessage, RuleSettings, TaskOrchestrationContext
from rules.core.background import CopyTaskParametersID, EnqueueScheduledTasks
from rules.core.caching import CacheInsertion, CacheRetrieval
from rules.core.concurrency import ReleaseTaskConcurrencySlots, SecureTaskConcurrencySlots
from rules.core.jitter import clamped_poisson_interval, lower_clamp_multiple
from rules.core.stopped_flows import PreventRunningTasksFromStoppedFlows
from rules.core.task_retries import RenameReruns, RetryFailedTasks, UpdateFlowRunTrackerOnTasks
from rules.core.task_terminal import HandleTaskTerminalStateTransitions
from rules.engine import Orchestrator
from rules.errors import ObjectNotFoundError, OrchestrationError
from rules.policy import RuleClass
from rules.results import SetStateStatus, StateRejectDetails, StateWaitDetails
from rules.store import AdminStore
from schemas.states import State, StateType, utcnow
from tests.factories import initialize_orchestration
from tests.unit.core.helpers import (
    ALL_STATES,
    CANONICAL_STATES,
    NOW,
    PERSISTED_RESULT,
    TERMINAL_STATES,
    apply_rules,
    frozen_orchestrator,
    hold_slots,
    record_cache_insertions,
    transition_id,
    type_id,
)


def rejecting_rule(to_type: StateType) -> type[TaskRunOrchestrationRule]:
    """A rule that rejects any transition into a copy of the proposed state of ``to_type``."""

    class RejectIntoAnotherType(TaskRunOrchestrationRule):
        FROM_STATES = ALL_ORCHESTRATION_STATES
        TO_STATES = ALL_ORCHESTRATION_STATES

        async def before_transition(
            self,
            initial_state: State | None,
            proposed_state: State | None,
            context: TaskOrchestrationContext,
        ) -> None:
            assert proposed_state is not None
            mutated = proposed_state.model_copy(update={"type": to_type})
            await self.reject_transition(mutated, reason="gotta fizzle some rules, for fun")

    return RejectIntoAnotherType


class AbortingRule(TaskRunOrchestrationRule):
    """Aborts every transition."""

    FROM_STATES = ALL_ORCHESTRATION_STATES
    TO_STATES = ALL_ORCHESTRATION_STATES

    async def before_transition(
        self,
        initial_state: State | None,
        proposed_state: State | None,
        context: TaskOrchestrationContext,
    ) -> None:
        await self.abort_transition(reason="For testing purposes")


def other_types(*excluded: StateType) -> list[StateType]:
    return [t for t in CANONICAL_STATES if t not in excluded]


async def _lose_flow_run(store: AdminStore, ctx: TaskOrchestrationContext) -> None:
    """Make the task's flow run unreadable, as if it had been deleted.

    The store has no delete, so the task run is pointed at a flow run id that was
    never stored; ``read_flow_run`` answers None for it exactly as for a deleted run
    (``task_run.flow_run_id`` has no foreign key: a task may arrive before its flow run).
    """
    assert await ctx.flow_run() is not None
    ctx.run.flow_run_id = uuid.uuid4()
    await store.save_run("task_run", ctx.run)
    assert await ctx.flow_run() is None


async def slots(store: AdminStore, tag: str) -> list[str]:
    """The run ids holding a slot of ``tag``'s limit, through the store's public API."""
    for limit in await store.list_tag_limits():
        if limit.tag == tag:
            return limit.active_slots
    raise KeyError(tag)


class TestCopyTaskParametersID:
    @pytest.mark.parametrize(
        "intended_transition",
        list(
            product(
                [StateType.SCHEDULED, StateType.PENDING], [StateType.PENDING, StateType.RUNNING]
            )
        ),
        ids=transition_id,
    )
    async def test_task_parameters_id_copied_from_scheduled_to_pending(
        self, store: AdminStore, intended_transition: tuple[StateType, StateType]
    ) -> None:
        """The initial state's task_parameters_id is carried onto the validated state."""
        parameters_id = uuid.uuid4()
        ctx = await initialize_orchestration(
            store,
            "task",
            *intended_transition,
            initial_details={"task_parameters_id": parameters_id},
        )

        ctx = await apply_rules(ctx, [CopyTaskParametersID])

        assert ctx.validated_state is not None
        assert ctx.validated_state.type == intended_transition[1]
        assert ctx.validated_state.state_details.task_parameters_id == parameters_id

    @pytest.mark.parametrize(
        "intended_transition",
        list(product([StateType.SCHEDULED, StateType.PENDING], TERMINAL_STATES)),
        ids=transition_id,
    )
    async def test_task_parameters_id_not_copied_for_other_transitions(
        self, store: AdminStore, intended_transition: tuple[StateType, StateType]
    ) -> None:
        """The rule does not apply to transitions into anything but PENDING or RUNNING."""
        ctx = await initialize_orchestration(
            store,
            "task",
            *intended_transition,
            initial_details={"task_parameters_id": uuid.uuid4()},
        )

        rule = CopyTaskParametersID(ctx, *intended_transition)
        async with rule as ctx:
            await ctx.validate_proposed_state()

        assert await rule.invalid()
        assert ctx.validated_state is not None
        assert ctx.validated_state.state_details.task_parameters_id is None

    async def test_proposed_task_parameters_id_is_kept(self, store: AdminStore) -> None:
        """A task_parameters_id sent with the proposal is not overwritten."""
        proposed_id = uuid.uuid4()
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.SCHEDULED,
            StateType.PENDING,
            initial_details={"task_parameters_id": uuid.uuid4()},
            proposed_details={"task_parameters_id": proposed_id},
        )

        ctx = await apply_rules(ctx, [CopyTaskParametersID])

        assert ctx.validated_state is not None
        assert ctx.validated_state.state_details.task_parameters_id == proposed_id


class TestCachingBackendLogic:
    @pytest.mark.parametrize(
        ("expiration", "expected_status", "expected_name"),
        [
            (utcnow() - dt.timedelta(days=1), SetStateStatus.ACCEPT, "Running"),
            (utcnow() + dt.timedelta(days=1), SetStateStatus.REJECT, "Cached"),
            (None, SetStateStatus.REJECT, "Cached"),
        ],
        ids=["past", "future", "null"],
    )
    async def test_set_and_retrieve_unexpired_cached_states(
        self,
        store: AdminStore,
        expiration: dt.datetime | None,
        expected_status: SetStateStatus,
        expected_name: str,
    ) -> None:
        """A completed state is cached under its key and served to later runs until it expires."""
        caching_policy = [CacheInsertion, CacheRetrieval]
        details = {"cache_key": "cache-hit", "cache_expiration": expiration}
        ctx1 = await initialize_orchestration(
            store,
            "task",
            StateType.RUNNING,
            StateType.COMPLETED,
            initial_details=details,
            proposed_details=details,
        )
        ctx1 = await apply_rules(ctx1, caching_policy)
        assert ctx1.response_status == SetStateStatus.ACCEPT

        ctx2 = await initialize_orchestration(
            store,
            "task",
            StateType.PENDING,
            StateType.RUNNING,
            initial_details=details,
            proposed_details=details,
        )
        ctx2 = await apply_rules(ctx2, caching_policy)

        assert ctx2.response_status == expected_status
        assert ctx2.validated_state is not None
        assert ctx2.validated_state.name == expected_name

    async def test_cache_insertion_requires_validated_state(
        self, store: AdminStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An error raised before validation propagates unchanged through CacheInsertion's exit."""
        insertions = record_cache_insertions(store, monkeypatch)
        details = {"cache_key": "cache-hit", "cache_expiration": utcnow() - dt.timedelta(days=1)}
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.RUNNING,
            StateType.COMPLETED,
            initial_details=details,
            proposed_details=details,
        )
        intended = (StateType.RUNNING, StateType.COMPLETED)

        async def fail_inside_the_rule() -> None:
            async with CacheInsertion(ctx, *intended):
                raise ValueError("this better be mine")

        with pytest.raises(ValueError, match="this better be mine"):
            await fail_inside_the_rule()

        assert insertions == []

    @pytest.mark.parametrize("proposed_state_type", other_types(StateType.COMPLETED), ids=type_id)
    async def test_only_cache_completed_states(
        self, store: AdminStore, proposed_state_type: StateType
    ) -> None:
        """A non-COMPLETED state with a cache key is written but never cached."""
        caching_policy = [CacheInsertion, CacheRetrieval]
        details = {"cache_key": "cache-hit"}
        ctx1 = await initialize_orchestration(
            store,
            "task",
            StateType.RUNNING,
            proposed_state_type,
            initial_details=details,
            proposed_details=details,
        )
        ctx1 = await apply_rules(ctx1, caching_policy)
        assert ctx1.response_status == SetStateStatus.ACCEPT

        ctx2 = await initialize_orchestration(
            store,
            "task",
            StateType.PENDING,
            StateType.RUNNING,
            initial_details=details,
            proposed_details=details,
        )
        ctx2 = await apply_rules(ctx2, caching_policy)

        assert ctx2.response_status == SetStateStatus.ACCEPT


class TestCacheRetrieval:
    async def _cache_completed_state(
        self, store: AdminStore, key: str, data: object = None
    ) -> State:
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.RUNNING,
            StateType.COMPLETED,
            proposed_details={"cache_key": key},
            proposed_state_data={"value": 42} if data is None else data,
        )
        ctx = await apply_rules(ctx, [CacheInsertion])
        assert ctx.validated_state is not None
        return ctx.validated_state

    async def test_cache_hit_is_a_fresh_copy_named_cached(self, store: AdminStore) -> None:
        """A hit rejects into a new COMPLETED "Cached" state stamped now, with the cached data."""
        cached = await self._cache_completed_state(store, "key")
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.PENDING,
            StateType.RUNNING,
            proposed_details={"cache_key": "key"},
            orchestrator=frozen_orchestrator(),
        )

        ctx = await apply_rules(ctx, [CacheRetrieval])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.response_details == StateRejectDetails(reason="Retrieved state from cache")
        hit = ctx.validated_state
        assert hit is not None
        assert (hit.type, hit.name, hit.data) == (StateType.COMPLETED, "Cached", {"value": 42})
        assert hit.id != cached.id
        assert hit.timestamp == NOW

    async def test_refresh_cache_bypasses_the_lookup(self, store: AdminStore) -> None:
        """A proposal with refresh_cache runs even though a cached state exists."""
        await self._cache_completed_state(store, "key")
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.PENDING,
            StateType.RUNNING,
            proposed_details={"cache_key": "key", "refresh_cache": True},
        )

        ctx = await apply_rules(ctx, [CacheRetrieval])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.validated_state is not None
        assert ctx.validated_state.name == "Running"

    async def test_newest_cache_entry_wins(self, store: AdminStore) -> None:
        """Of two live entries under one key, the most recently cached one is served."""
        await self._cache_completed_state(store, "key", data={"value": "oldest"})
        await self._cache_completed_state(store, "key", data={"value": "newest"})
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.PENDING,
            StateType.RUNNING,
            proposed_details={"cache_key": "key"},
        )

        ctx = await apply_rules(ctx, [CacheRetrieval])

        assert ctx.validated_state is not None
        assert ctx.validated_state.data == {"value": "newest"}


class TestCacheInsertion:
    async def test_cache_key_exceeding_maximum_length_rejects_with_the_same_state(
        self, store: AdminStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An over-long key is REJECTed with the proposed state itself, which is still written."""
        insertions = record_cache_insertions(store, monkeypatch)
        long_key = "k" * 5000
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.RUNNING,
            StateType.COMPLETED,
            proposed_details={"cache_key": long_key},
        )
        assert ctx.proposed_state is not None
        proposed_id = ctx.proposed_state.id

        ctx = await apply_rules(ctx, [CacheInsertion])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.response_details == StateRejectDetails(
            reason="Cache key exceeded maximum allowed length of 2000 characters."
        )
        assert ctx.validated_state is not None
        assert (ctx.validated_state.id, ctx.validated_state.type) == (
            proposed_id,
            StateType.COMPLETED,
        )
        # As in Prefect, the rule stays valid after its same-type reject and caches the key.
        assert [entry.cache_key for entry in insertions] == [long_key]
        cached = await store.find_cached_state(long_key, utcnow())
        assert cached is not None
        assert cached.id == proposed_id

    async def test_maximum_cache_key_length_comes_from_settings(self, store: AdminStore) -> None:
        """The limit is ``settings.max_cache_key_length``; a key at the limit is accepted."""
        orchestrator = Orchestrator(settings=RuleSettings(max_cache_key_length=10))
        at_limit = await initialize_orchestration(
            store,
            "task",
            StateType.RUNNING,
            StateType.COMPLETED,
            proposed_details={"cache_key": "k" * 10},
            orchestrator=orchestrator,
        )
        over_limit = await initialize_orchestration(
            store,
            "task",
            StateType.RUNNING,
            StateType.COMPLETED,
            proposed_details={"cache_key": "k" * 11},
            orchestrator=orchestrator,
        )

        at_limit = await apply_rules(at_limit, [CacheInsertion])
        over_limit = await apply_rules(over_limit, [CacheInsertion])

        assert at_limit.response_status == SetStateStatus.ACCEPT
        assert over_limit.response_status == SetStateStatus.REJECT
        assert over_limit.response_details == StateRejectDetails(
            reason="Cache key exceeded maximum allowed length of 10 characters."
        )

    async def test_nothing_is_cached_when_a_later_rule_changes_the_transition(
        self, store: AdminStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A fizzled CacheInsertion inserts no entry."""
        insertions = record_cache_insertions(store, monkeypatch)
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.RUNNING,
            StateType.COMPLETED,
            proposed_details={"cache_key": "key"},
        )

        ctx = await apply_rules(ctx, [CacheInsertion, rejecting_rule(StateType.FAILED)])

        assert ctx.response_status == SetStateStatus.REJECT
        assert insertions == []


class TestUpdatingFlowRunTrackerOnTasks:
    @pytest.mark.parametrize(
        ("flow_run_count", "initial_state_type"),
        list(product((5, 42), ALL_STATES)),
        ids=lambda value: type_id(value),
    )
    async def test_task_runs_track_corresponding_flow_runs(
        self, store: AdminStore, flow_run_count: int, initial_state_type: StateTypeOrNone
    ) -> None:
        """After entering RUNNING the task records its flow run's run_count."""
        ctx = await initialize_orchestration(
            store, "task", initial_state_type, StateType.RUNNING, flow_run_count=flow_run_count
        )
        flow_run = await ctx.flow_run()
        assert flow_run is not None
        assert flow_run.run_count == flow_run_count
        ctx.run.flow_run_run_count = 1

        await apply_rules(ctx, [UpdateFlowRunTrackerOnTasks], validate=False)

        assert ctx.run.flow_run_run_count == flow_run_count

    async def test_task_run_tracking_raises_informative_errors_on_missing_flow_runs(
        self, store: AdminStore
    ) -> None:
        """A deleted parent flow run raises ObjectNotFoundError and leaves the tracker alone."""
        ctx = await initialize_orchestration(
            store, "task", StateType.PENDING, StateType.RUNNING, flow_run_count=42
        )
        ctx.run.flow_run_run_count = 1
        assert ctx.run.flow_run_id is not None
        intended = (StateType.PENDING, StateType.RUNNING)

        with pytest.raises(ObjectNotFoundError, match="Unable to read flow run") as raised:
            async with UpdateFlowRunTrackerOnTasks(ctx, *intended):
                await _lose_flow_run(store, ctx)

        assert str(raised.value) == (
            f"Unable to read flow run associated with task run: {ctx.run.id}, "
            "this flow run might have been deleted"
        )
        assert ctx.run.flow_run_run_count == 1

    async def test_autonomous_task_runs_track_nothing(self, store: AdminStore) -> None:
        """A task without a flow run enters RUNNING without reading any flow run."""
        ctx = await initialize_orchestration(store, "task", StateType.PENDING, StateType.RUNNING)
        ctx.run.flow_run_id = None

        ctx = await apply_rules(ctx, [UpdateFlowRunTrackerOnTasks])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.run.flow_run_run_count == 0


class TestPermitRerunningFailedTaskRuns:
    async def _rerun_context(
        self, store: AdminStore, *, flow_run_count: int, tracked: int, **options: object
    ) -> TaskOrchestrationContext:
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.FAILED,
            StateType.RUNNING,
            flow_run_count=flow_run_count,
            **options,
        )
        flow_run = await ctx.flow_run()
        assert flow_run is not None
        assert flow_run.run_count == flow_run_count
        ctx.run.flow_run_run_count = tracked
        ctx.run.run_count = 2
        await store.save_run("task_run", ctx.run)
        return ctx

    async def test_bypasses_terminal_state_rule_if_flow_is_retrying(
        self, store: AdminStore
    ) -> None:
        """A failed task rerun by a newer flow attempt runs as "Retrying" with a fresh run_count."""
        ctx = await self._rerun_context(store, flow_run_count=4, tracked=2, flow_retries=10)

        ctx = await apply_rules(
            ctx, [HandleTaskTerminalStateTransitions, UpdateFlowRunTrackerOnTasks], validate=False
        )

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.run.run_count == 0
        assert ctx.proposed_state is not None
        assert ctx.proposed_state.name == "Retrying"
        assert ctx.run.flow_run_run_count == 4

    async def test_can_run_again_even_if_exceeding_flow_runs_count(self, store: AdminStore) -> None:
        """A failed task may run again within the same flow attempt, without a rename."""
        ctx = await self._rerun_context(
            store, flow_run_count=3, tracked=3, flow_retries=10, initial_state_data="test"
        )

        ctx = await apply_rules(
            ctx, [HandleTaskTerminalStateTransitions, UpdateFlowRunTrackerOnTasks], validate=False
        )

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.run.run_count == 0
        assert ctx.proposed_state is not None
        assert ctx.proposed_state.type == StateType.RUNNING
        assert ctx.proposed_state.name == "Running"
        assert ctx.run.flow_run_run_count == 3

    async def test_bypasses_terminal_state_rule_if_configured_automatic_retries_is_exceeded(
        self, store: AdminStore
    ) -> None:
        """A manual rerun works even once the flow's automatic retries are used up."""
        ctx = await self._rerun_context(store, flow_run_count=4, tracked=2, flow_retries=1)

        ctx = await apply_rules(
            ctx, [HandleTaskTerminalStateTransitions, UpdateFlowRunTrackerOnTasks], validate=False
        )

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.run.run_count == 0
        assert ctx.proposed_state is not None
        assert ctx.proposed_state.name == "Retrying"
        assert ctx.run.flow_run_run_count == 4

    @pytest.mark.parametrize(
        "fizzle_into", other_types(StateType.FAILED, StateType.RUNNING), ids=type_id
    )
    async def test_cleans_up_after_invalid_transition(
        self, store: AdminStore, fizzle_into: StateType
    ) -> None:
        """When a later rule changes the transition, run_count and the tracker are left alone."""
        ctx = await self._rerun_context(store, flow_run_count=4, tracked=2, flow_retries=10)

        ctx = await apply_rules(
            ctx,
            [
                HandleTaskTerminalStateTransitions,
                UpdateFlowRunTrackerOnTasks,
                rejecting_rule(fizzle_into),
            ],
            validate=False,
        )

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.run.run_count == 2
        assert ctx.proposed_state is not None
        assert ctx.proposed_state.name == "Retrying"
        assert ctx.run.flow_run_run_count == 2


class TestTaskRetryingRule:
    async def _failing_context(
        self,
        store: AdminStore,
        *,
        run_count: int,
        retries: int | None,
        retry_delay: int | list[int] | None = None,
        jitter: float | None = None,
    ) -> TaskOrchestrationContext:
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.RUNNING,
            StateType.FAILED,
            orchestrator=frozen_orchestrator(),
        )
        ctx.run.run_count = run_count
        ctx.run_settings.retries = retries
        ctx.run_settings.retry_delay = retry_delay
        ctx.run_settings.retry_jitter_factor = jitter
        return ctx

    @staticmethod
    def _delay_s(ctx: TaskOrchestrationContext) -> float:
        assert ctx.validated_state is not None
        scheduled_time = ctx.validated_state.state_details.scheduled_time
        assert scheduled_time is not None
        return (scheduled_time - NOW).total_seconds()

    async def test_retry_potential_failures(self, store: AdminStore) -> None:
        """A failure with retries left is rejected into a SCHEDULED "AwaitingRetry" state."""
        ctx = await self._failing_context(store, run_count=2, retries=2)

        ctx = await apply_rules(ctx, [RetryFailedTasks])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.response_details == StateRejectDetails(reason="Retrying")
        assert ctx.validated_state is not None
        assert ctx.validated_state.type == StateType.SCHEDULED
        assert ctx.validated_state.name == "AwaitingRetry"

    async def test_task_retry_uses_configured_delay(self, store: AdminStore) -> None:
        """The retry is scheduled retry_delay seconds from now."""
        ctx = await self._failing_context(store, run_count=2, retries=2, retry_delay=10)

        ctx = await apply_rules(ctx, [RetryFailedTasks])

        assert ctx.response_status == SetStateStatus.REJECT
        assert self._delay_s(ctx) == 10

    @pytest.mark.parametrize("retry", [1, 2, 3, 4, 5])
    async def test_retry_uses_configured_delays(self, store: AdminStore, retry: int) -> None:
        """A list of delays gives the delay of each attempt in turn."""
        configured_retry_delays = [2, 3, 5, 7, 11]
        ctx = await self._failing_context(
            store, run_count=retry, retries=5, retry_delay=configured_retry_delays
        )

        ctx = await apply_rules(ctx, [RetryFailedTasks])

        assert ctx.response_status == SetStateStatus.REJECT
        assert self._delay_s(ctx) == configured_retry_delays[retry - 1]

    async def test_retry_uses_falls_back_to_last_delay(self, store: AdminStore) -> None:
        """Attempts beyond the list of delays reuse the last delay."""
        ctx = await self._failing_context(store, run_count=6, retries=6, retry_delay=[2, 3, 5, 7])

        ctx = await apply_rules(ctx, [RetryFailedTasks])

        assert ctx.response_status == SetStateStatus.REJECT
        assert self._delay_s(ctx) == 7

    async def test_retries_can_jitter_sleeps(
        self, store: AdminStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With a jitter factor the delay comes from clamped_poisson_interval."""

        def randomizer(
            average_interval: float, clamping_factor: float = 0.3, rng: object = None
        ) -> float:
            return average_interval * (1 + clamping_factor)

        monkeypatch.setattr("rules.core.task_retries.clamped_poisson_interval", randomizer)
        ctx = await self._failing_context(store, run_count=2, retries=2, retry_delay=10, jitter=9)

        ctx = await apply_rules(ctx, [RetryFailedTasks])

        assert ctx.response_status == SetStateStatus.REJECT
        assert self._delay_s(ctx) == 100

    async def test_jitter_with_zero_delay_does_not_raise(self, store: AdminStore) -> None:
        """No configured delay with a jitter factor retries immediately."""
        ctx = await self._failing_context(store, run_count=1, retries=2, jitter=0.5)

        ctx = await apply_rules(ctx, [RetryFailedTasks])

        assert ctx.response_status == SetStateStatus.REJECT
        assert self._delay_s(ctx) == 0

    async def test_stops_retrying_eventually(self, store: AdminStore) -> None:
        """Once run_count exceeds retries the failure is accepted."""
        ctx = await self._failing_context(store, run_count=3, retries=2)

        ctx = await apply_rules(ctx, [RetryFailedTasks])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.validated_state_type == StateType.FAILED

    async def test_not_retriable_detail_set(self, store: AdminStore) -> None:
        """A failure marked retriable=False is final even with retries left."""
        ctx = await self._failing_context(store, run_count=1, retries=2)
        assert ctx.proposed_state is not None
        ctx.proposed_state.state_details.retriable = False

        ctx = await apply_rules(ctx, [RetryFailedTasks])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.validated_state_type == StateType.FAILED

    async def test_manual_retry_works_even_when_not_retriable(self, store: AdminStore) -> None:
        """A FAILED proposal named "AwaitingRetry" but not retriable is accepted as is."""
        ctx = await self._failing_context(store, run_count=1, retries=1)
        assert ctx.proposed_state is not None
        ctx.proposed_state.name = "AwaitingRetry"
        ctx.proposed_state.state_details.retriable = False

        ctx = await apply_rules(ctx, [RetryFailedTasks])

        assert ctx.response_status == SetStateStatus.ACCEPT

    async def test_no_retries_configured_accepts_the_failure(self, store: AdminStore) -> None:
        """retries=None means no retry at all."""
        ctx = await self._failing_context(store, run_count=1, retries=None)

        ctx = await apply_rules(ctx, [RetryFailedTasks])

        assert ctx.response_status == SetStateStatus.ACCEPT

    async def test_retry_state_carries_the_failure_message_and_data(
        self, store: AdminStore
    ) -> None:
        """AwaitingRetry keeps the failed state's message and data."""
        ctx = await self._failing_context(store, run_count=1, retries=1)
        assert ctx.proposed_state is not None
        ctx.proposed_state.message = "boom"
        ctx.proposed_state.data = {"type": "unpersisted"}

        ctx = await apply_rules(ctx, [RetryFailedTasks])

        assert ctx.validated_state is not None
        assert ctx.validated_state.message == "boom"
        assert ctx.validated_state.data == {"type": "unpersisted"}

    async def test_unpatched_jitter_stays_within_the_clamps(self, store: AdminStore) -> None:
        """A real jittered delay lies between the lower and upper clamps of the base delay."""
        ctx = await self._failing_context(store, run_count=1, retries=1, retry_delay=10, jitter=0.3)

        ctx = await apply_rules(ctx, [RetryFailedTasks])

        assert 10 * lower_clamp_multiple(1.3) <= self._delay_s(ctx) <= 13


class TestRenameRetryingStates:
    async def _rename(
        self, store: AdminStore, *, run_count: int, initial_name: str | None = None
    ) -> TaskOrchestrationContext:
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.SCHEDULED,
            StateType.RUNNING,
            initial_state_name=initial_name,
        )
        ctx.run.run_count = run_count
        ctx.run_settings.retries = 2
        ctx = await apply_rules(ctx, [RenameReruns])
        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.validated_state_type == StateType.RUNNING
        return ctx

    async def test_rerun_states_get_renamed(self, store: AdminStore) -> None:
        """A RUNNING proposal of a run that already ran is named "Rerunning"."""
        ctx = await self._rename(store, run_count=2)

        assert ctx.validated_state is not None
        assert ctx.validated_state.name == "Rerunning"

    async def test_retried_states_get_renamed(self, store: AdminStore) -> None:
        """A RUNNING proposal right after "AwaitingRetry" is named "Retrying"."""
        ctx = await self._rename(store, run_count=2, initial_name="AwaitingRetry")

        assert ctx.validated_state is not None
        assert ctx.validated_state.name == "Retrying"

    async def test_no_rename_on_first_run(self, store: AdminStore) -> None:
        """A first RUNNING keeps its name."""
        ctx = await self._rename(store, run_count=0)

        assert ctx.validated_state is not None
        assert ctx.validated_state.name == "Running"


class TestTransitionsFromTerminalStatesRuleForTasks:
    active_transitions = sorted(
        set(product(ALL_STATES, CANONICAL_STATES)) - set(product(TERMINAL_STATES, ALL_STATES)),
        key=str,
    )
    completed_to_non_final = [
        (StateType.COMPLETED, t)
        for t in (StateType.PENDING, StateType.RUNNING, StateType.SCHEDULED)
    ]

    @pytest.mark.parametrize(
        "intended_transition",
        [(t, StateType.CRASHED) for t in TERMINAL_STATES],
        ids=transition_id,
    )
    async def test_transitions_from_terminal_states_to_crashed_are_aborted(
        self, store: AdminStore, intended_transition: tuple[StateType, StateType]
    ) -> None:
        """A terminal task cannot crash afterwards."""
        ctx = await initialize_orchestration(store, "task", *intended_transition)

        ctx = await apply_rules(ctx, [HandleTaskTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ABORT

    @pytest.mark.parametrize(
        "intended_transition",
        [(t, StateType.CANCELLING) for t in TERMINAL_STATES],
        ids=transition_id,
    )
    async def test_transitions_from_terminal_states_to_cancelling_are_aborted(
        self, store: AdminStore, intended_transition: tuple[StateType, StateType]
    ) -> None:
        """A terminal task cannot be cancelled afterwards."""
        ctx = await initialize_orchestration(store, "task", *intended_transition)

        ctx = await apply_rules(ctx, [HandleTaskTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ABORT

    @pytest.mark.parametrize(
        "initial_data", [None, {"type": "unpersisted"}], ids=["no-data", "unpersisted"]
    )
    @pytest.mark.parametrize("intended_transition", completed_to_non_final, ids=transition_id)
    async def test_transitions_from_completed_to_non_final_states_allowed_without_persisted_result(
        self,
        store: AdminStore,
        intended_transition: tuple[StateType, StateType],
        initial_data: dict[str, str] | None,
    ) -> None:
        """A COMPLETED task without a persisted result may run again."""
        ctx = await initialize_orchestration(
            store, "task", *intended_transition, initial_state_data=initial_data
        )

        ctx = await apply_rules(ctx, [HandleTaskTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT

    @pytest.mark.parametrize("intended_transition", completed_to_non_final, ids=transition_id)
    async def test_transitions_from_completed_to_non_final_states_rejected_with_persisted_result(
        self, store: AdminStore, intended_transition: tuple[StateType, StateType]
    ) -> None:
        """A COMPLETED task with a persisted result stays COMPLETED."""
        ctx = await initialize_orchestration(
            store, "task", *intended_transition, initial_state_data=PERSISTED_RESULT
        )

        ctx = await apply_rules(ctx, [HandleTaskTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.REJECT, ctx.response_details

    @pytest.mark.parametrize("intended_transition", active_transitions, ids=transition_id)
    async def test_does_not_block_transitions_from_non_terminal_states(
        self,
        store: AdminStore,
        intended_transition: tuple[StateTypeOrNone, StateType],
    ) -> None:
        """The rule does not apply to runs that are not in a terminal state."""
        ctx = await initialize_orchestration(store, "task", *intended_transition)

        ctx = await apply_rules(ctx, [HandleTaskTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT


class TestHandleTaskTerminalStateTransitions:
    @pytest.mark.parametrize(
        ("intended_transition", "reason"),
        [
            pytest.param(
                (StateType.COMPLETED, StateType.CRASHED),
                "Run is already COMPLETED.",
                id="COMPLETED->CRASHED",
            ),
            pytest.param(
                (StateType.FAILED, StateType.PAUSED), "Run is already FAILED.", id="FAILED->PAUSED"
            ),
            pytest.param(
                (StateType.CANCELLED, StateType.CANCELLING),
                "Run is already CANCELLED.",
                id="CANCELLED->CANCELLING",
            ),
        ],
    )
    async def test_abort_reason_names_the_terminal_type(
        self,
        store: AdminStore,
        intended_transition: tuple[StateType, StateType],
        reason: str,
    ) -> None:
        """The abort reason carries the initial type's value."""
        ctx = await initialize_orchestration(store, "task", *intended_transition)

        ctx = await apply_rules(ctx, [HandleTaskTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ABORT
        assert ctx.response_details.model_dump()["reason"] == reason

    @pytest.mark.parametrize(
        "proposed_state_type",
        [StateType.COMPLETED, StateType.FAILED, StateType.RUNNING],
        ids=type_id,
    )
    async def test_persisted_completed_result_blocks_every_target(
        self, store: AdminStore, proposed_state_type: StateType
    ) -> None:
        """Unlike flows, a persisted COMPLETED task also refuses final targets (null reject)."""
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.COMPLETED,
            proposed_state_type,
            initial_state_data=PERSISTED_RESULT,
        )

        ctx = await apply_rules(ctx, [HandleTaskTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.response_details == StateRejectDetails(reason="This run is already completed.")
        assert ctx.validated_state_type == StateType.COMPLETED

    async def test_leaving_a_terminal_state_resets_run_count(self, store: AdminStore) -> None:
        """A terminal → non-final move gives the task its retry budget back."""
        ctx = await initialize_orchestration(store, "task", StateType.FAILED, StateType.SCHEDULED)
        ctx.run.run_count = 3

        ctx = await apply_rules(ctx, [HandleTaskTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.run.run_count == 0

    async def test_final_to_final_keeps_run_count(self, store: AdminStore) -> None:
        """A terminal → terminal move leaves run_count alone."""
        ctx = await initialize_orchestration(store, "task", StateType.FAILED, StateType.COMPLETED)
        ctx.run.run_count = 3

        ctx = await apply_rules(ctx, [HandleTaskTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.run.run_count == 3

    async def test_non_dict_completed_data_aborts_through_the_error_path(
        self, store: AdminStore
    ) -> None:
        """Scalar COMPLETED data fails the rule (Prefect's .get) and run_count is restored."""
        ctx = await initialize_orchestration(
            store, "task", StateType.COMPLETED, StateType.RUNNING, initial_state_data="hello"
        )
        ctx.run.run_count = 3

        ctx = await apply_rules(ctx, [HandleTaskTerminalStateTransitions])

        assert ctx.response_status == SetStateStatus.ABORT
        assert isinstance(ctx.orchestration_error, OrchestrationError)
        assert ctx.run.run_count == 3


class TestTaskConcurrencyLimits:
    concurrency_policy: list[RuleClass] = [
        SecureTaskConcurrencySlots,
        ReleaseTaskConcurrencySlots,
    ]
    running = (StateType.PENDING, StateType.RUNNING)
    completed = (StateType.RUNNING, StateType.COMPLETED)

    async def _start(
        self,
        store: AdminStore,
        tags: list[str],
        rules: Sequence[RuleClass] | None = None,
        transition: tuple[StateType, StateType] = (StateType.PENDING, StateType.RUNNING),
        run: TaskOrchestrationContext | None = None,
    ) -> TaskOrchestrationContext:
        # A reused run keeps its own tags; `tags` only describe a new run.
        options: dict[str, object] = (
            {"run_tags": tags} if run is None else {"run_override": run.run}
        )
        initial, proposed = transition
        ctx = await initialize_orchestration(store, "task", initial, proposed, **options)
        return await apply_rules(ctx, rules if rules is not None else self.concurrency_policy)

    async def test_basic_concurrency_limiting(self, store: AdminStore) -> None:
        """A full tag makes the next run WAIT until the holder completes."""
        await store.upsert_tag_limit("some tag", 1)

        task1 = await self._start(store, ["some tag"])
        assert task1.response_status == SetStateStatus.ACCEPT
        assert len(await slots(store, "some tag")) == 1

        task2 = await self._start(store, ["some tag"])
        assert task2.response_status == SetStateStatus.WAIT
        assert len(await slots(store, "some tag")) == 1

        task1_done = await self._start(store, [], transition=self.completed, run=task1)
        assert task1_done.response_status == SetStateStatus.ACCEPT
        assert len(await slots(store, "some tag")) == 0

        task2_retry = await self._start(store, [], run=task2)
        assert task2_retry.response_status == SetStateStatus.ACCEPT
        assert await slots(store, "some tag") == [str(task2.run.id)]

    async def test_concurrency_limit_cancelling_transition(self, store: AdminStore) -> None:
        """CANCELLING keeps the slot; CANCELLED gives it back."""
        await store.upsert_tag_limit("some tag", 1)

        task1 = await self._start(store, ["some tag"])
        assert task1.response_status == SetStateStatus.ACCEPT
        task2 = await self._start(store, ["some tag"])
        assert task2.response_status == SetStateStatus.WAIT

        cancelling = await self._start(
            store, [], transition=(StateType.RUNNING, StateType.CANCELLING), run=task1
        )
        assert cancelling.response_status == SetStateStatus.ACCEPT
        assert len(await slots(store, "some tag")) == 1

        cancelled = await self._start(
            store, [], transition=(StateType.CANCELLING, StateType.CANCELLED), run=task1
        )
        assert cancelled.response_status == SetStateStatus.ACCEPT
        assert len(await slots(store, "some tag")) == 0

        task2_retry = await self._start(store, [], run=task2)
        assert task2_retry.response_status == SetStateStatus.ACCEPT
        assert len(await slots(store, "some tag")) == 1

    async def test_concurrency_limiting_aborts_transitions_with_zero_limit(
        self, store: AdminStore
    ) -> None:
        """A limit of 0 ABORTs instead of making the client wait forever."""
        await store.upsert_tag_limit("the worst limit", 0)

        ctx = await self._start(store, ["the worst limit"])

        assert ctx.response_status == SetStateStatus.ABORT
        assert ctx.response_details.model_dump()["reason"] == (
            'The concurrency limit on tag "the worst limit" is 0 and will deadlock if the task '
            "tries to run again."
        )

    @pytest.mark.parametrize(
        "fizzle_into", other_types(StateType.PENDING, StateType.RUNNING), ids=type_id
    )
    async def test_returning_concurrency_slots_on_fizzle(
        self, store: AdminStore, fizzle_into: StateType
    ) -> None:
        """A slot claimed for a transition that a later rule changes is given back."""
        await store.upsert_tag_limit("a nice little limit", 1)

        ctx = await self._start(
            store,
            ["a nice little limit"],
            [SecureTaskConcurrencySlots, ReleaseTaskConcurrencySlots, rejecting_rule(fizzle_into)],
        )

        assert ctx.response_status == SetStateStatus.REJECT
        assert len(await slots(store, "a nice little limit")) == 0

    async def test_one_run_wont_consume_multiple_slots(self, store: AdminStore) -> None:
        """The same run entering RUNNING twice holds one slot."""
        await store.upsert_tag_limit("a generous limit", 10)

        ctx = await self._start(store, ["a generous limit"])
        assert ctx.response_status == SetStateStatus.ACCEPT
        assert len(await slots(store, "a generous limit")) == 1

        duplicate = await self._start(store, [], run=ctx)
        assert duplicate.response_status == SetStateStatus.ACCEPT
        assert len(await slots(store, "a generous limit")) == 1

    async def test_task_restart_does_not_consume_multiple_slots(self, store: AdminStore) -> None:
        """RUNNING → RUNNING does not take a second slot."""
        await store.upsert_tag_limit("a generous limit", 10)
        assert len(await slots(store, "a generous limit")) == 0

        ctx = await self._start(store, ["a generous limit"], [SecureTaskConcurrencySlots])
        assert ctx.response_status == SetStateStatus.ACCEPT
        assert len(await slots(store, "a generous limit")) == 1

        restart = await self._start(
            store,
            [],
            [SecureTaskConcurrencySlots],
            transition=(StateType.RUNNING, StateType.RUNNING),
            run=ctx,
        )
        assert restart.response_status == SetStateStatus.ACCEPT
        assert len(await slots(store, "a generous limit")) == 1

    async def test_concurrency_race_condition_new_tags_arent_double_counted(
        self, store: AdminStore
    ) -> None:
        """A limit created after a run started does not count that run, before or after it ends."""
        tags = ["primary tag", "secondary tag"]
        await store.upsert_tag_limit("primary tag", 2)

        task1 = await self._start(store, tags)
        assert task1.response_status == SetStateStatus.ACCEPT

        await store.upsert_tag_limit("secondary tag", 1)
        assert len(await slots(store, "primary tag")) == 1
        assert len(await slots(store, "secondary tag")) == 0

        task2 = await self._start(store, tags)
        assert task2.response_status == SetStateStatus.ACCEPT
        assert len(await slots(store, "primary tag")) == 2
        assert len(await slots(store, "secondary tag")) == 1

        task1_done = await self._start(store, [], transition=self.completed, run=task1)
        assert task1_done.response_status == SetStateStatus.ACCEPT
        assert len(await slots(store, "primary tag")) == 1
        assert len(await slots(store, "secondary tag")) == 1

        task2_done = await self._start(store, [], transition=self.completed, run=task2)
        assert task2_done.response_status == SetStateStatus.ACCEPT
        assert len(await slots(store, "primary tag")) == 0
        assert len(await slots(store, "secondary tag")) == 0

    async def test_concurrency_race_condition_deleted_tags_dont_impact_execution(
        self, store: AdminStore
    ) -> None:
        """Deleting the limit that blocked a run lets the next run start."""
        tags = ["big limit", "small limit"]
        await store.upsert_tag_limit("big limit", 2)
        await store.upsert_tag_limit("small limit", 1)

        task1 = await self._start(store, tags)
        assert task1.response_status == SetStateStatus.ACCEPT
        assert len(await slots(store, "small limit")) == 1

        task2 = await self._start(store, tags)
        assert task2.response_status == SetStateStatus.WAIT

        await store.delete_tag_limit("small limit")

        task3 = await self._start(store, tags)
        assert task3.response_status == SetStateStatus.ACCEPT

    async def test_concurrency_race_condition_limit_increases_dont_impact_execution(
        self, store: AdminStore
    ) -> None:
        """Raising a limit admits more runs while the existing holder keeps its slot."""
        await store.upsert_tag_limit("changing limit", 1)

        task1 = await self._start(store, ["changing limit"])
        assert task1.response_status == SetStateStatus.ACCEPT

        await store.upsert_tag_limit("changing limit", 2)

        task2 = await self._start(store, ["changing limit"])
        assert task2.response_status == SetStateStatus.ACCEPT
        assert len(await slots(store, "changing limit")) == 2

    async def test_concurrency_race_condition_limit_decreases_impact_new_runs(
        self, store: AdminStore
    ) -> None:
        """Lowering a limit to its current usage makes new runs WAIT."""
        await store.upsert_tag_limit("shrinking limit", 2)

        task1 = await self._start(store, ["shrinking limit"])
        assert task1.response_status == SetStateStatus.ACCEPT

        await store.upsert_tag_limit("shrinking limit", 1)

        task2 = await self._start(store, ["shrinking limit"])
        assert task2.response_status == SetStateStatus.WAIT
        assert len(await slots(store, "shrinking limit")) == 1

    async def test_concurrency_race_condition_limit_decreases_dont_impact_existing_runs(
        self, store: AdminStore
    ) -> None:
        """A holder completes and releases normally after its limit was lowered to 0."""
        await store.upsert_tag_limit("shrinking limit", 2)

        task1 = await self._start(store, ["shrinking limit"])
        assert task1.response_status == SetStateStatus.ACCEPT

        await store.upsert_tag_limit("shrinking limit", 0)
        assert len(await slots(store, "shrinking limit")) == 1

        task1_done = await self._start(store, [], transition=self.completed, run=task1)
        assert task1_done.response_status == SetStateStatus.ACCEPT
        assert len(await slots(store, "shrinking limit")) == 0

    @pytest.mark.parametrize(
        "fizzle_into",
        other_types(StateType.RUNNING, StateType.PENDING, StateType.CANCELLING),
        ids=type_id,
    )
    async def test_returning_concurrency_slots_when_transitioning_out_of_running_even_on_fizzle(
        self, store: AdminStore, fizzle_into: StateType
    ) -> None:
        """With Release first, a rejected move out of RUNNING still gives the slot back."""
        await store.upsert_tag_limit("small", 1)
        task1 = await self._start(store, ["small"])
        assert task1.response_status == SetStateStatus.ACCEPT
        assert len(await slots(store, "small")) == 1

        pending = await self._start(
            store,
            [],
            [ReleaseTaskConcurrencySlots, SecureTaskConcurrencySlots, rejecting_rule(fizzle_into)],
            transition=(StateType.RUNNING, StateType.PENDING),
            run=task1,
        )

        assert pending.response_status == SetStateStatus.REJECT
        assert pending.validated_state_type != StateType.RUNNING
        assert len(await slots(store, "small")) == 0

    @pytest.mark.parametrize(
        "fizzle_into",
        other_types(StateType.RUNNING, StateType.PENDING, StateType.CANCELLING),
        ids=type_id,
    )
    # Prefect's test name, kept for the parity table, is longer than the line limit.
    async def test_returning_concurrency_slots_when_transitioning_out_of_running_even_on_invalidation(  # noqa: E501
        self, store: AdminStore, fizzle_into: StateType
    ) -> None:
        """With Release last, a rejected move out of RUNNING still gives the slot back."""
        await store.upsert_tag_limit("small", 1)
        task1 = await self._start(store, ["small"])
        assert task1.response_status == SetStateStatus.ACCEPT
        assert len(await slots(store, "small")) == 1

        pending = await self._start(
            store,
            [],
            [rejecting_rule(fizzle_into), SecureTaskConcurrencySlots, ReleaseTaskConcurrencySlots],
            transition=(StateType.RUNNING, StateType.PENDING),
            run=task1,
        )

        assert pending.response_status == SetStateStatus.REJECT
        assert pending.validated_state_type != StateType.RUNNING
        assert len(await slots(store, "small")) == 0

    async def test_releasing_concurrency_slots_does_not_happen_if_nullified_with_release_first(
        self, store: AdminStore
    ) -> None:
        """An aborted move out of RUNNING keeps the slot (Release entered first)."""
        await store.upsert_tag_limit("small", 1)
        task1 = await self._start(store, ["small"])
        assert len(await slots(store, "small")) == 1

        pending = await self._start(
            store,
            [],
            [ReleaseTaskConcurrencySlots, SecureTaskConcurrencySlots, AbortingRule],
            transition=(StateType.RUNNING, StateType.PENDING),
            run=task1,
        )

        assert pending.response_status == SetStateStatus.ABORT
        assert len(await slots(store, "small")) == 1

    async def test_releasing_concurrency_slots_does_not_happen_if_nullified_with_release_last(
        self, store: AdminStore
    ) -> None:
        """An aborted move out of RUNNING keeps the slot (Release entered last)."""
        await store.upsert_tag_limit("small", 1)
        task1 = await self._start(store, ["small"])
        assert len(await slots(store, "small")) == 1

        pending = await self._start(
            store,
            [],
            [AbortingRule, SecureTaskConcurrencySlots, ReleaseTaskConcurrencySlots],
            transition=(StateType.RUNNING, StateType.PENDING),
            run=task1,
        )

        assert pending.response_status == SetStateStatus.ABORT
        assert len(await slots(store, "small")) == 1


class TestSecureTaskConcurrencySlots:
    """Our deviation from Prefect (§6 note 8): a blocked proposal never holds a slot."""

    async def _propose_running(
        self,
        store: AdminStore,
        tags: list[str],
        transition: tuple[StateType, StateType] = (StateType.PENDING, StateType.RUNNING),
        **options: object,
    ) -> TaskOrchestrationContext:
        initial, proposed = transition
        ctx = await initialize_orchestration(
            store, "task", initial, proposed, run_tags=tags, **options
        )
        return await apply_rules(ctx, [SecureTaskConcurrencySlots, ReleaseTaskConcurrencySlots])

    async def _fill(self, store: AdminStore, tag: str, limit: int) -> None:
        await store.upsert_tag_limit(tag, limit)
        await hold_slots(store, tag, [str(uuid.uuid4()) for _ in range(limit)])
        assert len(await slots(store, tag)) == limit

    async def test_wait_on_a_later_tag_frees_the_slot_claimed_on_an_earlier_tag(
        self, store: AdminStore
    ) -> None:
        """A WAIT on the second tag leaves the first tag's slot free."""
        await store.upsert_tag_limit("a", 5)
        await self._fill(store, "b", 1)

        ctx = await self._propose_running(store, ["a", "b"])

        assert ctx.response_status == SetStateStatus.WAIT
        assert await slots(store, "a") == []

    async def test_abort_on_a_later_tag_frees_the_slot_claimed_on_an_earlier_tag(
        self, store: AdminStore
    ) -> None:
        """An ABORT on the second tag leaves the first tag's slot free."""
        await store.upsert_tag_limit("a", 5)
        await store.upsert_tag_limit("b", 0)

        ctx = await self._propose_running(store, ["a", "b"])

        assert ctx.response_status == SetStateStatus.ABORT
        assert await slots(store, "a") == []

    @pytest.mark.parametrize("blocking_limit", [0, 1], ids=["abort", "wait"])
    async def test_blocked_proposal_does_not_claim_later_tags(
        self, store: AdminStore, blocking_limit: int
    ) -> None:
        """Tags after the blocking one are not processed, so their slots stay free."""
        await self._fill(store, "a", blocking_limit)
        await store.upsert_tag_limit("b", 5)

        ctx = await self._propose_running(store, ["a", "b"])

        assert ctx.response_status in (SetStateStatus.ABORT, SetStateStatus.WAIT)
        assert await slots(store, "b") == []

    async def test_first_blocking_tag_decides_the_outcome(self, store: AdminStore) -> None:
        """A zero limit on the first tag ABORTs even though a later tag is full."""
        await store.upsert_tag_limit("a", 0)
        await self._fill(store, "b", 1)

        ctx = await self._propose_running(store, ["a", "b"])

        assert ctx.response_status == SetStateStatus.ABORT

    async def test_wait_uses_the_configured_delay_and_names_the_tag(
        self, store: AdminStore
    ) -> None:
        """A full tag WAITs settings.tag_concurrency_slot_wait_s seconds."""
        await self._fill(store, "busy", 1)
        orchestrator = Orchestrator(settings=RuleSettings(tag_concurrency_slot_wait_s=7))

        ctx = await self._propose_running(store, ["busy"], orchestrator=orchestrator)

        assert ctx.response_status == SetStateStatus.WAIT
        assert ctx.response_details == StateWaitDetails(
            delay_seconds=7, reason="Concurrency limit for the busy tag has been reached"
        )

    async def test_default_wait_is_ten_seconds(self, store: AdminStore) -> None:
        """Prefect's default tag wait is 10 s."""
        await self._fill(store, "busy", 1)

        ctx = await self._propose_running(store, ["busy"])

        assert isinstance(ctx.response_details, StateWaitDetails)
        assert ctx.response_details.delay_seconds == 10

    async def test_blocked_restart_keeps_the_slots_it_already_held(self, store: AdminStore) -> None:
        """A RUNNING → RUNNING restart that is blocked keeps slots held before this call."""
        await store.upsert_tag_limit("a", 5)
        await store.upsert_tag_limit("b", 1)
        task1 = await self._propose_running(store, ["a", "b"])
        assert task1.response_status == SetStateStatus.ACCEPT

        # As in Prefect, a full limit blocks even the run that holds its slot.
        restart = await self._propose_running(
            store,
            ["a", "b"],
            transition=(StateType.RUNNING, StateType.RUNNING),
            run_override=task1.run,
        )

        assert restart.response_status == SetStateStatus.WAIT
        assert await slots(store, "a") == [str(task1.run.id)]
        assert await slots(store, "b") == [str(task1.run.id)]

    async def test_untagged_runs_are_not_limited(self, store: AdminStore) -> None:
        """A run without tags enters RUNNING whatever limits exist."""
        await store.upsert_tag_limit("a", 0)

        ctx = await self._propose_running(store, [])

        assert ctx.response_status == SetStateStatus.ACCEPT


class TestReleaseTaskConcurrencySlots:
    async def test_retry_releases_the_slot(self, store: AdminStore) -> None:
        """A failure turned into AwaitingRetry releases the slot: the written state is SCHEDULED."""
        await store.upsert_tag_limit("small", 1)
        running = await initialize_orchestration(
            store, "task", StateType.PENDING, StateType.RUNNING, run_tags=["small"]
        )
        running = await apply_rules(
            running, [SecureTaskConcurrencySlots, ReleaseTaskConcurrencySlots]
        )
        assert await slots(store, "small") == [str(running.run.id)]

        failing = await initialize_orchestration(
            store, "task", StateType.RUNNING, StateType.FAILED, run_override=running.run
        )
        failing.run_settings.retries = 1
        failing = await apply_rules(failing, [RetryFailedTasks, ReleaseTaskConcurrencySlots])

        assert failing.response_status == SetStateStatus.REJECT
        assert failing.validated_state is not None
        assert failing.validated_state.name == "AwaitingRetry"
        assert await slots(store, "small") == []

    async def test_nullified_transitions_release_nothing(self, store: AdminStore) -> None:
        """An aborted transition releases nothing even when the current state is not RUNNING."""
        await store.upsert_tag_limit("small", 1)
        ctx = await initialize_orchestration(
            store, "task", StateType.PENDING, StateType.RUNNING, run_tags=["small"]
        )
        await hold_slots(store, "small", [str(ctx.run.id)])

        ctx = await apply_rules(ctx, [AbortingRule, ReleaseTaskConcurrencySlots])

        assert ctx.response_status == SetStateStatus.ABORT
        assert ctx.validated_state_type == StateType.PENDING
        assert await slots(store, "small") == [str(ctx.run.id)]


class TestPreventRunningTasksFromStoppedFlows:
    async def test_allows_task_runs_to_run(self, store: AdminStore) -> None:
        """A task of a RUNNING flow may run."""
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.PENDING,
            StateType.RUNNING,
            initial_flow_run_state_type=StateType.RUNNING,
        )

        ctx = await apply_rules(ctx, [PreventRunningTasksFromStoppedFlows])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.validated_state_type == StateType.RUNNING

    @pytest.mark.parametrize(
        "initial_flow_run_state_type", other_types(StateType.RUNNING), ids=type_id
    )
    async def test_prevents_tasks_From_running(
        self, store: AdminStore, initial_flow_run_state_type: StateType
    ) -> None:
        """A paused flow parks its tasks in PAUSED; any other non-running flow aborts them."""
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.PENDING,
            StateType.RUNNING,
            initial_flow_run_state_type=initial_flow_run_state_type,
        )

        ctx = await apply_rules(ctx, [PreventRunningTasksFromStoppedFlows])

        if initial_flow_run_state_type == StateType.PAUSED:
            assert ctx.response_status == SetStateStatus.REJECT
            assert ctx.validated_state_type == StateType.PAUSED
        else:
            assert ctx.response_status == SetStateStatus.ABORT
            assert ctx.response_details.model_dump()["reason"] == (
                "The enclosing flow must be running to begin task execution."
            )
            assert ctx.validated_state_type == StateType.PENDING

    async def test_does_not_reuse_state_pk_from_paused_flow_run(self, store: AdminStore) -> None:
        """The task gets a new "NotReady" state with the flow's pause timeout and reschedule."""
        pause_timeout = utcnow() + dt.timedelta(minutes=10)
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.PENDING,
            StateType.RUNNING,
            initial_flow_run_state_type=StateType.PAUSED,
            initial_flow_run_state_details={
                "pause_timeout": pause_timeout,
                "pause_reschedule": True,
            },
        )
        flow_run = await ctx.flow_run()
        assert flow_run is not None
        assert flow_run.state is not None

        ctx = await apply_rules(ctx, [PreventRunningTasksFromStoppedFlows])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.response_details == StateRejectDetails(
            reason="The flow is paused, new tasks can execute after resuming flow run: "
            f"{flow_run.id}."
        )
        paused = ctx.validated_state
        assert paused is not None
        assert paused.id != flow_run.state.id
        assert (paused.type, paused.name) == (StateType.PAUSED, "NotReady")
        assert paused.state_details.pause_timeout == pause_timeout
        assert paused.state_details.pause_reschedule is True

    async def test_aborts_when_the_flow_run_has_no_state(self, store: AdminStore) -> None:
        """A flow run that has no state yet is not running."""
        ctx = await initialize_orchestration(store, "task", StateType.PENDING, StateType.RUNNING)

        ctx = await apply_rules(ctx, [PreventRunningTasksFromStoppedFlows])

        assert ctx.response_status == SetStateStatus.ABORT

    async def test_allows_autonomous_task_runs(self, store: AdminStore) -> None:
        """A task without a flow run is not restricted."""
        ctx = await initialize_orchestration(store, "task", StateType.PENDING, StateType.RUNNING)
        ctx.run.flow_run_id = None

        ctx = await apply_rules(ctx, [PreventRunningTasksFromStoppedFlows])

        assert ctx.response_status == SetStateStatus.ACCEPT

    async def test_allows_tasks_whose_flow_run_cannot_be_read(self, store: AdminStore) -> None:
        """A task whose flow run has disappeared is not restricted by this rule."""
        ctx = await initialize_orchestration(store, "task", StateType.PENDING, StateType.RUNNING)
        await _lose_flow_run(store, ctx)

        ctx = await apply_rules(ctx, [PreventRunningTasksFromStoppedFlows])

        assert ctx.response_status == SetStateStatus.ACCEPT


class TestEnqueueScheduledTasks:
    async def _schedule(
        self,
        store: AdminStore,
        *,
        deferred: bool,
        name: str | None = None,
        extra_rules: Sequence[RuleClass] = (),
    ) -> TaskOrchestrationContext:
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.PENDING,
            StateType.SCHEDULED,
            proposed_details={"deferred": deferred},
            proposed_state_name=name,
        )
        return await apply_rules(ctx, [EnqueueScheduledTasks, *extra_rules])

    async def test_deferred_scheduled_state_is_enqueued(self, store: AdminStore) -> None:
        """A written deferred SCHEDULED state puts one task_run message in the outbox."""
        ctx = await self._schedule(store, deferred=True)

        assert ctx.validated_state is not None
        assert ctx.outbox == [
            OutboxMessage(
                channel="task_run",
                routing_key="a-task",
                body={
                    "task_run_id": str(ctx.run.id),
                    "task_key": "a-task",
                    "state": ctx.validated_state.model_dump(mode="json"),
                    "retry": False,
                },
                message_id=str(ctx.validated_state.id),
            )
        ]
        json.dumps(ctx.outbox[0].body)

    async def test_awaiting_retry_is_flagged_as_a_retry(self, store: AdminStore) -> None:
        """A deferred "AwaitingRetry" state is enqueued with retry set."""
        ctx = await self._schedule(store, deferred=True, name="AwaitingRetry")

        assert [message.body["retry"] for message in ctx.outbox] == [True]

    async def test_non_deferred_scheduled_state_is_not_enqueued(self, store: AdminStore) -> None:
        """An ordinary SCHEDULED state is left to its executor."""
        ctx = await self._schedule(store, deferred=False)

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.outbox == []

    async def test_nothing_is_enqueued_when_the_state_is_not_written(
        self, store: AdminStore
    ) -> None:
        """An aborted deferred SCHEDULED proposal enqueues nothing."""
        ctx = await self._schedule(store, deferred=True, extra_rules=[AbortingRule])

        assert ctx.response_status == SetStateStatus.ABORT
        assert ctx.outbox == []


class TestClampedPoissonInterval:
    async def test_draws_stay_within_the_clamps_and_average_out(self) -> None:
        """Seeded draws lie in [avg·L(1+c), avg·(1+c)] and their mean is close to avg."""
        rng = random.Random(7)
        draws = [clamped_poisson_interval(10, 0.3, rng) for _ in range(5000)]

        assert min(draws) >= 10 * lower_clamp_multiple(1.3)
        assert max(draws) <= 13
        assert sum(draws) / len(draws) == pytest.approx(10, rel=0.02)

    @pytest.mark.parametrize(
        ("pick", "expected"),
        [
            (lambda low, high: low, 10 * lower_clamp_multiple(1.3)),
            (lambda low, high: high, 13.0),
        ],
        ids=["lowest-draw", "highest-draw"],
    )
    async def test_extreme_draws_map_to_the_clamps(
        self, pick: Callable[[float, float], float], expected: float
    ) -> None:
        """The injected source's extremes give exactly the lower and upper clamps."""

        class Extreme:
            def uniform(self, a: float, b: float) -> float:
                return pick(a, b)

        assert clamped_poisson_interval(10, 0.3, Extreme()) == pytest.approx(expected)

    @pytest.mark.parametrize("clamping_factor", [0, -0.5])
    async def test_non_positive_clamping_factor_raises(self, clamping_factor: float) -> None:
        """The clamping factor must be positive."""
        with pytest.raises(ValueError, match="clamping_factor"):
            clamped_poisson_interval(10, clamping_factor)

    async def test_zero_average_gives_zero(self) -> None:
        """No delay stays no delay."""
        assert clamped_poisson_interval(0, 0.3) == 0

    async def test_lower_clamp_vanishes_for_huge_factors(self) -> None:
        """From an upper multiple of 50 on, the lower clamp is 0."""
        assert lower_clamp_multiple(50) == 0
        assert lower_clamp_multiple(1) == pytest.approx(1.0)
