"""Leased slots of global limits on real services: an expired lease is freed once however
many sweepers race for it, and a holder that vanished loses its slot to a waiter within
the lease's TTL."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.rules.store import Lease
from arbiter.schemas import OutcomeStatus, ProposedState, StateType, TaskRunSpec
from arbiter.schemas.states import utcnow
from arbiter.worker.client import ArbiterClient
from arbiter.worker.db.engine import create_engine
from arbiter.worker.db.store import PgStore
from arbiter.worker.db.transaction import store_transaction
from arbiter.worker.settings import Settings
from devtools.devservices import Services
from tests.fixtures.services import isolated_settings, running_worker
from tests.integration.test_parked_waits import wait_parked
from tests.integration.test_sweepers import started_sweeper, stopped
from tests.integration.test_worker_roundtrip import history_of

pytestmark = pytest.mark.integration


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    created = create_engine(settings.database_url, pool_size=4)
    try:
        yield created
    finally:
        await created.dispose()


async def expired_leases_in_the_database(engine: AsyncEngine, now: dt.datetime) -> int:
    async with engine.connect() as conn:
        limits = await PgStore(conn).list_global_limits()
    return sum(1 for limit in limits for lease in limit.holders.values() if lease.expires <= now)


async def test_two_sweepers_free_each_expired_lease_once(
    settings: Settings, engine: AsyncEngine
) -> None:
    """60 limits, each with one lease expired a minute ago and one live: two sweepers
    reclaiming at once free 60 slots between them, each limit keeps its live holder."""
    prefix = f"sweep-{uuid.uuid4().hex[:8]}"
    now = utcnow()
    names = [f"{prefix}-{i:02}" for i in range(60)]
    live = {name: str(uuid.uuid4()) for name in names}
    async with store_transaction(engine) as store:
        for name in names:
            await store.upsert_global_limit(name, 2)
        for limit in await store.lock_global_limits(names):
            past = now - dt.timedelta(minutes=2)
            limit.holders = {
                str(uuid.uuid4()): Lease(past, now - dt.timedelta(minutes=1)),
                live[limit.name]: Lease(now, now + dt.timedelta(hours=1)),
            }
            await store.save_global_limit(limit)
    expired = await expired_leases_in_the_database(engine, utcnow())
    assert expired >= 60

    sweepers = [await started_sweeper(settings), await started_sweeper(settings)]
    try:
        freed = await asyncio.gather(*(s.reclaim_expired_leases() for s in sweepers * 2))
    finally:
        for sweeper in sweepers:
            await stopped(sweeper)

    assert sum(freed) == expired
    async with engine.connect() as conn:
        limits = [
            limit
            for limit in await PgStore(conn).list_global_limits()
            if limit.name.startswith(prefix)
        ]
    assert len(limits) == 60
    assert all(list(limit.holders) == [live[limit.name]] for limit in limits)


async def test_a_vanished_holder_loses_its_slot_to_a_waiter_within_the_ttl(
    services: Services, database_url: str
) -> None:
    """Limit 1, leases of 3 s. Run A takes the slot and its executor is never heard of
    again; run B proposes RUNNING, following its WAITs in the pool: it gets its ACCEPT
    once A's lease has expired, within the TTL and a WAIT's delay."""
    settings = isolated_settings(
        services,
        database_url,
        slot_lease_ttl_s=3.0,
        tag_concurrency_slot_wait_s=1,
        parked_poll_s=0.2,
    )
    tag = f"vanish-{uuid.uuid4().hex[:8]}"
    engine = create_engine(settings.database_url)
    async with store_transaction(engine) as store:
        await store.upsert_global_limit(f"tag:{tag}", 1)
    spec = TaskRunSpec(task_key="t", tags=[tag])
    vanished, waiter = uuid.uuid4(), uuid.uuid4()
    async with running_worker(settings), ArbiterClient.connect(settings=settings) as client:
        for run_id in (vanished, waiter):
            await client.propose(
                "task_run", run_id, ProposedState(type=StateType.PENDING), run=spec
            )
        held = await client.propose("task_run", vanished, ProposedState(type=StateType.RUNNING))
        assert held.status is OutcomeStatus.ACCEPT
        taken_at = asyncio.get_running_loop().time()
        got = await client.propose(
            "task_run",
            waiter,
            ProposedState(type=StateType.RUNNING),
            follow_waits=True,
            max_wait_s=30,
        )
        waited = asyncio.get_running_loop().time() - taken_at
    assert got.status is OutcomeStatus.ACCEPT
    assert got.proposal_id is not None
    # Not before the lease expired; at most a WAIT (1 s, jittered) and a poll after it.
    assert 3.0 <= waited < 3.0 + 3.0
    try:
        async with engine.connect() as conn:
            limits = await PgStore(conn).list_global_limits()
    finally:
        await engine.dispose()
    [limit] = [lim for lim in limits if lim.name == f"tag:{tag}"]
    assert list(limit.holders) == [str(waiter)]


@pytest.mark.parametrize("kind", ["v1", "v2"])
async def test_a_release_wakes_the_parked_waiter_before_its_back_off(
    services: Services, database_url: str, kind: str
) -> None:
    """A tag limit of 1 and a WAIT back-off of 10 s: the waiter, parked by the pool, is
    answered ACCEPT within a second of the holder's COMPLETED, not 10 s later."""
    settings = isolated_settings(
        services, database_url, tag_concurrency_slot_wait_s=10, parked_poll_s=5.0
    )
    tag = f"wake-{uuid.uuid4().hex[:8]}"
    engine = create_engine(settings.database_url)
    try:
        async with store_transaction(engine) as store:
            if kind == "v1":
                await store.upsert_tag_limit(tag, 1)
            else:
                await store.upsert_global_limit(f"tag:{tag}", 1)
                # A slot is held about 10 s on average: the WAIT is about 10 s too.
                [limit] = await store.lock_global_limits([f"tag:{tag}"])
                limit.avg_slot_occupancy_seconds = 10.0
                await store.save_global_limit(limit)
    finally:
        await engine.dispose()
    spec = TaskRunSpec(task_key="t", tags=[tag])
    holder, waiter = uuid.uuid4(), uuid.uuid4()
    async with running_worker(settings), ArbiterClient.connect(settings=settings) as client:
        for run_id in (holder, waiter):
            await client.propose(
                "task_run", run_id, ProposedState(type=StateType.PENDING), run=spec
            )
        held = await client.propose("task_run", holder, ProposedState(type=StateType.RUNNING))
        assert held.status is OutcomeStatus.ACCEPT
        proposal_id = uuid.uuid4()
        answer = await client.publish(
            "task_run",
            waiter,
            ProposedState(type=StateType.RUNNING),
            proposal_id=proposal_id,
            follow_waits=True,
            max_wait_s=60,
        )
        await wait_parked(settings, proposal_id)
        await asyncio.sleep(0.5)
        done = await client.propose("task_run", holder, ProposedState(type=StateType.COMPLETED))
        released_at = asyncio.get_running_loop().time()
        got = await asyncio.wait_for(answer, 15)
        woken_after = asyncio.get_running_loop().time() - released_at
    assert done.status is OutcomeStatus.ACCEPT
    assert got.status is OutcomeStatus.ACCEPT
    assert woken_after < 1.0


