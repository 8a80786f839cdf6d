"""Global (V2) ``tag:<tag>`` limits in SecureTaskConcurrencySlots and
ReleaseTaskConcurrencySlots: Prefect's scenarios (reference §5.6, its
``test_task_concurrency_v2_integration.py``), then the leases that Arbiter adds: an
expired lease is reclaimed by the next claimer, a holder's transitions renew it.

Deviations kept on purpose (see ``rules/core/concurrency.py``): the V2 slot is taken in
the orchestration transaction, so Prefect's scenarios 7 and 11 (a storage flake in the
separate V2 session propagates) have no counterpart; a V1 tag also governed by an active
V2 limit is left to the V2 limit.
"""

from __future__ import annotations

import datetime as dt
import uuid

from arbiter.rules.context import TaskOrchestrationContext
from arbiter.rules.core.concurrency import ReleaseTaskConcurrencySlots, SecureTaskConcurrencySlots
from arbiter.rules.core.deployments import SecureFlowConcurrencySlots
from arbiter.rules.core.leases import renew_run_slots
from arbiter.rules.policy import RuleClass
from arbiter.rules.results import SetStateStatus, StateAbortDetails, StateWaitDetails
from arbiter.rules.store import AdminStore, Deployment, GlobalLimit, Lease, deployment_limit_name
from arbiter.schemas.states import StateType
from tests.factories import initialize_orchestration
from tests.unit.core.helpers import NOW, apply_rules, frozen_orchestrator, rejecting_rule, slots

RULES: list[RuleClass] = [SecureTaskConcurrencySlots, ReleaseTaskConcurrencySlots]


async def run_to(
    store: AdminStore,
    tags: list[str],
    proposed: StateType = StateType.RUNNING,
    initial: StateType = StateType.PENDING,
    now: dt.datetime = NOW,
    **options: object,
) -> TaskOrchestrationContext:
    ctx = await initialize_orchestration(
        store,
        "task",
        initial,
        proposed,
        run_tags=tags,
        orchestrator=frozen_orchestrator(now),
        **options,
    )
    return await apply_rules(ctx, RULES)


async def finish(
    store: AdminStore, ctx: TaskOrchestrationContext, now: dt.datetime = NOW
) -> TaskOrchestrationContext:
    """The same run, RUNNING → COMPLETED."""
    done = await initialize_orchestration(
        store,
        "task",
        StateType.RUNNING,
        StateType.COMPLETED,
        run_override=ctx.run,
        orchestrator=frozen_orchestrator(now),
    )
    return await apply_rules(done, RULES)


async def limit_named(store: AdminStore, name: str) -> GlobalLimit:
    [found] = [limit for limit in await store.list_global_limits() if limit.name == name]
    return found


async def active(store: AdminStore, name: str) -> int:
    return (await limit_named(store, name)).active_slots


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


class TestReleaseTaskConcurrencySlotsV2:
    async def test_a_full_cycle_frees_v2_and_v1(self, store: AdminStore) -> None:
        await store.upsert_global_limit("tag:cycle-v2", 1)
        await store.upsert_tag_limit("cycle-v1", 1)
        ctx = await run_to(store, ["cycle-v2", "cycle-v1"])

        await finish(store, ctx)

        assert await active(store, "tag:cycle-v2") == 0
        assert await slots(store, "cycle-v1") == []

    async def test_a_release_without_a_lease_changes_nothing(self, store: AdminStore) -> None:
        await store.upsert_global_limit("tag:nobody", 2)

        ctx = await run_to(
            store, ["nobody"], proposed=StateType.COMPLETED, initial=StateType.RUNNING
        )

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert await active(store, "tag:nobody") == 0

    async def test_cancelling_keeps_the_slot(self, store: AdminStore) -> None:
        await store.upsert_global_limit("tag:keep", 1)
        ctx = await run_to(store, ["keep"])
        cancelling = await initialize_orchestration(
            store,
            "task",
            StateType.RUNNING,
            StateType.CANCELLING,
            run_override=ctx.run,
            orchestrator=frozen_orchestrator(),
        )

        await apply_rules(cancelling, RULES)

        assert await active(store, "tag:keep") == 1

    async def test_a_release_moves_the_average_occupancy(self, store: AdminStore) -> None:
        await store.upsert_global_limit("tag:avg", 1)
        ctx = await run_to(store, ["avg"])

        await finish(store, ctx, now=NOW + dt.timedelta(seconds=12))

        # Prefect's step: 1 / (2 * limit) of the way from 2.0 toward 12 s.
        assert (await limit_named(store, "tag:avg")).avg_slot_occupancy_seconds == 7.0


