"""The leases Arbiter adds to concurrency slots (``rules/core/global_limits.py``,
``rules/core/concurrency.py``): a global (V2) slot and a V1 tag slot are leased to the run
that holds them, an expired lease is reclaimed by the next claimer, a holder's own
transitions renew it, and leaving RUNNING drops it with the slot; ``renew_run_slots``
(``rules/core/leases.py``, what a proposal with ``renew_leases`` does) renews a run's task
and deployment slots but gives none back once expired. Also how a full V2 limit comes free
with time: a rate limit (``slot_decay_per_second``) frees its slot after 1 / decay seconds,
and a refused task waits about the average time a slot is held.

Arbiter's own scenarios, beyond Prefect's ``test_task_concurrency_v2_integration.py``
(those are in ``test_global_limit_slots.py`` and ``test_global_limit_release.py``).
"""

from __future__ import annotations

import datetime as dt
import uuid

from arbiter.rules.core.deployments import SecureFlowConcurrencySlots
from arbiter.rules.core.leases import renew_run_slots
from arbiter.rules.results import SetStateStatus
from arbiter.rules.store import AdminStore, Deployment, deployment_limit_name
from arbiter.schemas.states import StateType
from tests.factories import initialize_orchestration
from tests.unit.core.global_limit_helpers import RULES, active, finish, limit_named, run_to
from tests.unit.core.helpers import NOW, apply_rules, frozen_orchestrator, slots


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
