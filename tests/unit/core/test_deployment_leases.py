"""Deployment concurrency leases (``rules/core/deployments.py``): the slot a run takes at
PENDING is a lease that lasts the deployment's grace period, or without one the
``deployment_lease_duration_s`` setting (300 s unless configured), and
``PreserveDeploymentConcurrencyLeaseId`` carries the lease id from the run's state to a
proposed state that has none, before other rules transform it.

Ported from Prefect's ``TestFlowConcurrencyLimits`` and
``TestPreserveDeploymentConcurrencyLeaseId`` (reference §5.2), keeping their class and test
names so ``docs/parity.md`` can map them. A lease renewed or re-acquired at RUNNING is in
``test_deployment_running_validation.py``. Each runs on both stores.
"""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from arbiter.rules.core.deployments import PreserveDeploymentConcurrencyLeaseId
from arbiter.rules.core.pending import PreventPendingTransitions
from arbiter.rules.results import SetStateStatus
from arbiter.rules.store import AdminStore
from arbiter.schemas.states import StateDetails, StateType
from tests.unit.core.deployment_helpers import (
    P,
    R,
    a_deployment,
    lease_of,
    limit_of,
    orchestrator,
    pending,
    transition,
)
from tests.unit.core.helpers import NOW


class TestFlowConcurrencyLimits:
    @pytest.mark.parametrize(
        ("grace", "setting", "ttl"),
        [(None, 123.0, 123), (None, None, 300), (720, None, 720)],
        ids=["configured-setting", "default-setting", "custom-grace"],
    )
    async def test_the_lease_lasts_the_grace_period(
        self, store: AdminStore, grace: int | None, setting: float | None, ttl: int
    ) -> None:
        deployment_id = await a_deployment(store, 1, grace=grace)
        settings = {} if setting is None else {"deployment_lease_duration_s": setting}

        await pending(store, deployment_id, orchestrator(**settings))

        [lease] = (await limit_of(store, deployment_id)).holders.values()
        assert lease.expires == NOW + dt.timedelta(seconds=ttl)


class TestPreserveDeploymentConcurrencyLeaseId:
    async def test_lease_id_copied_when_proposed_is_null(self, store: AdminStore) -> None:
        lease_id = uuid.uuid4()
        ctx = await transition(
            store,
            None,
            P,
            R,
            [PreserveDeploymentConcurrencyLeaseId],
            initial_details=StateDetails(deployment_concurrency_lease_id=lease_id),
        )
        assert lease_of(ctx) == lease_id

    async def test_lease_id_not_overwritten_when_proposed_has_value(
        self, store: AdminStore
    ) -> None:
        mine = uuid.uuid4()
        ctx = await transition(
            store,
            None,
            P,
            R,
            [PreserveDeploymentConcurrencyLeaseId],
            initial_details=StateDetails(deployment_concurrency_lease_id=uuid.uuid4()),
            proposed_details=StateDetails(deployment_concurrency_lease_id=mine),
        )
        assert lease_of(ctx) == mine

    @pytest.mark.parametrize(("initial", "proposed"), [(None, P), (P, None)])
    async def test_handles_none_states(
        self, store: AdminStore, initial: StateType | None, proposed: StateType | None
    ) -> None:
        ctx = await transition(
            store, None, initial, proposed, [PreserveDeploymentConcurrencyLeaseId]
        )
        assert ctx.response_status in (SetStateStatus.ACCEPT, SetStateStatus.REJECT)

    async def test_preserves_before_other_transforms(self, store: AdminStore) -> None:
        lease_id = uuid.uuid4()
        ctx = await transition(
            store,
            None,
            P,
            P,
            [PreserveDeploymentConcurrencyLeaseId, PreventPendingTransitions],
            proposed_state_name="Submitting",
            initial_details=StateDetails(deployment_concurrency_lease_id=lease_id),
        )
        assert ctx.response_status == SetStateStatus.ACCEPT
        assert lease_of(ctx) == lease_id

    async def test_works_with_old_client_versions(self, store: AdminStore) -> None:
        lease_id = uuid.uuid4()
        ctx = await transition(
            store,
            None,
            P,
            R,
            [PreserveDeploymentConcurrencyLeaseId],
            client_version="0.1.0",
            initial_details=StateDetails(deployment_concurrency_lease_id=lease_id),
        )
        assert lease_of(ctx) == lease_id