class TestLeases:
    async def test_an_expired_lease_is_reclaimed_by_the_next_claimer(
        self, store: AdminStore
    ) -> None:
        """The holder vanished (it never proposes again): once its lease has expired, the
        next run takes the slot, and the vanished run's lease is gone."""
        await store.upsert_global_limit("tag:lease", 1)
        vanished = await run_to(store, ["lease"])
        ttl = dt.timedelta(seconds=vanished.settings.slot_lease_ttl_s)

        before = await run_to(store, ["lease"], now=NOW + ttl - dt.timedelta(seconds=1))
        after = await run_to(store, ["lease"], now=NOW + ttl)

        assert before.response_status == SetStateStatus.WAIT
        assert after.response_status == SetStateStatus.ACCEPT
        assert list((await limit_named(store, "tag:lease")).holders) == [str(after.run.id)]

    async def test_a_holders_transition_renews_its_lease(self, store: AdminStore) -> None:
        await store.upsert_global_limit("tag:renew", 1)
        ctx = await run_to(store, ["renew"])
        later = NOW + dt.timedelta(seconds=100)
        restart = await initialize_orchestration(
            store,
            "task",
            StateType.RUNNING,
            StateType.RUNNING,
            run_override=ctx.run,
            orchestrator=frozen_orchestrator(later),
        )

        await apply_rules(restart, RULES)

        lease = (await limit_named(store, "tag:renew")).holders[str(ctx.run.id)]
        assert lease.acquired == NOW
        assert lease.expires == later + dt.timedelta(seconds=ctx.settings.slot_lease_ttl_s)

    async def test_a_rate_limit_frees_a_slot_after_one_over_its_decay(
        self, store: AdminStore
    ) -> None:
        await store.upsert_global_limit("tag:rate", 1, slot_decay_per_second=0.5)
        await run_to(store, ["rate"])

        soon = await run_to(store, ["rate"], now=NOW + dt.timedelta(seconds=1))
        later = await run_to(store, ["rate"], now=NOW + dt.timedelta(seconds=2))

        assert soon.response_status == SetStateStatus.WAIT
        assert later.response_status == SetStateStatus.ACCEPT

    async def test_the_wait_is_about_a_slots_average_hold(self, store: AdminStore) -> None:
        await store.upsert_global_limit("tag:busy", 1)
        await run_to(store, ["busy"])

        blocked = await run_to(store, ["busy"])

        assert blocked.response_status == SetStateStatus.WAIT
        delay = blocked.response_details.delay_seconds  # type: ignore[union-attr]
        # Around the default average occupancy of 2 s, clamped to within 1.3 times it.
        assert 1 <= delay <= 3


