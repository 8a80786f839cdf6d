"""Task result caching (``rules/core/caching.py``): a COMPLETED state with a cache key is
cached, and a task whose result is cached completes from the cache.

Ported from Prefect's ``tests/server/orchestration/test_core_policy.py``
(reference §5.2, tests 8-10): Prefect's class and test names are kept so
``docs/parity.md`` can map them; classes named after a rule hold the extra scenarios.
"""

from __future__ import annotations

import datetime as dt

import pytest

from arbiter.rules.context import RuleSettings
from arbiter.rules.core.caching import CacheInsertion, CacheRetrieval
from arbiter.rules.engine import Orchestrator
from arbiter.rules.results import SetStateStatus, StateRejectDetails
from arbiter.rules.store import AdminStore
from arbiter.schemas.states import State, StateType, utcnow
from tests.factories import initialize_orchestration
from tests.unit.core.helpers import (
    NOW,
    apply_rules,
    frozen_orchestrator,
    other_types,
    record_cache_insertions,
    rejecting_rule,
    type_id,
)


class TestCachingBackendLogic:
    @pytest.mark.parametrize(
        ("expiration", "expected_status", "expected_name"),
        [
            (utcnow() - dt.timedelta(days=1), SetStateStatus.ACCEPT, "Running"),
            (utcnow() + dt.timedelta(days=1), SetStateStatus.REJECT, "Cached"),
            (None, SetStateStatus.REJECT, "Cached"),
        ],
        ids=["past", "future", "null"],
    )
    async def test_set_and_retrieve_unexpired_cached_states(
        self,
        store: AdminStore,
        expiration: dt.datetime | None,
        expected_status: SetStateStatus,
        expected_name: str,
    ) -> None:
        """A completed state is cached under its key and served to later runs until it expires."""
        caching_policy = [CacheInsertion, CacheRetrieval]
        details = {"cache_key": "cache-hit", "cache_expiration": expiration}
        ctx1 = await initialize_orchestration(
            store,
            "task",
            StateType.RUNNING,
            StateType.COMPLETED,
            initial_details=details,
            proposed_details=details,
        )
        ctx1 = await apply_rules(ctx1, caching_policy)
        assert ctx1.response_status == SetStateStatus.ACCEPT

        ctx2 = await initialize_orchestration(
            store,
            "task",
            StateType.PENDING,
            StateType.RUNNING,
            initial_details=details,
            proposed_details=details,
        )
        ctx2 = await apply_rules(ctx2, caching_policy)

        assert ctx2.response_status == expected_status
        assert ctx2.validated_state is not None
        assert ctx2.validated_state.name == expected_name

    async def test_cache_insertion_requires_validated_state(
        self, store: AdminStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An error raised before validation propagates unchanged through CacheInsertion's exit."""
        insertions = record_cache_insertions(store, monkeypatch)
        details = {"cache_key": "cache-hit", "cache_expiration": utcnow() - dt.timedelta(days=1)}
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.RUNNING,
            StateType.COMPLETED,
            initial_details=details,
            proposed_details=details,
        )
        intended = (StateType.RUNNING, StateType.COMPLETED)

        async def fail_inside_the_rule() -> None:
            async with CacheInsertion(ctx, *intended):
                raise ValueError("this better be mine")

        with pytest.raises(ValueError, match="this better be mine"):
            await fail_inside_the_rule()

        assert insertions == []

    @pytest.mark.parametrize("proposed_state_type", other_types(StateType.COMPLETED), ids=type_id)
    async def test_only_cache_completed_states(
        self, store: AdminStore, proposed_state_type: StateType
    ) -> None:
        """A non-COMPLETED state with a cache key is written but never cached."""
        caching_policy = [CacheInsertion, CacheRetrieval]
        details = {"cache_key": "cache-hit"}
        ctx1 = await initialize_orchestration(
            store,
            "task",
            StateType.RUNNING,
            proposed_state_type,
            initial_details=details,
            proposed_details=details,
        )
        ctx1 = await apply_rules(ctx1, caching_policy)
        assert ctx1.response_status == SetStateStatus.ACCEPT

        ctx2 = await initialize_orchestration(
            store,
            "task",
            StateType.PENDING,
            StateType.RUNNING,
            initial_details=details,
            proposed_details=details,
        )
        ctx2 = await apply_rules(ctx2, caching_policy)

        assert ctx2.response_status == SetStateStatus.ACCEPT


