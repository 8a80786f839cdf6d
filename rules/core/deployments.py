"""Deployment concurrency: at most ``concurrency_limit`` flow runs of a deployment between
PENDING and the end of RUNNING/CANCELLING (Prefect's CoreFlowPolicy deployment rules).

The limit is the global limit ``deployment:<id>``; a flow run holds a slot of it under a
lease (``rules.core.global_limits``) whose id the run's states carry as
``state_details.deployment_concurrency_lease_id`` and whose TTL is the deployment's grace
period (else ``settings.deployment_lease_duration_s``). Taken on entering PENDING
(SecureFlowConcurrencySlots), checked and renewed at PENDING → RUNNING
(ValidateDeploymentConcurrencyAtRunning), freed on leaving PENDING/RUNNING/CANCELLING for
anything else (ReleaseFlowConcurrencySlots).

Deliberate deviations from Prefect: a slot belongs to the run holding it, so a release
frees that run's slot only (Prefect's "no lease, decrement one" fallback could free a
slot another run holds); and an old client's lease is not revoked with its slot kept
(RemoveDeploymentConcurrencyLeaseForOldClientVersions): the slot stays held by the run,
without a lease id and without an expiry it could not renew, until the run leaves. A run
naming a deployment the store does not know is not governed (Prefect ABORTs "Deployment
not found."): flow runs carried ``deployment_id`` before Arbiter knew deployments, and
their executors must not start failing.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid

from arbiter.rules.base import (
    FlowRunOrchestrationRule,
    FlowRunUniversalTransform,
    StateTypeOrNone,
    all_states_except,
    states,
)
from arbiter.rules.context import FlowOrchestrationContext
from arbiter.rules.core import global_limits as v2
from arbiter.rules.store import Deployment, GlobalLimit, deployment_limit_name
from arbiter.schemas.states import State, StateDetails, StateType

# Prefect's workers of these versions manage deployment concurrency themselves.
WORKER_VERSIONS_THAT_MANAGE_DEPLOYMENT_CONCURRENCY = frozenset(
    {"3.0.0rc20", "3.0.0", "3.0.1", "3.0.2", "3.0.3"}
)
# Clients from this version renew their lease at RUNNING; older ones cannot.
MIN_VERSION_WITH_LEASE_RENEWAL = (3, 4, 11)
# An old client's slot: held until the run leaves, as it cannot renew a lease.
_NEVER = dt.timedelta(days=365 * 100)

_ACTIVE = states(StateType.PENDING, StateType.RUNNING, StateType.CANCELLING)
LIMIT_REACHED = "Deployment concurrency limit reached."


def client_version_tuple(version: str | None) -> tuple[int, ...]:
    """The leading numbers of a client version (``"3.4.11rc1"`` → (3, 4, 11)); a missing
    version reads as Prefect's default, 2.0.0."""
    parts = []
    for piece in (version or "2.0.0").split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() < len(piece):
            break
    return tuple(parts)


def renews_leases(context: FlowOrchestrationContext) -> bool:
    return client_version_tuple(context.client_version) >= MIN_VERSION_WITH_LEASE_RENEWAL


def _lease_id(state: State | None) -> uuid.UUID | None:
    return state.state_details.deployment_concurrency_lease_id if state is not None else None


def _set_lease_id(state: State, lease_id: uuid.UUID | None) -> None:
    """In place: a rule's states are shallow copies sharing their details with the real ones."""
    state.state_details.deployment_concurrency_lease_id = lease_id


def _grace_s(deployment: Deployment, context: FlowOrchestrationContext) -> float:
    if deployment.grace_period_seconds is not None:
        return float(deployment.grace_period_seconds)
    return context.settings.deployment_lease_duration_s


async def _locked_limit(
    context: FlowOrchestrationContext, deployment: Deployment
) -> GlobalLimit | None:
    limits = await context.store.lock_global_limits([deployment_limit_name(deployment.id)])
    limit = limits[0] if limits else None
    if limit is not None and v2.reclaim_expired(limit, context.now()):
        await context.store.save_global_limit(limit)
    return limit


async def _deployment(context: FlowOrchestrationContext) -> Deployment | None:
    deployment_id = context.run.deployment_id
    return await context.store.read_deployment(deployment_id) if deployment_id else None