class TestTagSlotLeases:
    """V1 tag slots are leased too (``TagLimit.expires``)."""

    async def test_an_expired_tag_slot_is_reclaimed_by_the_next_claimer(
        self, store: AdminStore
    ) -> None:
        await store.upsert_tag_limit("v1-lease", 1)
        vanished = await run_to(store, ["v1-lease"])
        ttl = dt.timedelta(seconds=vanished.settings.slot_lease_ttl_s)
        [limit] = await store.lock_tag_limits(["v1-lease"])
        assert limit.expires == {str(vanished.run.id): NOW + ttl}

        before = await run_to(store, ["v1-lease"], now=NOW + ttl - dt.timedelta(seconds=1))
        after = await run_to(store, ["v1-lease"], now=NOW + ttl)

        assert before.response_status == SetStateStatus.WAIT
        assert after.response_status == SetStateStatus.ACCEPT
        assert await slots(store, "v1-lease") == [str(after.run.id)]

    async def test_a_holders_transition_renews_its_tag_lease(self, store: AdminStore) -> None:
        await store.upsert_tag_limit("v1-renew", 1)
        ctx = await run_to(store, ["v1-renew"])
        later = NOW + dt.timedelta(seconds=100)
        cancelling = await initialize_orchestration(
            store,
            "task",
            StateType.RUNNING,
            StateType.CANCELLING,
            run_override=ctx.run,
            orchestrator=frozen_orchestrator(later),
        )

        await apply_rules(cancelling, RULES)

        [limit] = await store.lock_tag_limits(["v1-renew"])
        ttl = dt.timedelta(seconds=ctx.settings.slot_lease_ttl_s)
        assert limit.expires == {str(ctx.run.id): later + ttl}

    async def test_leaving_running_drops_the_lease_with_the_slot(self, store: AdminStore) -> None:
        await store.upsert_tag_limit("v1-done", 1)
        ctx = await run_to(store, ["v1-done"])

        await finish(store, ctx)

        [limit] = await store.lock_tag_limits(["v1-done"])
        assert (limit.active_slots, limit.expires) == ([], {})


class TestExplicitRenewal:
    """``renew_run_slots``: what a proposal with ``renew_leases`` does."""

    async def test_a_task_renews_its_tag_and_global_slots(self, store: AdminStore) -> None:
        await store.upsert_global_limit("tag:g", 1)
        await store.upsert_tag_limit("v1", 1)
        ctx = await run_to(store, ["g", "v1"])
        later = NOW + dt.timedelta(seconds=500)

        renewed = await renew_run_slots(store, ctx.run, later, ctx.settings)

        ttl = dt.timedelta(seconds=ctx.settings.slot_lease_ttl_s)
        assert renewed == 2
        assert (await limit_named(store, "tag:g")).holders[str(ctx.run.id)].expires == later + ttl
        [v1] = await store.lock_tag_limits(["v1"])
        assert v1.expires[str(ctx.run.id)] == later + ttl

    async def test_an_expired_slot_is_not_given_back_by_a_renewal(self, store: AdminStore) -> None:
        await store.upsert_global_limit("tag:late", 1)
        ctx = await run_to(store, ["late"])
        past_expiry = NOW + dt.timedelta(seconds=ctx.settings.slot_lease_ttl_s + 1)

        renewed = await renew_run_slots(store, ctx.run, past_expiry, ctx.settings)

        assert renewed == 0
        assert await active(store, "tag:late") == 0

    async def test_a_flow_run_renews_its_deployment_slot(self, store: AdminStore) -> None:
        deployment_id = uuid.uuid4()
        await store.upsert_deployment(Deployment(deployment_id, concurrency_limit=1))
        ctx = await initialize_orchestration(
            store,
            "flow",
            StateType.SCHEDULED,
            StateType.PENDING,
            deployment_id=deployment_id,
            orchestrator=frozen_orchestrator(),
        )
        ctx = await apply_rules(ctx, [SecureFlowConcurrencySlots])
        later = NOW + dt.timedelta(seconds=200)

        renewed = await renew_run_slots(store, ctx.run, later, ctx.settings)

        assert renewed == 1
        limit = await limit_named(store, deployment_limit_name(deployment_id))
        grace = dt.timedelta(seconds=ctx.settings.deployment_lease_duration_s)
        assert limit.holders[str(ctx.run.id)].expires == later + grace
