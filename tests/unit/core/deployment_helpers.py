"""Helpers shared by the deployment concurrency scenarios (``test_deployment_*.py``): a
deployment with a concurrency limit, the global limit that holds its slots, a flow run's
transition through chosen rules (at a current client version unless told otherwise), and
the lease id a transition leaves on the run's state. Like ``helpers.py`` they arrange and
observe the store through its public interface only, so each scenario runs on both stores."""

from __future__ import annotations

import uuid

from arbiter.rules.context import FlowOrchestrationContext, RuleSettings
from arbiter.rules.core.deployments import ReleaseFlowConcurrencySlots, SecureFlowConcurrencySlots
from arbiter.rules.engine import Orchestrator
from arbiter.rules.policy import RuleClass
from arbiter.rules.store import AdminStore, Deployment, GlobalLimit, deployment_limit_name
from arbiter.schemas.runs import FlowRun
from arbiter.schemas.states import StateType
from tests.factories import initialize_orchestration
from tests.unit.core.helpers import NOW, apply_rules

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
