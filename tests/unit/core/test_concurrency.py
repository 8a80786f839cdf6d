"""Task tag concurrency (``rules/core/concurrency.py``): slots are claimed on entering
RUNNING and given back on leaving it.

Ported from Prefect's ``tests/server/orchestration/test_core_policy.py``
(reference §5.2, tests 59-73): Prefect's class and test names are kept so
``docs/parity.md`` can map them; classes named after a rule hold the extra scenarios.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import pytest

from rules.context import RuleSettings, TaskOrchestrationContext
from rules.core.concurrency import ReleaseTaskConcurrencySlots, SecureTaskConcurrencySlots
from rules.core.task_retries import RetryFailedTasks
from rules.engine import Orchestrator
from rules.policy import RuleClass
from rules.results import SetStateStatus, StateWaitDetails
from rules.store import AdminStore
from schemas.states import StateType
from tests.factories import initialize_orchestration
from tests.unit.core.helpers import (
    AbortingRule,
    apply_rules,
    hold_slots,
    other_types,
    rejecting_rule,
    type_id,
)


async def slots(store: AdminStore, tag: str) -> list[str]:
    """The run ids holding a slot of ``tag``'s limit, through the store's public API."""
    for limit in await store.list_tag_limits():
        if limit.tag == tag:
            return limit.active_slots
    raise KeyError(tag)


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