class PreserveDeploymentConcurrencyLeaseId(FlowRunUniversalTransform):
    """A proposed state without a lease id inherits the run's: a client that sends ``null``
    must not lose the slot's lease (so every later state of the run carries it)."""

    async def before_transition(self, context: FlowOrchestrationContext) -> None:
        initial, proposed = context.initial_state, context.proposed_state
        if initial is None or proposed is None:
            return
        held = _lease_id(initial)
        if held is not None and _lease_id(proposed) is None:
            _set_lease_id(proposed, held)


class ValidateDeploymentConcurrencyAtRunning(FlowRunOrchestrationRule):
    """PENDING → RUNNING keeps the run's slot: the lease is renewed, or, expired and taken
    back meanwhile, taken again if a slot is free; else the run is Cancelled."""

    FROM_STATES = states(StateType.PENDING)
    TO_STATES = states(StateType.RUNNING)

    async def before_transition(
        self,
        initial_state: State | None,
        proposed_state: State | None,
        context: FlowOrchestrationContext,
    ) -> None:
        if initial_state is None or proposed_state is None:
            return
        lease_id = _lease_id(initial_state)
        _set_lease_id(proposed_state, lease_id)
        if lease_id is None or not renews_leases(context):
            return
        deployment = await _deployment(context)
        if deployment is None or deployment.concurrency_limit is None:
            return
        limit = await _locked_limit(context, deployment)
        if limit is None:
            return
        now, ttl_s = context.now(), _grace_s(deployment, context)
        holder = v2.holder_of(limit, lease_id)
        if holder is not None:
            v2.claim(limit, holder, now, ttl_s)
            await context.store.save_global_limit(limit)
            return
        run_id = str(context.run.id)
        if v2.has_room(limit, run_id):
            new_id = uuid.uuid4()
            limit.holders.pop(run_id, None)
            v2.claim(limit, run_id, now, ttl_s, new_id)
            await context.store.save_global_limit(limit)
            _set_lease_id(proposed_state, new_id)
            return
        cancelled = State(
            type=StateType.CANCELLED,
            timestamp=now,
            message="Deployment concurrency slot lost during provisioning - no slots "
            "available to continue execution",
        )
        await self.reject_transition(
            state=cancelled, reason="Deployment concurrency limit reached after lease expiry."
        )


class SecureFlowConcurrencySlots(FlowRunOrchestrationRule):
    """Entering PENDING takes a slot of the deployment's limit, under a lease. A full limit
    sends the run back to Scheduled "AwaitingConcurrencySlot" (ENQUEUE) or Cancels it
    (CANCEL_NEW); a limit of 0 ABORTs. If a later rule changes the transition, the slot is
    given back."""

    FROM_STATES = all_states_except(StateType.PENDING, StateType.RUNNING, StateType.CANCELLING)
    TO_STATES = states(StateType.PENDING)

    def __init__(
        self,
        context: FlowOrchestrationContext,
        from_state_type: StateTypeOrNone,
        to_state_type: StateTypeOrNone,
    ) -> None:
        super().__init__(context, from_state_type, to_state_type)
        self._acquired: str | None = None  # the limit name, once a slot is taken

    async def before_transition(
        self,
        initial_state: State | None,
        proposed_state: State | None,
        context: FlowOrchestrationContext,
    ) -> None:
        self._acquired = None
        if (
            context.run.deployment_id is None
            or proposed_state is None
            or context.client_version in WORKER_VERSIONS_THAT_MANAGE_DEPLOYMENT_CONCURRENCY
        ):
            return
        deployment = await _deployment(context)
        if deployment is None or deployment.concurrency_limit is None:
            return
        if deployment.concurrency_limit == 0:
            await self.abort_transition(
                reason="The deployment concurrency limit is 0. The flow will deadlock if "
                "submitted again."
            )
            return
        limit = await _locked_limit(context, deployment)
        if limit is None:
            return
        run_id, now = str(context.run.id), context.now()
        if v2.has_room(limit, run_id):
            lease_id = uuid.uuid4()
            limit.holders.pop(run_id, None)
            v2.claim(limit, run_id, now, _grace_s(deployment, context), lease_id)
            await context.store.save_global_limit(limit)
            _set_lease_id(proposed_state, lease_id)
            self._acquired = limit.name
            return
        if deployment.collision_strategy == "CANCEL_NEW":
            refused = State(type=StateType.CANCELLED, timestamp=now, message=LIMIT_REACHED)
        else:
            wait = dt.timedelta(seconds=context.settings.deployment_concurrency_slot_wait_s)
            refused = State(
                type=StateType.SCHEDULED,
                name="AwaitingConcurrencySlot",
                timestamp=now,
                state_details=StateDetails(scheduled_time=now + wait),
            )
        await self.reject_transition(state=refused, reason=LIMIT_REACHED)

    async def cleanup(
        self,
        initial_state: State | None,
        validated_state: State | None,
        context: FlowOrchestrationContext,
    ) -> None:
        if self._acquired is None:
            return
        name, self._acquired = self._acquired, None
        for limit in await context.store.lock_global_limits([name]):
            if v2.release(limit, str(context.run.id), context.now()):
                await context.store.save_global_limit(limit)
        if validated_state is not None:
            _set_lease_id(validated_state, None)


