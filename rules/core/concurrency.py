"""Task tag concurrency: Prefect's V1 tag limits and global (V2) ``tag:<tag>`` limits.

A tag limit allows at most ``limit`` task runs carrying that tag to be
RUNNING at once. A run holds a slot on a tag while its id is in the limit's
``active_slots``, which is a set: a run never holds two slots on one tag.
Slots are claimed on entering RUNNING (SecureTaskConcurrencySlots) and given
back once the run has left RUNNING for anything but CANCELLING
(ReleaseTaskConcurrencySlots). Limits are read with ``store.lock_tag_limits``,
which locks them in tag order, so two runs claiming overlapping tags queue
behind each other instead of deadlocking or both taking the last slot.

Deliberate deviation from Prefect (reference §6, note 8): Prefect keeps
processing later tags after a tag blocks the transition, so a proposal that
ends in WAIT or ABORT can still claim the later tags, and nothing gives those
slots back (the rule is invalid on exit, so its cleanup does not run). Such a
run holds slots without running, and enough of them starve the tag. Here,
when a tag blocks the transition (WAIT on a full limit, ABORT on a zero
limit), every tag already claimed in this call is released and no further
tag is processed: a blocked proposal never holds a slot. A consequence is that
the first blocking tag decides the outcome (a later WAIT no longer overwrites
an earlier ABORT). The cleanup on fizzle is Prefect's.

"Claimed in this call" means the slots this call added, for the rollback and
for the cleanup alike. A run that already held a slot on a tag (a RUNNING →
RUNNING restart) keeps it when the call is blocked or fizzles; Prefect would
drop it, letting another run take the slot while this one keeps running. If
the run did leave RUNNING, ReleaseTaskConcurrencySlots frees the slot.

Global (V2) limits named ``tag:<tag>`` come first, as in Prefect: an active one decides
for its tag, and V1 limits decide only the tags without one (Prefect's quirk of reading
every V1 row as soon as one remains, reference §6 note 9, is not kept). The V2 slots are
taken in the orchestration transaction under leases (``rules.core.global_limits``), not
in a transaction of their own as Prefect does, so a rolled-back proposal takes nothing.
A blocked proposal holds nothing here either: a full V1 tag gives back the V2 slots taken
in the same call.
"""

from __future__ import annotations

import datetime as dt

from arbiter.rules.base import (
    ALL_ORCHESTRATION_STATES,
    StateTypeOrNone,
    TaskRunOrchestrationRule,
    TaskRunUniversalTransform,
    states,
)
from arbiter.rules.context import TaskOrchestrationContext
from arbiter.rules.core import global_limits as v2
from arbiter.rules.store import Store, TagLimit
from arbiter.schemas.states import State, StateType

_KEEPS_SLOTS = states(StateType.RUNNING, StateType.CANCELLING)


class SecureTaskConcurrencySlots(TaskRunOrchestrationRule):
    """No more than ``limit`` runs of a tag are RUNNING at once.

    Two runs racing for the last slot of a tag are serialised by the tag lock;
    the second finds the limit full and is told to WAIT
    (``settings.tag_concurrency_slot_wait_s``). A limit of 0 ABORTs instead, as
    waiting could never end. A blocked proposal releases what it claimed in
    this call and holds nothing (see the module docstring). If a later rule
    changes the transition, ``cleanup`` releases the claimed slots.
    """

    FROM_STATES = ALL_ORCHESTRATION_STATES
    TO_STATES = states(StateType.RUNNING)

    def __init__(
        self,
        context: TaskOrchestrationContext,
        from_state_type: StateTypeOrNone,
        to_state_type: StateTypeOrNone,
    ) -> None:
        super().__init__(context, from_state_type, to_state_type)
        self._claimed: list[TagLimit] = []
        self._leased: list[str] = []  # global limits whose slot this call took

    async def before_transition(
        self,
        initial_state: State | None,
        proposed_state: State | None,
        context: TaskOrchestrationContext,
    ) -> None:
        self._claimed = []
        self._leased = []
        if not context.run.tags:
            return
        run_id = str(context.run.id)
        governed = await self._secure_global(context, run_id)
        if governed is None:
            return
        v1_tags = [tag for tag in context.run.tags if tag not in governed]
        if not v1_tags:
            return
        now = context.now()
        for limit in await context.store.lock_tag_limits(v1_tags):
            if reclaim_expired_tag_slots(limit, now):
                await context.store.save_tag_limit(limit)
            if limit.limit == 0:
                await self._release_claimed(context, run_id)
                await self.abort_transition(
                    reason=f'The concurrency limit on tag "{limit.tag}" is 0 and will deadlock '
                    "if the task tries to run again."
                )
                return
            if len(limit.active_slots) >= limit.limit:
                await self._release_claimed(context, run_id)
                await self.delay_transition(
                    context.settings.tag_concurrency_slot_wait_s,
                    reason=f"Concurrency limit for the {limit.tag} tag has been reached",
                )
                return
            expires = now + dt.timedelta(seconds=context.settings.slot_lease_ttl_s)
            if run_id not in limit.active_slots:
                limit.active_slots.append(run_id)
                limit.expires[run_id] = expires
                await context.store.save_tag_limit(limit)
                self._claimed.append(limit)
            elif limit.expires.get(run_id) != expires:
                limit.expires[run_id] = expires  # a restart renews the lease
                await context.store.save_tag_limit(limit)

    async def _secure_global(
        self, context: TaskOrchestrationContext, run_id: str
    ) -> set[str] | None:
        """Take a leased slot of every active ``tag:`` global limit of the run; the tags
        they govern, or None when the transition was blocked (ABORT on a zero limit, WAIT
        on a full one: nothing taken)."""
        names = [v2.TAG_PREFIX + tag for tag in context.run.tags]
        limits = await context.store.lock_global_limits(names)
        now = context.now()
        for limit in limits:
            if v2.reclaim_expired(limit, now):
                await context.store.save_global_limit(limit)
        active = [limit for limit in limits if limit.active]
        if not active:
            return set()
        for limit in active:
            if limit.limit == 0:
                await self.abort_transition(
                    reason=f'The concurrency limit on tag "{v2.tag_of(limit)}" is 0 and will '
                    "deadlock if the task tries to run again."
                )
                return None
        full = [limit for limit in active if not v2.has_room(limit, run_id)]
        if full:
            max_wait_s = context.settings.tag_concurrency_slot_wait_s
            for limit in full:
                v2.deny(limit, now, max_wait_s)
                await context.store.save_global_limit(limit)
            tags = ", ".join(v2.tag_of(limit) for limit in active)
            await self.delay_transition(
                v2.wait_seconds(v2.blocking(full), max_wait_s),
                reason=f"Concurrency limit reached for tags: {tags}",
            )
            return None
        for limit in active:
            if v2.claim(limit, run_id, now, context.settings.slot_lease_ttl_s):
                self._leased.append(limit.name)
            await context.store.save_global_limit(limit)
        return {v2.tag_of(limit) for limit in active}

    async def cleanup(
        self,
        initial_state: State | None,
        validated_state: State | None,
        context: TaskOrchestrationContext,
    ) -> None:
        run_id = str(context.run.id)
        if self._leased:
            leased, self._leased = self._leased, []
            await _release_global(context, leased, run_id)
        if not self._claimed:
            return
        tags = [limit.tag for limit in self._claimed]
        self._claimed = []
        await _remove_holder(context.store, tags, run_id)

    async def _release_claimed(self, context: TaskOrchestrationContext, run_id: str) -> None:
        """Give back the slots claimed so far in this call (the limits are still locked)."""
        for limit in self._claimed:
            await _drop_holder(context.store, limit, run_id)
        self._claimed = []
        if self._leased:
            leased, self._leased = self._leased, []
            await _release_global(context, leased, run_id)


