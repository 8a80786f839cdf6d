"""Global (V2) ``tag:<tag>`` limits in ``SecureTaskConcurrencySlots``
(``rules/core/concurrency.py``): a task run entering RUNNING takes a slot of each active V2
limit of its tags, leased to the run; its other tags are left to their V1 tag limits, an
inactive V2 limit to V1 as well; a zero limit ABORTs; a full limit makes the task WAIT,
counts a denied slot and takes nothing from the other limits; a V2 slot taken in a
transition that is turned away (a full V1 tag, a later rule) is given back.

Prefect's scenarios (reference §5.6, its ``test_task_concurrency_v2_integration.py``),
which ``docs/parity.md`` maps onto these tests. Deviations kept on purpose (see
``rules/core/concurrency.py``): the V2 slot is taken in the orchestration transaction, so
Prefect's scenario 7 (a storage flake in the separate V2 session propagates) has no
counterpart; a V1 tag also governed by an active V2 limit is left to the V2 limit.
"""

from __future__ import annotations

import datetime as dt

from arbiter.rules.core.concurrency import SecureTaskConcurrencySlots
from arbiter.rules.results import SetStateStatus, StateAbortDetails, StateWaitDetails
from arbiter.rules.store import AdminStore, Lease
from arbiter.schemas.states import StateType
from tests.factories import initialize_orchestration
from tests.unit.core.global_limit_helpers import RULES, active, finish, limit_named, run_to
from tests.unit.core.helpers import NOW, apply_rules, frozen_orchestrator, rejecting_rule, slots


