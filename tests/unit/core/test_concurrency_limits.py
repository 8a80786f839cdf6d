"""Task tag concurrency limits (``rules/core/concurrency.py``) as Prefect specifies them: a full
tag makes the next run WAIT, a zero limit ABORTs, one run holds one slot, limits changed or
deleted while runs hold slots, and slots given back on leaving RUNNING even when a later rule
changes the transition.

Ported from Prefect's ``tests/server/orchestration/test_core_policy.py`` (reference §5.2,
tests 59-73), keeping Prefect's class and test names so ``docs/parity.md`` can map them.
Arbiter's own secure/release scenarios are in ``test_concurrency_slots.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from arbiter.rules.context import TaskOrchestrationContext
from arbiter.rules.core.concurrency import ReleaseTaskConcurrencySlots, SecureTaskConcurrencySlots
from arbiter.rules.policy import RuleClass
from arbiter.rules.results import SetStateStatus
from arbiter.rules.store import AdminStore
from arbiter.schemas.states import StateType
from tests.factories import initialize_orchestration
from tests.unit.core.helpers import (
    AbortingRule,
    apply_rules,
    other_types,
    rejecting_rule,
    slots,
    type_id,
)


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
