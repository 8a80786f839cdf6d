"""Deployment concurrency slots (``rules/core/deployments.py``): ``SecureFlowConcurrencySlots``
takes a slot of the deployment's limit when a run enters PENDING, or sends the run back to
wait for one when the limit is full (a limit of 0 ABORTs, no limit takes nothing, a deployment
that cannot be read ABORTs); ``ReleaseFlowConcurrencySlots`` gives the slot back when the run
moves to a state other than PENDING, RUNNING or CANCELLING, even once the deployment is gone,
and not when the transition is aborted; a slot taken in a transition that a later rule turns
away is given back.

Ported from Prefect's ``TestFlowConcurrencyLimits`` (reference §5.2), keeping its class and
test names so ``docs/parity.md`` can map them; the same class's collision strategies, leases
and old clients are in ``test_deployment_collisions.py``, ``test_deployment_leases.py`` and
``test_deployment_old_clients.py``. Each runs on both stores.
"""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from arbiter.rules.base import FlowRunOrchestrationRule
from arbiter.rules.context import FlowOrchestrationContext
from arbiter.rules.core.deployments import (
    ReleaseFlowConcurrencySlots,
    SecureFlowConcurrencySlots,
    ValidateDeploymentConcurrencyAtRunning,
)
from arbiter.rules.results import SetStateStatus
from arbiter.rules.store import AdminStore
from arbiter.schemas.states import State, StateDetails, StateType
from tests.unit.core.deployment_helpers import (
    CG,
    NEW_CLIENT,
    SECURE_RELEASE,
    C,
    P,
    R,
    S,
    X,
    a_deployment,
    active,
    lease_of,
    limit_of,
    pending,
    transition,
)
from tests.unit.core.helpers import NOW, rejecting_rule


