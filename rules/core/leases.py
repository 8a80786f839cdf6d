"""An executor's explicit lease renewal: a run that holds slots and works longer than their
lease without a transition renews them (a proposal with ``renew_leases``). Nothing is
written but the leases: no state, no rule runs."""

from __future__ import annotations

import datetime as dt

from arbiter.rules.context import RuleSettings
from arbiter.rules.core import global_limits as v2
from arbiter.rules.core.concurrency import reclaim_expired_tag_slots
from arbiter.rules.store import Store, deployment_limit_name
from arbiter.schemas.runs import FlowRun, TaskRun

__all__ = ["renew_run_slots"]


async def renew_run_slots(
    store: Store, run: FlowRun | TaskRun, now: dt.datetime, settings: RuleSettings
) -> int:
    """Push back the expiry of every slot ``run`` holds (tag, global, deployment), each
    limit locked as a claimer locks it; how many leases were renewed. A slot whose lease
    already expired is not given back: the run must propose RUNNING again."""
    holder = str(run.id)
    renewed = 0
    if isinstance(run, TaskRun):
        names = [v2.TAG_PREFIX + tag for tag in run.tags]
        for limit in await store.lock_global_limits(names):
            changed = v2.reclaim_expired(limit, now)
            if v2.renew(limit, holder, now, settings.slot_lease_ttl_s):
                renewed += 1
                changed = True
            if changed:
                await store.save_global_limit(limit)
        expires = now + dt.timedelta(seconds=settings.slot_lease_ttl_s)
        for tag_limit in await store.lock_tag_limits(run.tags):
            changed = reclaim_expired_tag_slots(tag_limit, now)
            if holder in tag_limit.active_slots:
                tag_limit.expires[holder] = expires
                renewed += 1
                changed = True
            if changed:
                await store.save_tag_limit(tag_limit)
        return renewed
    if run.deployment_id is None:
        return 0
    deployment = await store.read_deployment(run.deployment_id)
    if deployment is None or deployment.concurrency_limit is None:
        return 0
    grace = deployment.grace_period_seconds or settings.deployment_lease_duration_s
    for limit in await store.lock_global_limits([deployment_limit_name(deployment.id)]):
        changed = v2.reclaim_expired(limit, now)
        if v2.renew(limit, holder, now, grace):
            renewed += 1
            changed = True
        if changed:
            await store.save_global_limit(limit)
    return renewed
