"""Global (V2) ``tag:<tag>`` limits in ``ReleaseTaskConcurrencySlots``
(``rules/core/concurrency.py``): a task run that completes gives back its V2 slot along
with its V1 ones, CANCELLING keeps it, a run that holds no lease changes nothing, and each
release moves the limit's average slot occupancy, from which a blocked task's WAIT delay is
drawn.

Prefect's scenarios (reference §5.6, its ``test_task_concurrency_v2_integration.py``),
which ``docs/parity.md`` maps onto these tests. Prefect's scenario 11 (a storage flake in
the separate V2 session propagates) has no counterpart: the V2 slot is given back in the
orchestration transaction (see ``rules/core/concurrency.py``).
"""

from __future__ import annotations

import datetime as dt

from arbiter.rules.results import SetStateStatus
from arbiter.rules.store import AdminStore
from arbiter.schemas.states import StateType
from tests.factories import initialize_orchestration
from tests.unit.core.global_limit_helpers import RULES, active, finish, limit_named, run_to
from tests.unit.core.helpers import NOW, apply_rules, frozen_orchestrator, slots


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