class TestFlowConcurrencyLimits:
    @pytest.mark.parametrize(("initial", "proposed"), [(P, R), (R, C), (CG, X), (R, S), (P, CG)])
    async def test_ignored_secure_transitions_are_accepted(
        self, store: AdminStore, initial: StateType, proposed: StateType
    ) -> None:
        deployment_id = await a_deployment(store, 1)
        assert (await pending(store, deployment_id)).response_status == SetStateStatus.ACCEPT

        ctx = await transition(
            store, deployment_id, initial, proposed, [SecureFlowConcurrencySlots]
        )

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert await active(store, deployment_id) == 1

    @pytest.mark.parametrize(("initial", "proposed"), [(P, P), (P, R), (P, CG)])
    async def test_ignored_release_transitions_are_accepted(
        self, store: AdminStore, initial: StateType, proposed: StateType
    ) -> None:
        """Into PENDING, RUNNING or CANCELLING nothing is released (the holder's own
        transitions: any other initial state would have released the slot already)."""
        deployment_id = await a_deployment(store, 1)
        held = await pending(store, deployment_id)

        ctx = await transition(
            store, deployment_id, initial, proposed, [ReleaseFlowConcurrencySlots], run=held.run
        )

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert await active(store, deployment_id) == 1

    async def test_error_handling(self, store: AdminStore, monkeypatch: pytest.MonkeyPatch) -> None:
        """The deployment cannot be read: the rule's error ABORTs, no slot is taken."""
        deployment_id = await a_deployment(store, 1)

        async def broken(deployment_id: uuid.UUID) -> None:
            raise RuntimeError("the deployment could not be read")

        monkeypatch.setattr(store, "read_deployment", broken)
        ctx = await pending(store, deployment_id)
        monkeypatch.undo()

        assert ctx.response_status == SetStateStatus.ABORT
        assert await active(store, deployment_id) == 0

    async def test_secure_concurrency_slots(self, store: AdminStore) -> None:
        deployment_id = await a_deployment(store, 2)
        first, second = await pending(store, deployment_id), await pending(store, deployment_id)
        third = await pending(store, deployment_id)

        assert (first.response_status, second.response_status) == (SetStateStatus.ACCEPT,) * 2
        limit = await limit_of(store, deployment_id)
        assert {lease.id for lease in limit.holders.values()} == {lease_of(first), lease_of(second)}
        assert third.response_status == SetStateStatus.REJECT
        assert third.response_details.reason == "Deployment concurrency limit reached."  # type: ignore[union-attr]
        assert third.validated_state is not None
        assert (third.validated_state.type, third.validated_state.name) == (
            S,
            "AwaitingConcurrencySlot",
        )
        assert third.validated_state.state_details.scheduled_time == NOW + dt.timedelta(seconds=30)

    async def test_release_concurrency_slots(self, store: AdminStore) -> None:
        deployment_id = await a_deployment(store, 1)
        first = await pending(store, deployment_id)
        blocked = await pending(store, deployment_id)
        assert blocked.response_status == SetStateStatus.REJECT

        running = await transition(
            store,
            deployment_id,
            P,
            R,
            [ValidateDeploymentConcurrencyAtRunning],
            run=first.run,
            initial_details=StateDetails(deployment_concurrency_lease_id=lease_of(first)),
        )
        assert lease_of(running) == lease_of(first)
        await transition(store, deployment_id, R, C, [ReleaseFlowConcurrencySlots], run=first.run)

        assert await active(store, deployment_id) == 0
        again = await transition(store, deployment_id, S, P, SECURE_RELEASE, run=blocked.run)
        assert again.response_status == SetStateStatus.ACCEPT

    async def test_release_concurrency_slots_with_lease_does_not_require_deployment(
        self, store: AdminStore
    ) -> None:
        deployment_id = await a_deployment(store, 1)
        held = await pending(store, deployment_id)
        await store.delete_deployment(deployment_id)

        ctx = await transition(store, deployment_id, P, C, SECURE_RELEASE, run=held.run)

        assert ctx.response_status == SetStateStatus.ACCEPT

    async def test_zero_concurrency_limit(self, store: AdminStore) -> None:
        deployment_id = await a_deployment(store, 0)

        ctx = await pending(store, deployment_id)

        assert ctx.response_status == SetStateStatus.ABORT
        assert ctx.response_details.reason == (  # type: ignore[union-attr]
            "The deployment concurrency limit is 0. The flow will deadlock if submitted again."
        )

    async def test_no_concurrency_limit(self, store: AdminStore) -> None:
        deployment_id = await a_deployment(store, None)

        ctx = await pending(store, deployment_id)

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert lease_of(ctx) is None

    async def test_release_concurrency_slots_nullified_transition_last(
        self, store: AdminStore
    ) -> None:
        deployment_id = await a_deployment(store, 1)
        held = await pending(store, deployment_id)

        class AbortAll(FlowRunOrchestrationRule):
            FROM_STATES = frozenset([*StateType, None])
            TO_STATES = frozenset([*StateType, None])

            async def before_transition(
                self,
                initial_state: State | None,
                proposed_state: State | None,
                context: FlowOrchestrationContext,
            ) -> None:
                await self.abort_transition(reason="For testing purposes")

        ctx = await transition(
            store, deployment_id, R, C, [AbortAll, *SECURE_RELEASE], run=held.run
        )

        assert ctx.response_status == SetStateStatus.ABORT
        assert await active(store, deployment_id) == 1

    async def test_multiple_deployments_with_different_concurrency_limits(
        self, store: AdminStore
    ) -> None:
        one, two = await a_deployment(store, 1), await a_deployment(store, 2)
        statuses = [
            (await pending(store, deployment_id)).response_status
            for deployment_id in (one, one, two, two, two)
        ]
        accept, reject = SetStateStatus.ACCEPT, SetStateStatus.REJECT
        assert statuses == [accept, reject, accept, accept, reject]
        assert (await active(store, one), await active(store, two)) == (1, 2)

    async def test_flow_run_cancellation(self, store: AdminStore) -> None:
        deployment_id = await a_deployment(store, 1)
        held = await pending(store, deployment_id)
        await transition(store, deployment_id, R, CG, SECURE_RELEASE, run=held.run)
        assert await active(store, deployment_id) == 1
        await transition(store, deployment_id, CG, X, SECURE_RELEASE, run=held.run)
        assert await active(store, deployment_id) == 0
        assert (await pending(store, deployment_id)).response_status == SetStateStatus.ACCEPT

    async def test_pending_running_completed_releases_concurrency_slot(
        self, store: AdminStore
    ) -> None:
        """One run through its life (Prefect uses a fresh run per step, relying on a
        fallback decrement that Arbiter does not have: a slot belongs to its run)."""
        deployment_id = await a_deployment(store, 1)
        held = await pending(store, deployment_id)
        await transition(store, deployment_id, P, R, SECURE_RELEASE, run=held.run)
        assert await active(store, deployment_id) == 1
        await transition(store, deployment_id, R, C, SECURE_RELEASE, run=held.run)
        assert await active(store, deployment_id) == 0

    @pytest.mark.parametrize("client_version", [NEW_CLIENT, "3.4.11"])
    async def test_secure_cleanup_on_fizzle(self, store: AdminStore, client_version: str) -> None:
        """A later rule turns the PENDING into a SCHEDULED: the slot taken is given back
        (Prefect's test_secure_cleanup_on_fizzle and test_lease_cleanup_on_fizzle)."""
        deployment_id = await a_deployment(store, 1)
        rules = [
            SecureFlowConcurrencySlots,
            rejecting_rule(S, base=FlowRunOrchestrationRule),
            ReleaseFlowConcurrencySlots,
        ]

        ctx = await transition(store, deployment_id, S, P, rules, client_version=client_version)

        assert ctx.response_status == SetStateStatus.REJECT
        assert await active(store, deployment_id) == 0
        assert lease_of(ctx) is None