async def test_two_sweepers_free_each_expired_tag_slot_once(
    settings: Settings, engine: AsyncEngine
) -> None:
    """The same for V1 tag limits: 30 limits, one expired slot and one live each."""
    prefix = f"v1sweep-{uuid.uuid4().hex[:8]}"
    now = utcnow()
    tags = [f"{prefix}-{i:02}" for i in range(30)]
    live = {tag: str(uuid.uuid4()) for tag in tags}
    async with store_transaction(engine) as store:
        for tag in tags:
            await store.upsert_tag_limit(tag, 2)
        for limit in await store.lock_tag_limits(tags):
            gone = str(uuid.uuid4())
            limit.active_slots = [gone, live[limit.tag]]
            limit.expires = {
                gone: now - dt.timedelta(minutes=1),
                live[limit.tag]: now + dt.timedelta(hours=1),
            }
            await store.save_tag_limit(limit)
    async with engine.connect() as conn:
        every = await PgStore(conn).list_tag_limits()
    expired = sum(1 for lim in every for at in lim.expires.values() if at <= utcnow()) + (
        await expired_leases_in_the_database(engine, utcnow())
    )

    sweepers = [await started_sweeper(settings), await started_sweeper(settings)]
    try:
        freed = await asyncio.gather(*(s.reclaim_expired_leases() for s in sweepers * 2))
    finally:
        for sweeper in sweepers:
            await stopped(sweeper)

    assert sum(freed) == expired
    async with engine.connect() as conn:
        limits = [lim for lim in await PgStore(conn).list_tag_limits() if lim.tag in live]
    assert len(limits) == 30
    assert all(limit.active_slots == [live[limit.tag]] for limit in limits)
    assert all(list(limit.expires) == [live[limit.tag]] for limit in limits)


async def test_an_executor_that_renews_keeps_its_slot_past_the_ttl(
    services: Services, database_url: str
) -> None:
    """Leases of 2 s. The holder renews (a `renew_leases` proposal) every 0.5 s for 3 s:
    a rival proposing RUNNING meanwhile is told to WAIT, and each renewal is an ACCEPT
    that wrote nothing. Once the holder stops renewing, the rival gets the slot."""
    settings = isolated_settings(
        services, database_url, slot_lease_ttl_s=2.0, tag_concurrency_slot_wait_s=1
    )
    tag = f"renew-{uuid.uuid4().hex[:8]}"
    engine = create_engine(settings.database_url)
    try:
        async with store_transaction(engine) as store:
            await store.upsert_tag_limit(tag, 1)
    finally:
        await engine.dispose()
    spec = TaskRunSpec(task_key="t", tags=[tag])
    holder, rival = uuid.uuid4(), uuid.uuid4()
    async with running_worker(settings), ArbiterClient.connect(settings=settings) as client:
        for run_id in (holder, rival):
            await client.propose(
                "task_run", run_id, ProposedState(type=StateType.PENDING), run=spec
            )
        held = await client.propose("task_run", holder, ProposedState(type=StateType.RUNNING))
        assert held.status is OutcomeStatus.ACCEPT
        renewals = []
        for _ in range(6):
            await asyncio.sleep(0.5)
            renewals.append(await client.renew_leases("task_run", holder))
        refused = await client.propose("task_run", rival, ProposedState(type=StateType.RUNNING))
        await asyncio.sleep(2.5)
        taken = await client.propose("task_run", rival, ProposedState(type=StateType.RUNNING))
    assert {r.status for r in renewals} == {OutcomeStatus.ACCEPT}
    assert all(r.details.reason == "Renewed 1 slot lease(s); no state written." for r in renewals)
    assert all(r.state is not None and r.state.id == held.state.id for r in renewals)  # type: ignore[union-attr]
    assert refused.status is OutcomeStatus.WAIT
    assert taken.status is OutcomeStatus.ACCEPT
    assert await history_of(settings, holder, "task_run") == ["Pending", "Running"]