class ReleaseTaskConcurrencySlots(TaskRunUniversalTransform):
    """A run that has left RUNNING (for anything but CANCELLING) holds no tag slot.

    It runs on every task transition, in every task policy, and looks at the
    state actually written: a REJECT that writes a replacement state (a retry's
    AwaitingRetry, a "Cached" completion) releases too, while a nullified
    transition (WAIT, ABORT, null REJECT) writes nothing and releases nothing.
    CANCELLING keeps the slot until the run is really CANCELLED. Limits created
    after the run started never held it, so releasing them is a no-op.
    """

    async def after_transition(self, context: TaskOrchestrationContext) -> None:
        if await self.nullified_transition():
            return
        validated = context.validated_state
        if validated is None or not context.run.tags:
            return
        run_id = str(context.run.id)
        names = [v2.TAG_PREFIX + tag for tag in context.run.tags]
        if validated.type in _KEEPS_SLOTS:
            await _renew_global(context, names, run_id)
            await _renew_tags(context, run_id)
            return
        await _release_global(context, names, run_id)
        await _remove_holder(context.store, context.run.tags, run_id)


async def _release_global(context: TaskOrchestrationContext, names: list[str], run_id: str) -> None:
    """Free ``run_id``'s leased slots on these global limits (locked in name order)."""
    now = context.now()
    for limit in await context.store.lock_global_limits(names):
        changed = v2.reclaim_expired(limit, now)
        if v2.release(limit, run_id, now) or changed:
            await context.store.save_global_limit(limit)


async def _renew_global(context: TaskOrchestrationContext, names: list[str], run_id: str) -> None:
    """An accepted transition of a holder that keeps its slots renews their leases."""
    now = context.now()
    ttl_s = context.settings.slot_lease_ttl_s
    for limit in await context.store.lock_global_limits(names):
        changed = v2.reclaim_expired(limit, now)
        if v2.renew(limit, run_id, now, ttl_s) or changed:
            await context.store.save_global_limit(limit)


def reclaim_expired_tag_slots(limit: TagLimit, now: dt.datetime) -> bool:
    """Free the slots whose lease expired (their holder never came back); whether any."""
    expired = [holder for holder, at in limit.expires.items() if at <= now]
    for holder in expired:
        del limit.expires[holder]
        if holder in limit.active_slots:
            limit.active_slots.remove(holder)
    return bool(expired)


async def _renew_tags(context: TaskOrchestrationContext, run_id: str) -> None:
    """An accepted transition of a holder that keeps its tag slots renews their leases."""
    now = context.now()
    expires = now + dt.timedelta(seconds=context.settings.slot_lease_ttl_s)
    for limit in await context.store.lock_tag_limits(context.run.tags):
        changed = reclaim_expired_tag_slots(limit, now)
        if run_id in limit.active_slots and limit.expires.get(run_id) != expires:
            limit.expires[run_id] = expires
            changed = True
        if changed:
            await context.store.save_tag_limit(limit)


async def _remove_holder(store: Store, tags: list[str], run_id: str) -> None:
    """Remove ``run_id`` from the active slots of these tags' limits (locked in tag order)."""
    for limit in await store.lock_tag_limits(tags):
        await _drop_holder(store, limit, run_id)


async def _drop_holder(store: Store, limit: TagLimit, run_id: str) -> None:
    """Take ``run_id`` out of a locked limit's active slots, if it holds one there."""
    if run_id in limit.active_slots:
        limit.active_slots.remove(run_id)
        limit.expires.pop(run_id, None)
        await store.save_tag_limit(limit)
