"""Deployment concurrency for older clients (``rules/core/deployments.py``), whose versions
``client_version_tuple`` reads by their leading numbers: Prefect workers 3.0.0rc20 to 3.0.3
manage deployment concurrency themselves and are given no slot, and
``RemoveDeploymentConcurrencyLeaseForOldClientVersions`` takes the lease id away from a
client older than 3.4.11 (it cannot renew a lease) while its run keeps the slot.

``TestFlowConcurrencyLimits`` is ported from Prefect's (reference §5.2), keeping its class
and test names so ``docs/parity.md`` can map them; it also maps Prefect's API-level
client-version tests (``TestSetFlowRunState``, ``TestConcurrencyLeaseInteraction``) here, at
rule level, as the wire carries no client version. Each runs on both stores.
"""

from __future__ import annotations

import pytest

from arbiter.rules.core.deployments import (
    RemoveDeploymentConcurrencyLeaseForOldClientVersions,
    client_version_tuple,
)
from arbiter.rules.results import SetStateStatus
from arbiter.rules.store import AdminStore
from arbiter.schemas.states import StateDetails
from tests.unit.core.deployment_helpers import (
    SECURE_RELEASE,
    P,
    R,
    S,
    a_deployment,
    active,
    lease_of,
    limit_of,
    pending,
    transition,
)


class TestFlowConcurrencyLimits:
    @pytest.mark.parametrize("client_version", ["3.0.0rc20", "3.0.3"])
    async def test_workers_that_manage_deployment_concurrency_are_not_given_slots(
        self, store: AdminStore, client_version: str
    ) -> None:
        deployment_id = await a_deployment(store, 1)

        ctx = await transition(
            store, deployment_id, S, P, SECURE_RELEASE, client_version=client_version
        )

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert lease_of(ctx) is None
        assert await active(store, deployment_id) == 0

    @pytest.mark.parametrize(("client_version", "kept"), [("3.4.10", False), ("3.4.11", True)])
    async def test_old_clients_lose_the_lease_id_but_keep_the_slot(
        self, store: AdminStore, client_version: str, kept: bool
    ) -> None:
        """Prefect's test_clear_lease_id_on_for_old_client_versions and
        test_dont_clear_lease_id_on_for_new_client_versions."""
        deployment_id = await a_deployment(store, 1)
        held = await pending(store, deployment_id)
        lease_id = lease_of(held)

        await transition(
            store,
            deployment_id,
            P,
            R,
            [RemoveDeploymentConcurrencyLeaseForOldClientVersions],
            run=held.run,
            client_version=client_version,
            initial_details=StateDetails(deployment_concurrency_lease_id=lease_id),
        )

        [lease] = (await limit_of(store, deployment_id)).holders.values()
        assert (lease.id == lease_id) is kept
        assert await active(store, deployment_id) == 1


@pytest.mark.parametrize(
    ("version", "parsed"),
    [("3.4.11", (3, 4, 11)), ("3.0.0rc20", (3, 0, 0)), (None, (2, 0, 0)), ("junk", ())],
)
def test_client_versions_read_by_their_leading_numbers(
    version: str | None, parsed: tuple[int, ...]
) -> None:
    assert client_version_tuple(version) == parsed