class TestSecureTaskConcurrencySlotsV2:
    async def test_v2_limits_take_priority_over_v1(self, store: AdminStore) -> None:
        await store.upsert_tag_limit("shared-tag", 2)
        await store.upsert_global_limit("tag:shared-tag", 1)

        first = await run_to(store, ["shared-tag"])
        second = await run_to(store, ["shared-tag"])

        assert first.response_status == SetStateStatus.ACCEPT
        assert second.response_status == SetStateStatus.WAIT
        assert await active(store, "tag:shared-tag") == 1

    async def test_a_zero_v2_limit_aborts(self, store: AdminStore) -> None:
        await store.upsert_global_limit("tag:zero", 0)

        ctx = await run_to(store, ["zero"])

        assert ctx.response_status == SetStateStatus.ABORT
        assert isinstance(ctx.response_details, StateAbortDetails)
        assert "is 0 and will deadlock" in (ctx.response_details.reason or "")
        assert await active(store, "tag:zero") == 0

    async def test_the_lease_names_the_task_run_as_holder(self, store: AdminStore) -> None:
        await store.upsert_global_limit("tag:leased", 2)

        ctx = await run_to(store, ["leased"])

        assert ctx.response_status == SetStateStatus.ACCEPT
        limit = await limit_named(store, "tag:leased")
        assert list(limit.holders) == [str(ctx.run.id)]
        lease = limit.holders[str(ctx.run.id)]
        assert lease.acquired == NOW
        assert lease.expires == NOW + dt.timedelta(seconds=ctx.settings.slot_lease_ttl_s)

    async def test_mixed_v1_and_v2_tags_on_one_task(self, store: AdminStore) -> None:
        await store.upsert_global_limit("tag:v2-tag", 1)
        await store.upsert_tag_limit("v1-tag", 1)

        ctx = await run_to(store, ["v2-tag", "v1-tag"])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert await active(store, "tag:v2-tag") == 1
        assert await slots(store, "v1-tag") == [str(ctx.run.id)]

    async def test_v1_limits_decide_tags_without_a_v2_limit(self, store: AdminStore) -> None:
        await store.upsert_global_limit("tag:v2-only", 5)
        await store.upsert_tag_limit("v1-only", 1)

        first = await run_to(store, ["v1-only"])
        second = await run_to(store, ["v1-only"])

        assert first.response_status == SetStateStatus.ACCEPT
        assert await slots(store, "v1-only") == [str(first.run.id)]
        assert second.response_status == SetStateStatus.WAIT

    async def test_inactive_v2_limits_are_ignored(self, store: AdminStore) -> None:
        await store.upsert_global_limit("tag:sleepy", 1, active=False)
        await store.upsert_tag_limit("sleepy", 2)

        ctx = await run_to(store, ["sleepy"])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert await active(store, "tag:sleepy") == 0
        assert await slots(store, "sleepy") == [str(ctx.run.id)]

    async def test_a_tag_with_an_active_v2_limit_is_not_counted_in_v1(
        self, store: AdminStore
    ) -> None:
        await store.upsert_global_limit("tag:both", 5)
        await store.upsert_tag_limit("both", 2)

        ctx = await run_to(store, ["both"])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert await active(store, "tag:both") == 1
        assert await slots(store, "both") == []

    async def test_several_v2_tags_each_take_a_slot(self, store: AdminStore) -> None:
        await store.upsert_global_limit("tag:two", 2)
        await store.upsert_global_limit("tag:three", 3)

        ctx = await run_to(store, ["two", "three"])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert await active(store, "tag:two") == 1
        assert await active(store, "tag:three") == 1

    async def test_a_full_limit_takes_nothing_from_the_others(self, store: AdminStore) -> None:
        """Prefect's atomicity scenario: limits 5 and 10, five tasks fill the first; the
        sixth WAITs with no partial increment; after the five complete both are empty and
        the sixth gets its slots."""
        await store.upsert_global_limit("tag:five", 5)
        await store.upsert_global_limit("tag:ten", 10)
        running = [await run_to(store, ["five", "ten"]) for _ in range(5)]
        assert {ctx.response_status for ctx in running} == {SetStateStatus.ACCEPT}
        assert (await active(store, "tag:five"), await active(store, "tag:ten")) == (5, 5)

        blocked = await run_to(store, ["five", "ten"])

        assert blocked.response_status == SetStateStatus.WAIT
        assert blocked.response_details == StateWaitDetails(
            delay_seconds=blocked.response_details.delay_seconds,  # type: ignore[union-attr]
            reason="Concurrency limit reached for tags: five, ten",
        )
        assert (await active(store, "tag:five"), await active(store, "tag:ten")) == (5, 5)
        assert (await limit_named(store, "tag:five")).denied_slots == 1
        for ctx in running:
            await finish(store, ctx)
        assert (await active(store, "tag:five"), await active(store, "tag:ten")) == (0, 0)
        again = await initialize_orchestration(
            store,
            "task",
            StateType.PENDING,
            StateType.RUNNING,
            run_override=blocked.run,
            orchestrator=frozen_orchestrator(),
        )
        assert (await apply_rules(again, RULES)).response_status == SetStateStatus.ACCEPT
        assert (await active(store, "tag:five"), await active(store, "tag:ten")) == (1, 1)

    async def test_a_full_v1_tag_gives_back_the_v2_slot_taken_in_the_same_call(
        self, store: AdminStore
    ) -> None:
        await store.upsert_global_limit("tag:roomy", 5)
        await store.upsert_tag_limit("full", 0)

        ctx = await run_to(store, ["roomy", "full"])

        assert ctx.response_status == SetStateStatus.ABORT
        assert await active(store, "tag:roomy") == 0

    async def test_a_later_rule_that_rejects_gives_the_v2_slot_back(
        self, store: AdminStore
    ) -> None:
        await store.upsert_global_limit("tag:fizzle", 1)
        ctx = await initialize_orchestration(
            store, "task", StateType.PENDING, StateType.RUNNING, run_tags=["fizzle"]
        )

        ctx = await apply_rules(
            ctx, [SecureTaskConcurrencySlots, rejecting_rule(StateType.PENDING)]
        )

        assert ctx.response_status == SetStateStatus.REJECT
        assert await active(store, "tag:fizzle") == 0

    async def test_a_limit_already_full_makes_the_task_wait(self, store: AdminStore) -> None:
        await store.upsert_global_limit("tag:prefilled", 1)
        [limit] = await store.lock_global_limits(["tag:prefilled"])
        limit.holders["someone"] = Lease(NOW, NOW + dt.timedelta(hours=1))
        await store.save_global_limit(limit)

        ctx = await run_to(store, ["prefilled"])

        assert ctx.response_status == SetStateStatus.WAIT
        assert await active(store, "tag:prefilled") == 1
