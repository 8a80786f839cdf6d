"""PgStore's task cache and tag concurrency limits against a real PostgreSQL: the newest live
COMPLETED entry wins, limits list and lock in code-point order, row locks hold, and a negative
limit is refused permanently."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.rules.errors import StoreError
from arbiter.rules.store import TagLimit
from arbiter.schemas import State, StateType, TaskRun
from arbiter.worker.db.store import PgStore
from tests.factories import create_task_run, make_state
from tests.integration.pg_helpers import NOW, committed, impatient

pytestmark = pytest.mark.integration


@pytest.fixture
async def committed_tag(pg_engine: AsyncEngine) -> AsyncIterator[str]:
    tag = f"tag-{uuid.uuid4().hex[:8]}"
    async with committed(pg_engine) as store:
        await store.upsert_tag_limit(tag, 1)
    yield tag
    async with committed(pg_engine) as store:
        await store.delete_tag_limit(tag)


class TestCache:
    async def cached(
        self,
        store: PgStore,
        run: TaskRun,
        key: str,
        expiration: dt.datetime | None,
        state_type: StateType = StateType.COMPLETED,
        name: str | None = None,
    ) -> State:
        state = make_state(state_type, name=name, timestamp=NOW)
        await store.insert_state("task_run", run, state)
        await store.insert_cache_entry(key, expiration, state.id)
        return state

    async def test_expiration_past_future_and_none(self, pg_store: PgStore) -> None:
        """An entry is live while its expiration is None or after now."""
        run = await create_task_run(pg_store, flow_run_id=None)
        key = uuid.uuid4().hex
        await self.cached(pg_store, run, f"{key}-past", NOW - dt.timedelta(seconds=1))
        await self.cached(pg_store, run, f"{key}-now", NOW)
        future = await self.cached(pg_store, run, f"{key}-future", NOW + dt.timedelta(seconds=1))
        forever = await self.cached(pg_store, run, f"{key}-forever", None)
        assert await pg_store.find_cached_state(f"{key}-past", NOW) is None
        assert await pg_store.find_cached_state(f"{key}-now", NOW) is None
        assert await pg_store.find_cached_state(f"{key}-future", NOW) == future
        assert await pg_store.find_cached_state(f"{key}-forever", NOW) == forever
        assert await pg_store.find_cached_state(f"{key}-unknown", NOW) is None

    async def test_newest_live_completed_entry_wins(self, pg_store: PgStore) -> None:
        """The newest entry wins; expired entries and non-COMPLETED states are skipped."""
        run = await create_task_run(pg_store, flow_run_id=None)
        key = uuid.uuid4().hex
        await self.cached(pg_store, run, key, None, name="Oldest")
        middle = await self.cached(pg_store, run, key, NOW + dt.timedelta(days=1), name="Middle")
        await self.cached(pg_store, run, key, NOW - dt.timedelta(days=1), name="Expired")
        await self.cached(pg_store, run, key, None, state_type=StateType.FAILED)
        assert await pg_store.find_cached_state(key, NOW) == middle

    async def test_entry_without_a_state_is_skipped(self, pg_store: PgStore) -> None:
        """An entry pointing at no state is ignored, as in the in-memory store."""
        run = await create_task_run(pg_store, flow_run_id=None)
        key = uuid.uuid4().hex
        state = await self.cached(pg_store, run, key, None)
        await pg_store.insert_cache_entry(key, None, uuid.uuid4())
        assert await pg_store.find_cached_state(key, NOW) == state

    async def test_cached_state_is_a_fresh_object(self, pg_store: PgStore) -> None:
        """Two lookups return equal but distinct states."""
        run = await create_task_run(pg_store, flow_run_id=None)
        key = uuid.uuid4().hex
        await self.cached(pg_store, run, key, None)
        first = await pg_store.find_cached_state(key, NOW)
        second = await pg_store.find_cached_state(key, NOW)
        assert first == second
        assert first is not second


class TestTagLimits:
    async def test_upsert_list_and_delete(self, pg_store: PgStore) -> None:
        """Limits list in code-point order; delete tells whether there was one."""
        prefix = uuid.uuid4().hex[:8]
        for tag, size in [("b", 2), ("B", 1), ("é", 3), ("a", 0)]:
            await pg_store.upsert_tag_limit(f"{prefix}-{tag}", size)
        mine = [t for t in await pg_store.list_tag_limits() if t.tag.startswith(prefix)]
        assert mine == [
            TagLimit(f"{prefix}-B", 1),
            TagLimit(f"{prefix}-a", 0),
            TagLimit(f"{prefix}-b", 2),
            TagLimit(f"{prefix}-é", 3),
        ]
        assert await pg_store.delete_tag_limit(f"{prefix}-b")
        assert not await pg_store.delete_tag_limit(f"{prefix}-b")
        assert f"{prefix}-b" not in {t.tag for t in await pg_store.list_tag_limits()}

    async def test_upsert_keeps_active_slots(self, pg_store: PgStore) -> None:
        """Resizing a limit keeps the slots already held."""
        tag = uuid.uuid4().hex
        await pg_store.upsert_tag_limit(tag, 1)
        [limit] = await pg_store.lock_tag_limits([tag])
        limit.active_slots.append("run-1")
        await pg_store.save_tag_limit(limit)
        await pg_store.upsert_tag_limit(tag, 5)
        assert await pg_store.lock_tag_limits([tag]) == [TagLimit(tag, 5, ["run-1"])]

    async def test_lock_tag_limits_sorted_deduplicated_existing_only(
        self, pg_store: PgStore
    ) -> None:
        """Only existing limits come back, once each, in code-point order, as copies."""
        prefix = uuid.uuid4().hex[:8]
        for tag in ("z", "a", "M"):
            await pg_store.upsert_tag_limit(f"{prefix}-{tag}", 1)
        wanted = [f"{prefix}-{t}" for t in ("z", "missing", "a", "z", "M")]
        limits = await pg_store.lock_tag_limits(wanted)
        assert [t.tag for t in limits] == [f"{prefix}-M", f"{prefix}-a", f"{prefix}-z"]
        limits[0].active_slots.append("not saved")
        assert (await pg_store.lock_tag_limits([f"{prefix}-M"]))[0].active_slots == []
        assert await pg_store.lock_tag_limits([]) == []

    async def test_save_tag_limit_of_a_missing_tag_does_nothing(self, pg_store: PgStore) -> None:
        """Saving slots of a deleted limit writes nothing, as in the in-memory store."""
        tag = uuid.uuid4().hex
        await pg_store.save_tag_limit(TagLimit(tag, 1, ["run"]))
        assert await pg_store.lock_tag_limits([tag]) == []

    async def test_lock_tag_limits_holds_the_row_locks(
        self, pg_engine: AsyncEngine, committed_tag: str
    ) -> None:
        """A second claimer of a locked limit waits; its lock timeout is retryable."""
        async with committed(pg_engine) as holder:
            assert len(await holder.lock_tag_limits([committed_tag])) == 1
            async with impatient(pg_engine) as waiter:
                with pytest.raises(StoreError) as caught:
                    await waiter.lock_tag_limits(["another-tag", committed_tag])
                assert caught.value.retryable

    async def test_negative_limit_is_a_permanent_error(self, pg_store: PgStore) -> None:
        """The check constraint refuses a negative limit: not retryable."""
        with pytest.raises(StoreError) as caught:
            await pg_store.upsert_tag_limit(uuid.uuid4().hex, -1)
        assert not caught.value.retryable
        assert "23514" in str(caught.value)
