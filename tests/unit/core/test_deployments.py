"""Deployment concurrency (``rules/core/deployments.py``): Prefect's TestFlowConcurrencyLimits
and TestPreserveDeploymentConcurrencyLeaseId (reference §5.2), its
test_validate_deployment_concurrency_at_running.py (§5.7), and EnforceDeploymentConcurrencyOnLate.
Each runs on both stores."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from arbiter.rules.base import FlowRunOrchestrationRule
from arbiter.rules.context import FlowOrchestrationContext, RuleSettings
from arbiter.rules.core.deployments import (
    EnforceDeploymentConcurrencyOnLate,
    PreserveDeploymentConcurrencyLeaseId,
    ReleaseFlowConcurrencySlots,
    RemoveDeploymentConcurrencyLeaseForOldClientVersions,
    SecureFlowConcurrencySlots,
    ValidateDeploymentConcurrencyAtRunning,
    client_version_tuple,
)
from arbiter.rules.core.pending import PreventPendingTransitions
from arbiter.rules.engine import Orchestrator
from arbiter.rules.policies import CoreFlowPolicy
from arbiter.rules.policy import RuleClass
from arbiter.rules.results import SetStateStatus
from arbiter.rules.store import AdminStore, Deployment, GlobalLimit, deployment_limit_name
from arbiter.schemas.runs import FlowRun
from arbiter.schemas.states import State, StateDetails, StateType
from tests.factories import initialize_orchestration
from tests.unit.core.helpers import NOW, apply_rules, rejecting_rule

P, R, C, S = StateType.PENDING, StateType.RUNNING, StateType.COMPLETED, StateType.SCHEDULED
CG, X = StateType.CANCELLING, StateType.CANCELLED
SECURE_RELEASE: list[RuleClass] = [SecureFlowConcurrencySlots, ReleaseFlowConcurrencySlots]
NEW_CLIENT = "3.5.0"


def orchestrator(**settings: object) -> Orchestrator:
    return Orchestrator(clock=lambda: NOW, settings=RuleSettings(**settings))  # type: ignore[arg-type]


async def a_deployment(
    store: AdminStore,
    limit: int | None = 1,
    strategy: str = "ENQUEUE",
    grace: int | None = None,
) -> uuid.UUID:
    deployment_id = uuid.uuid4()
    await store.upsert_deployment(
        Deployment(deployment_id, "d", limit, strategy, grace)  # type: ignore[arg-type]
    )
    return deployment_id


async def limit_of(store: AdminStore, deployment_id: uuid.UUID) -> GlobalLimit:
    name = deployment_limit_name(deployment_id)
    [limit] = [lim for lim in await store.list_global_limits() if lim.name == name]
    return limit


async def active(store: AdminStore, deployment_id: uuid.UUID) -> int:
    return (await limit_of(store, deployment_id)).active_slots


async def transition(
    store: AdminStore,
    deployment_id: uuid.UUID | None,
    initial: StateType | None,
    proposed: StateType | None,
    rules: list[RuleClass],
    run: FlowRun | None = None,
    **options: object,
) -> FlowOrchestrationContext:
    ctx = await initialize_orchestration(
        store,
        "flow",
        initial,
        proposed,
        deployment_id=deployment_id,
        run_override=run,
        orchestrator=options.pop("orchestrator", None) or orchestrator(),
        client_version=options.pop("client_version", NEW_CLIENT),
        **options,
    )
    return await apply_rules(ctx, rules)


def lease_of(ctx: FlowOrchestrationContext) -> uuid.UUID | None:
    state = ctx.validated_state or ctx.proposed_state
    assert state is not None
    return state.state_details.deployment_concurrency_lease_id


async def pending(
    store: AdminStore, deployment_id: uuid.UUID, orchestrator: Orchestrator | None = None
) -> FlowOrchestrationContext:
    """A fresh run of the deployment, SCHEDULED → PENDING through Secure and Release."""
    return await transition(store, deployment_id, S, P, SECURE_RELEASE, orchestrator=orchestrator)


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


@pytest.mark.parametrize(
    ("version", "parsed"),
    [("3.4.11", (3, 4, 11)), ("3.0.0rc20", (3, 0, 0)), (None, (2, 0, 0)), ("junk", ())],
)
def test_client_versions_read_by_their_leading_numbers(
    version: str | None, parsed: tuple[int, ...]
) -> None:
    assert client_version_tuple(version) == parsed
