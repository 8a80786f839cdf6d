"""Task tag concurrency (Prefect's V1 tag limits).

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
"""

from __future__ import annotations

from rules.base import (
    ALL_ORCHESTRATION_STATES,
    StateTypeOrNone,
    TaskRunOrchestrationRule,
    TaskRunUniversalTransform,
    states,
)
from rules.context import TaskOrchestrationContext
from rules.store import Store, TagLimit
from schemas.states import State, StateType

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

    async def before_transition(
        self,
        initial_state: State | None,
        proposed_state: State | None,
        context: TaskOrchestrationContext,
    ) -> None:
        self._claimed = []
        if not context.run.tags:
            return
        run_id = str(context.run.id)
        for limit in await context.store.lock_tag_limits(context.run.tags):
            if limit.limit == 0:
                await self._release_claimed(context.store, run_id)
                await self.abort_transition(
                    reason=f'The concurrency limit on tag "{limit.tag}" is 0 and will deadlock '
                    "if the task tries to run again."
                )
                return
            if len(limit.active_slots) >= limit.limit:
                await self._release_claimed(context.store, run_id)
                await self.delay_transition(
                    context.settings.tag_concurrency_slot_wait_s,
                    reason=f"Concurrency limit for the {limit.tag} tag has been reached",
                )
                return
            if run_id not in limit.active_slots:
                limit.active_slots.append(run_id)
                await context.store.save_tag_limit(limit)
                self._claimed.append(limit)

    async def cleanup(
        self,
        initial_state: State | None,
        validated_state: State | None,
        context: TaskOrchestrationContext,
    ) -> None:
        if not self._claimed:
            return
        tags = [limit.tag for limit in self._claimed]
        self._claimed = []
        await _remove_holder(context.store, tags, str(context.run.id))

    async def _release_claimed(self, store: Store, run_id: str) -> None:
        """Give back the slots claimed so far in this call (the limits are still locked)."""
        for limit in self._claimed:
            await _drop_holder(store, limit, run_id)
        self._claimed = []


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
        if validated is None or validated.type in _KEEPS_SLOTS or not context.run.tags:
            return
        await _remove_holder(context.store, context.run.tags, str(context.run.id))


async def _remove_holder(store: Store, tags: list[str], run_id: str) -> None:
    """Remove ``run_id`` from the active slots of these tags' limits (locked in tag order)."""
    for limit in await store.lock_tag_limits(tags):
        await _drop_holder(store, limit, run_id)


async def _drop_holder(store: Store, limit: TagLimit, run_id: str) -> None:
    """Take ``run_id`` out of a locked limit's active slots, if it holds one there."""
    if run_id in limit.active_slots:
        limit.active_slots.remove(run_id)
        await store.save_tag_limit(limit)