class RemoveDeploymentConcurrencyLeaseForOldClientVersions(FlowRunOrchestrationRule):
    """A client too old to renew its lease keeps its slot without one (see the module
    docstring): the lease id is dropped and the slot no longer expires."""

    FROM_STATES = states(StateType.PENDING)
    TO_STATES = states(StateType.RUNNING, StateType.CANCELLING)

    async def after_transition(
        self,
        initial_state: State | None,
        validated_state: State | None,
        context: FlowOrchestrationContext,
    ) -> None:
        lease_id = _lease_id(initial_state)
        if initial_state is None or lease_id is None or renews_leases(context):
            return
        deployment = await _deployment(context)
        if deployment is None:
            return
        for limit in await context.store.lock_global_limits([deployment_limit_name(deployment.id)]):
            holder = v2.holder_of(limit, lease_id)
            if holder is not None:
                lease = limit.holders[holder]
                lease.id, lease.expires = None, lease.acquired + _NEVER
                await context.store.save_global_limit(limit)


class EnforceDeploymentConcurrencyOnLate(FlowRunOrchestrationRule):
    """A run about to be marked Late whose deployment is full and cancels new runs is
    Cancelled instead (MarkLateRunsPolicy)."""

    FROM_STATES = states(StateType.SCHEDULED)
    TO_STATES = states(StateType.SCHEDULED)

    async def before_transition(
        self,
        initial_state: State | None,
        proposed_state: State | None,
        context: FlowOrchestrationContext,
    ) -> None:
        if initial_state is None or proposed_state is None or proposed_state.name != "Late":
            return
        deployment = await _deployment(context)
        if (
            deployment is None
            or deployment.concurrency_limit is None
            or deployment.collision_strategy != "CANCEL_NEW"
        ):
            return
        limit = await _locked_limit(context, deployment)
        if limit is None or limit.active_slots < limit.limit:
            return
        cancelled = State(type=StateType.CANCELLED, timestamp=context.now(), message=LIMIT_REACHED)
        await self.reject_transition(
            state=cancelled,
            reason="Deployment concurrency limit is full and uses the CANCEL_NEW strategy.",
        )


class ReleaseFlowConcurrencySlots(FlowRunUniversalTransform):
    """A run that leaves PENDING/RUNNING/CANCELLING for anything else frees its slot: the
    state actually written decides (a retry's AwaitingRetry releases; a nullified
    transition releases nothing)."""

    async def after_transition(self, context: FlowOrchestrationContext) -> None:
        if await self.nullified_transition():
            return
        initial, validated = context.initial_state, context.validated_state
        if initial is None or initial.type not in _ACTIVE or context.run.deployment_id is None:
            return
        if validated is not None and validated.type in _ACTIVE:
            return
        name = deployment_limit_name(context.run.deployment_id)
        now = context.now()
        for limit in await context.store.lock_global_limits([name]):
            changed = v2.reclaim_expired(limit, now)
            if v2.release(limit, str(context.run.id), now) or changed:
                await context.store.save_global_limit(limit)


__all__ = [
    "EnforceDeploymentConcurrencyOnLate",
    "PreserveDeploymentConcurrencyLeaseId",
    "ReleaseFlowConcurrencySlots",
    "RemoveDeploymentConcurrencyLeaseForOldClientVersions",
    "SecureFlowConcurrencySlots",
    "ValidateDeploymentConcurrencyAtRunning",
]
