"""A full deployment's collision strategy (``rules/core/deployments.py``): under ENQUEUE, the
default, a run that finds no free slot goes back to SCHEDULED as ``AwaitingConcurrencySlot``
and takes a slot once one is given back; under CANCEL_NEW it is cancelled.
``EnforceDeploymentConcurrencyOnLate`` applies CANCEL_NEW to a run being marked Late too: a
late run of a full CANCEL_NEW deployment is cancelled.

``TestFlowConcurrencyLimits`` is ported from Prefect's (reference §5.2), keeping its class
and test names so ``docs/parity.md`` can map them. Each runs on both stores.
"""

from __future__ import annotations

import uuid

import pytest

from arbiter.rules.core.deployments import (
    EnforceDeploymentConcurrencyOnLate,
    ReleaseFlowConcurrencySlots,
)
from arbiter.rules.results import SetStateStatus
from arbiter.rules.store import AdminStore, Deployment
from arbiter.schemas.states import StateType
from tests.unit.core.deployment_helpers import (
    SECURE_RELEASE,
    C,
    P,
    R,
    S,
    X,
    a_deployment,
    pending,
    transition,
)


class TestFlowConcurrencyLimits:
    @pytest.mark.parametrize(
        ("strategy", "refused"), [("CANCEL_NEW", X), ("ENQUEUE", S)], ids=["cancel_new", "enqueue"]
    )
    async def test_collision_strategies(
        self, store: AdminStore, strategy: str, refused: StateType
    ) -> None:
        deployment_id = await a_deployment(store, 1, strategy)
        first = await pending(store, deployment_id)
        second = await pending(store, deployment_id)

        assert second.response_status == SetStateStatus.REJECT
        assert second.validated_state is not None
        assert second.validated_state.type == refused
        await transition(store, deployment_id, R, C, [ReleaseFlowConcurrencySlots], run=first.run)
        if strategy == "ENQUEUE":
            again = await transition(store, deployment_id, S, P, SECURE_RELEASE, run=second.run)
            assert again.response_status == SetStateStatus.ACCEPT

    async def test_cancel_new_collision_strategy(self, store: AdminStore) -> None:
        deployment_id = await a_deployment(store, 1, "CANCEL_NEW")
        await pending(store, deployment_id)

        second = await pending(store, deployment_id)

        assert second.validated_state is not None
        assert second.validated_state.message == "Deployment concurrency limit reached."

    async def test_uses_enqueue_collision_strategy_by_default(self, store: AdminStore) -> None:
        deployment_id = uuid.uuid4()
        await store.upsert_deployment(Deployment(deployment_id, concurrency_limit=1))
        await pending(store, deployment_id)

        second = await pending(store, deployment_id)

        assert second.validated_state is not None
        assert second.validated_state.name == "AwaitingConcurrencySlot"


class TestEnforceDeploymentConcurrencyOnLate:
    @pytest.mark.parametrize(
        ("strategy", "full", "cancelled"),
        [("CANCEL_NEW", True, True), ("CANCEL_NEW", False, False), ("ENQUEUE", True, False)],
    )
    async def test_a_late_run_of_a_full_cancel_new_deployment_is_cancelled(
        self, store: AdminStore, strategy: str, full: bool, cancelled: bool
    ) -> None:
        deployment_id = await a_deployment(store, 1, strategy)
        if full:
            await pending(store, deployment_id)

        ctx = await transition(
            store,
            deployment_id,
            S,
            S,
            [EnforceDeploymentConcurrencyOnLate],
            proposed_state_name="Late",
        )

        assert (ctx.response_status == SetStateStatus.REJECT) is cancelled
        if cancelled:
            assert ctx.validated_state is not None
            assert ctx.validated_state.type == X
            assert ctx.response_details.reason == (  # type: ignore[union-attr]
                "Deployment concurrency limit is full and uses the CANCEL_NEW strategy."
            )
