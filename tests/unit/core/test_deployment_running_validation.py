"""``ValidateDeploymentConcurrencyAtRunning`` (``rules/core/deployments.py``): when a run of a
deployment goes PENDING → RUNNING, the lease it took at PENDING is renewed if it is still
held, its slot is taken again if the lease expired and a slot is free, and the run is
cancelled if another run took the slot meanwhile; a run without a lease id, a deployment
without a limit and a client older than 3.4.11 are let through unchecked.

Ported from Prefect's ``test_validate_deployment_concurrency_at_running.py`` (reference
§5.7), which ``docs/parity.md`` maps onto these tests. Each runs on both stores.
"""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from arbiter.rules.context import FlowOrchestrationContext
from arbiter.rules.core.deployments import ValidateDeploymentConcurrencyAtRunning
from arbiter.rules.engine import Orchestrator
from arbiter.rules.policies import CoreFlowPolicy
from arbiter.rules.results import SetStateStatus
from arbiter.rules.store import AdminStore, Deployment, deployment_limit_name
from arbiter.schemas.states import StateDetails
from tests.unit.core.deployment_helpers import (
    P,
    R,
    X,
    a_deployment,
    active,
    lease_of,
    limit_of,
    pending,
    transition,
)
from tests.unit.core.helpers import NOW


class TestValidateDeploymentConcurrencyAtRunning:
    """Prefect's §5.7: deployments CANCEL_NEW with a 600 s grace period, P → R."""

    async def _held(
        self, store: AdminStore, limit: int = 1
    ) -> tuple[uuid.UUID, FlowOrchestrationContext]:
        deployment_id = await a_deployment(store, limit, "CANCEL_NEW", grace=600)
        return deployment_id, await pending(store, deployment_id)

    async def _running(
        self,
        store: AdminStore,
        deployment_id: uuid.UUID | None,
        held: FlowOrchestrationContext | None,
        lease_id: uuid.UUID | None,
        **options: object,
    ) -> FlowOrchestrationContext:
        return await transition(
            store,
            deployment_id,
            P,
            R,
            [ValidateDeploymentConcurrencyAtRunning],
            run=held.run if held else None,
            initial_details=StateDetails(deployment_concurrency_lease_id=lease_id),
            **options,
        )

    async def _expire(self, store: AdminStore, deployment_id: uuid.UUID) -> None:
        """The lease has expired and been reclaimed: the slot is free."""
        [limit] = await store.lock_global_limits([deployment_limit_name(deployment_id)])
        limit.holders.clear()
        await store.save_global_limit(limit)

    async def test_copies_lease_id_when_no_validation_needed(self, store: AdminStore) -> None:
        deployment_id = await a_deployment(store, 1, "CANCEL_NEW", grace=600)
        ctx = await self._running(store, deployment_id, None, None)
        assert ctx.response_status == SetStateStatus.ACCEPT
        assert lease_of(ctx) is None

    async def test_renews_lease_when_valid(self, store: AdminStore) -> None:
        deployment_id, held = await self._held(store)
        later = NOW + dt.timedelta(seconds=100)
        ctx = await self._running(
            store,
            deployment_id,
            held,
            lease_of(held),
            orchestrator=Orchestrator(clock=lambda: later),
        )
        assert ctx.response_status == SetStateStatus.ACCEPT
        assert lease_of(ctx) == lease_of(held)
        [lease] = (await limit_of(store, deployment_id)).holders.values()
        assert lease.expires == later + dt.timedelta(seconds=600)

    async def test_reacquires_slot_after_lease_expiry(self, store: AdminStore) -> None:
        deployment_id, held = await self._held(store)
        await self._expire(store, deployment_id)
        ctx = await self._running(store, deployment_id, held, lease_of(held))
        assert ctx.response_status == SetStateStatus.ACCEPT
        assert lease_of(ctx) not in (None, lease_of(held))
        assert await active(store, deployment_id) == 1

    async def test_cancels_when_no_slots_available(self, store: AdminStore) -> None:
        """Prefect's test_cancels_when_no_slots_available and
        test_regression_concurrent_execution_prevention: the lease expired and another run
        took the slot meanwhile."""
        deployment_id, held = await self._held(store)
        await self._expire(store, deployment_id)
        assert (await pending(store, deployment_id)).response_status == SetStateStatus.ACCEPT

        ctx = await self._running(store, deployment_id, held, lease_of(held))

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.validated_state is not None
        assert ctx.validated_state.type == X
        assert "concurrency slot lost" in (ctx.validated_state.message or "")
        assert await active(store, deployment_id) == 1

    @pytest.mark.parametrize("client_version", ["3.4.10", None])
    async def test_skips_validation_for_old_client_versions(
        self, store: AdminStore, client_version: str | None
    ) -> None:
        """Prefect's test_skips_validation_for_old_client_versions and
        test_default_client_version_to_2_0_0 (the whole core policy for the first)."""
        deployment_id, held = await self._held(store)
        await self._expire(store, deployment_id)
        ctx = await self._running(
            store, deployment_id, held, lease_of(held), client_version=client_version
        )
        assert ctx.response_status == SetStateStatus.ACCEPT
        assert lease_of(ctx) == lease_of(held)

    async def test_the_core_policy_skips_validation_for_an_old_client(
        self, store: AdminStore
    ) -> None:
        deployment_id, held = await self._held(store)
        await self._expire(store, deployment_id)
        ctx = await transition(
            store,
            deployment_id,
            P,
            R,
            list(CoreFlowPolicy.priority()),
            run=held.run,
            client_version="3.4.10",
            initial_details=StateDetails(deployment_concurrency_lease_id=lease_of(held)),
        )
        assert ctx.response_status == SetStateStatus.ACCEPT
        assert lease_of(ctx) == lease_of(held)

    async def test_concurrent_reacquisition_only_one_succeeds(self, store: AdminStore) -> None:
        deployment_id = await a_deployment(store, 2, "CANCEL_NEW", grace=600)
        one, two = await pending(store, deployment_id), await pending(store, deployment_id)
        await store.upsert_deployment(Deployment(deployment_id, "d", 1, "CANCEL_NEW", 600))
        await self._expire(store, deployment_id)

        first = await self._running(store, deployment_id, one, lease_of(one))
        second = await self._running(store, deployment_id, two, lease_of(two))

        assert first.response_status == SetStateStatus.ACCEPT
        assert second.response_status == SetStateStatus.REJECT
        assert second.validated_state is not None
        assert second.validated_state.type == X

    async def test_handles_no_lease_id(self, store: AdminStore) -> None:
        deployment_id, held = await self._held(store)
        ctx = await self._running(store, deployment_id, held, None)
        assert ctx.response_status == SetStateStatus.ACCEPT
        assert lease_of(ctx) is None

    async def test_handles_no_deployment_concurrency_limit(self, store: AdminStore) -> None:
        deployment_id = await a_deployment(store, None)
        fake = uuid.uuid4()
        ctx = await self._running(store, deployment_id, None, fake)
        assert ctx.response_status == SetStateStatus.ACCEPT
        assert lease_of(ctx) == fake
