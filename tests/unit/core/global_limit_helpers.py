"""Helpers shared by the global (V2) limit scenarios (``test_global_limit_*.py``): a task
run's transition through ``SecureTaskConcurrencySlots`` and ``ReleaseTaskConcurrencySlots``
at a frozen time, the same run finishing, and a global limit read by name. Like
``helpers.py`` they arrange and observe the store through its public interface only, so
each scenario runs on both stores."""

from __future__ import annotations

import datetime as dt

from arbiter.rules.context import TaskOrchestrationContext
from arbiter.rules.core.concurrency import ReleaseTaskConcurrencySlots, SecureTaskConcurrencySlots
from arbiter.rules.policy import RuleClass
from arbiter.rules.store import AdminStore, GlobalLimit
from arbiter.schemas.states import StateType
from tests.factories import initialize_orchestration
from tests.unit.core.helpers import NOW, apply_rules, frozen_orchestrator

RULES: list[RuleClass] = [SecureTaskConcurrencySlots, ReleaseTaskConcurrencySlots]


async def run_to(
    store: AdminStore,
    tags: list[str],
    proposed: StateType = StateType.RUNNING,
    initial: StateType = StateType.PENDING,
    now: dt.datetime = NOW,
    **options: object,
) -> TaskOrchestrationContext:
    ctx = await initialize_orchestration(
        store,
        "task",
        initial,
        proposed,
        run_tags=tags,
        orchestrator=frozen_orchestrator(now),
        **options,
    )
    return await apply_rules(ctx, RULES)


async def finish(
    store: AdminStore, ctx: TaskOrchestrationContext, now: dt.datetime = NOW
) -> TaskOrchestrationContext:
    """The same run, RUNNING → COMPLETED."""
    done = await initialize_orchestration(
        store,
        "task",
        StateType.RUNNING,
        StateType.COMPLETED,
        run_override=ctx.run,
        orchestrator=frozen_orchestrator(now),
    )
    return await apply_rules(done, RULES)


async def limit_named(store: AdminStore, name: str) -> GlobalLimit:
    [found] = [limit for limit in await store.list_global_limits() if limit.name == name]
    return found


async def active(store: AdminStore, name: str) -> int:
    return (await limit_named(store, name)).active_slots