class TestCacheRetrieval:
    async def _cache_completed_state(
        self, store: AdminStore, key: str, data: object = None
    ) -> State:
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.RUNNING,
            StateType.COMPLETED,
            proposed_details={"cache_key": key},
            proposed_state_data={"value": 42} if data is None else data,
        )
        ctx = await apply_rules(ctx, [CacheInsertion])
        assert ctx.validated_state is not None
        return ctx.validated_state

    async def test_cache_hit_is_a_fresh_copy_named_cached(self, store: AdminStore) -> None:
        """A hit rejects into a new COMPLETED "Cached" state stamped now, with the cached data."""
        cached = await self._cache_completed_state(store, "key")
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.PENDING,
            StateType.RUNNING,
            proposed_details={"cache_key": "key"},
            orchestrator=frozen_orchestrator(),
        )

        ctx = await apply_rules(ctx, [CacheRetrieval])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.response_details == StateRejectDetails(reason="Retrieved state from cache")
        hit = ctx.validated_state
        assert hit is not None
        assert (hit.type, hit.name, hit.data) == (StateType.COMPLETED, "Cached", {"value": 42})
        assert hit.id != cached.id
        assert hit.timestamp == NOW

    async def test_refresh_cache_bypasses_the_lookup(self, store: AdminStore) -> None:
        """A proposal with refresh_cache runs even though a cached state exists."""
        await self._cache_completed_state(store, "key")
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.PENDING,
            StateType.RUNNING,
            proposed_details={"cache_key": "key", "refresh_cache": True},
        )

        ctx = await apply_rules(ctx, [CacheRetrieval])

        assert ctx.response_status == SetStateStatus.ACCEPT
        assert ctx.validated_state is not None
        assert ctx.validated_state.name == "Running"

    async def test_newest_cache_entry_wins(self, store: AdminStore) -> None:
        """Of two live entries under one key, the most recently cached one is served."""
        await self._cache_completed_state(store, "key", data={"value": "oldest"})
        await self._cache_completed_state(store, "key", data={"value": "newest"})
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.PENDING,
            StateType.RUNNING,
            proposed_details={"cache_key": "key"},
        )

        ctx = await apply_rules(ctx, [CacheRetrieval])

        assert ctx.validated_state is not None
        assert ctx.validated_state.data == {"value": "newest"}


class TestCacheInsertion:
    async def test_cache_key_exceeding_maximum_length_rejects_with_the_same_state(
        self, store: AdminStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An over-long key is REJECTed with the proposed state itself, which is still written."""
        insertions = record_cache_insertions(store, monkeypatch)
        long_key = "k" * 5000
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.RUNNING,
            StateType.COMPLETED,
            proposed_details={"cache_key": long_key},
        )
        assert ctx.proposed_state is not None
        proposed_id = ctx.proposed_state.id

        ctx = await apply_rules(ctx, [CacheInsertion])

        assert ctx.response_status == SetStateStatus.REJECT
        assert ctx.response_details == StateRejectDetails(
            reason="Cache key exceeded maximum allowed length of 2000 characters."
        )
        assert ctx.validated_state is not None
        assert (ctx.validated_state.id, ctx.validated_state.type) == (
            proposed_id,
            StateType.COMPLETED,
        )
        # As in Prefect, the rule stays valid after its same-type reject and caches the key.
        assert [entry.cache_key for entry in insertions] == [long_key]
        cached = await store.find_cached_state(long_key, utcnow())
        assert cached is not None
        assert cached.id == proposed_id

    async def test_maximum_cache_key_length_comes_from_settings(self, store: AdminStore) -> None:
        """The limit is ``settings.max_cache_key_length``; a key at the limit is accepted."""
        orchestrator = Orchestrator(settings=RuleSettings(max_cache_key_length=10))
        at_limit = await initialize_orchestration(
            store,
            "task",
            StateType.RUNNING,
            StateType.COMPLETED,
            proposed_details={"cache_key": "k" * 10},
            orchestrator=orchestrator,
        )
        over_limit = await initialize_orchestration(
            store,
            "task",
            StateType.RUNNING,
            StateType.COMPLETED,
            proposed_details={"cache_key": "k" * 11},
            orchestrator=orchestrator,
        )

        at_limit = await apply_rules(at_limit, [CacheInsertion])
        over_limit = await apply_rules(over_limit, [CacheInsertion])

        assert at_limit.response_status == SetStateStatus.ACCEPT
        assert over_limit.response_status == SetStateStatus.REJECT
        assert over_limit.response_details == StateRejectDetails(
            reason="Cache key exceeded maximum allowed length of 10 characters."
        )

    async def test_nothing_is_cached_when_a_later_rule_changes_the_transition(
        self, store: AdminStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A fizzled CacheInsertion inserts no entry."""
        insertions = record_cache_insertions(store, monkeypatch)
        ctx = await initialize_orchestration(
            store,
            "task",
            StateType.RUNNING,
            StateType.COMPLETED,
            proposed_details={"cache_key": "key"},
        )

        ctx = await apply_rules(ctx, [CacheInsertion, rejecting_rule(StateType.FAILED)])

        assert ctx.response_status == SetStateStatus.REJECT
        assert insertions == []
