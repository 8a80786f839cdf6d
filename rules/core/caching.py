"""Task result caching: reuse a cached COMPLETED state instead of running again.

The cache maps a ``cache_key`` (from the proposed state's details) to a state
that was written with that key. Entries are read when a task proposes RUNNING
and written when it reaches COMPLETED; both go through ``context.store``, so
an insertion rolls back with the transition that made it.
"""

from __future__ import annotations

from arbiter.rules.base import ALL_ORCHESTRATION_STATES, TaskRunOrchestrationRule, states
from arbiter.rules.context import TaskOrchestrationContext
from arbiter.schemas.states import State, StateType


class CacheRetrieval(TaskRunOrchestrationRule):
    """A task whose result is cached completes from the cache instead of running.

    On a live cache hit the RUNNING proposal is rejected into a fresh copy of
    the cached state, named "Cached" (new id, stamped now, same type and data).
    This rule sits before SecureTaskConcurrencySlots in every policy, so a
    cache hit never takes a tag slot it would have to give back. A proposal
    with ``refresh_cache`` set skips the lookup (its result is cached anew).
    """

    FROM_STATES = ALL_ORCHESTRATION_STATES
    TO_STATES = states(StateType.RUNNING)

    async def before_transition(
        self,
        initial_state: State | None,
        proposed_state: State | None,
        context: TaskOrchestrationContext,
    ) -> None:
        if proposed_state is None:
            return
        details = proposed_state.state_details
        if not details.cache_key or details.refresh_cache:
            return
        now = context.now()
        cached = await context.store.find_cached_state(details.cache_key, now)
        if cached is None:
            return
        hit = cached.fresh_copy(now)
        hit.name = "Cached"
        await self.reject_transition(state=hit, reason="Retrieved state from cache")


class CacheInsertion(TaskRunOrchestrationRule):
    """A COMPLETED state carrying a cache key is cached once it is written.

    The entry is inserted in the after-hook, i.e. only when the COMPLETED
    state was actually validated in this transaction; a transition that was
    changed by a later rule fizzles this rule and caches nothing. The
    after-hook tolerates a missing validated state, which happens when an
    exception escapes the rule stack before validation.

    A key longer than ``settings.max_cache_key_length`` is reported with a
    REJECT that reuses the very proposed state: the state is still written
    (its type is unchanged, so this rule and the later ones stay valid) and the
    client learns that its key is too long. As in Prefect, the entry is still
    inserted.
    """

    FROM_STATES = ALL_ORCHESTRATION_STATES
    TO_STATES = states(StateType.COMPLETED)

    async def before_transition(
        self,
        initial_state: State | None,
        proposed_state: State | None,
        context: TaskOrchestrationContext,
    ) -> None:
        if proposed_state is None:
            return
        cache_key = proposed_state.state_details.cache_key
        max_length = context.settings.max_cache_key_length
        if cache_key is not None and len(cache_key) > max_length:
            await self.reject_transition(
                state=proposed_state,
                reason=f"Cache key exceeded maximum allowed length of {max_length} characters.",
            )

    async def after_transition(
        self,
        initial_state: State | None,
        validated_state: State | None,
        context: TaskOrchestrationContext,
    ) -> None:
        if validated_state is None:
            return
        details = validated_state.state_details
        if details.cache_key:
            await context.store.insert_cache_entry(
                details.cache_key, details.cache_expiration, validated_state.id
            )
