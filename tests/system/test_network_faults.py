"""Network faults between a worker and its servers: nothing lost, nothing doubled.

The worker process reaches RabbitMQ and PostgreSQL only through TCP proxies that abort
every open connection, again and again, while proposals are in flight (360 at least, and
until each server's live connections were cut twice). The broker
connection is re-established by aio-pika (unacked deliveries come back and are
replayed); a dead database connection fails its statement with a retryable error and
the transaction is retried on a new one.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from arbiter.schemas import OutcomeStatus, ProposedState, StateType, TaskRunSpec
from arbiter.worker.client import ArbiterClient
from arbiter.worker.db.engine import create_engine
from arbiter.worker.settings import Settings
from devtools.pool import WorkerPool
from tests.fixtures.proxy import CuttableProxy, proxy_for

pytestmark = pytest.mark.system

LIFECYCLE = (StateType.PENDING, StateType.RUNNING, StateType.COMPLETED)
RUNS = 120  # 360 proposals at least
IN_FLIGHT_RUNS = 24
CUT_EVERY_S = 0.8
# Cuts that aborted live connections, of each server, before the executors may stop: a
# fast pool settles 360 proposals in a second or two, before the first cut.
MIN_EFFECTIVE_CUTS = 2
MAX_RUNS = RUNS * 20


async def drive(client: ArbiterClient, run_id: uuid.UUID, done: list[int]) -> list[OutcomeStatus]:
    statuses = []
    for index, state_type in enumerate(LIFECYCLE):
        outcome = await client.propose(
            "task_run",
            run_id,
            ProposedState(type=state_type),
            run=TaskRunSpec(task_key="flaky-network") if index == 0 else None,
            timeout_s=120,
        )
        statuses.append(outcome.status)
        done[0] += 1
    return statuses


async def keep_cutting(
    proxies: list[CuttableProxy], stop: asyncio.Event, effective: list[int]
) -> int:
    """Abort every proxied connection, alternating servers, until ``stop``; returns how many.
    ``effective[i]`` counts the cuts of ``proxies[i]`` that aborted a live connection."""
    aborted = 0
    turn = 0
    while not stop.is_set():
        await asyncio.sleep(CUT_EVERY_S)
        index = turn % len(proxies)
        links = proxies[index].cut()
        effective[index] += 1 if links else 0
        aborted += links
        turn += 1
    return aborted


@pytest.mark.timeout(300)
async def test_connections_cut_again_and_again_lose_nothing_and_double_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    """Every proposal is answered ACCEPT, every run has exactly its three states and three
    processed ids, though both of the worker's connections kept dying under it."""
    # Both sides declare the queue, so they must agree on its arguments (delivery limit).
    # The worker's drain is bounded well inside the 30 s the pool waits before SIGKILL: a
    # cut just before SIGTERM can hold a drain past 12 s (README, "Notes and deviations"),
    # and a drain that gives up still exits 0, its deliveries redelivered.
    settings = settings.model_copy(
        update={
            "lock_timeout_s": 2.0,
            "delivery_limit": 1000,
            "retry_max_wait_s": 0.5,
            "shutdown_timeout_s": 10.0,
        }
    )
    async with proxy_for(settings.amqp_url) as broker, proxy_for(settings.database_url) as db:
        flaky = settings.model_copy(
            update={
                "amqp_url": broker.url_through(settings.amqp_url),
                "database_url": db.url_through(settings.database_url),
            }
        )
        run_ids: list[uuid.UUID] = []
        done = [0]
        effective = [0, 0]

        async def executor() -> list[list[OutcomeStatus]]:
            """Drives runs one after another until enough of them ran through enough cuts."""
            statuses = []
            while len(run_ids) < MAX_RUNS and (
                len(run_ids) < RUNS or min(effective) < MIN_EFFECTIVE_CUTS
            ):
                run_ids.append(run_id := uuid.uuid4())
                statuses.append(await drive(client, run_id, done))
            return statuses

        with WorkerPool(flaky, tmp_path, concurrency=8) as pool:
            pool.start()
            async with ArbiterClient.connect(settings=settings) as client:  # direct, not cut
                stop = asyncio.Event()
                cutter = asyncio.create_task(keep_cutting([broker, db], stop, effective))
                driven = await asyncio.gather(*(executor() for _ in range(IN_FLIGHT_RUNS)))
                results = [statuses for each in driven for statuses in each]
                stop.set()
                aborted = await cutter
            # The proxies run on this loop: stop the pool from a thread so they keep serving.
            codes = await asyncio.to_thread(pool.stop)
        log = (tmp_path / "worker-0.log").read_text()

    assert min(effective) >= MIN_EFFECTIVE_CUTS, "the runs ended before enough cuts"
    assert aborted > 0
    assert "Reconnecting" in log
    assert all(statuses == [OutcomeStatus.ACCEPT] * 3 for statuses in results)
    assert codes == [0]

    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            ids = [str(r) for r in run_ids]
            rows = await conn.execute(
                text(
                    "SELECT task_run_id, count(*) FROM task_run_state "
                    "WHERE task_run_id = ANY(CAST(:ids AS uuid[])) GROUP BY task_run_id"
                ),
                {"ids": ids},
            )
            counts = {str(r[0]): r[1] for r in rows}
            processed = await conn.scalar(
                text(
                    "SELECT count(*) FROM processed_proposal "
                    "WHERE run_id = ANY(CAST(:ids AS uuid[]))"
                ),
                {"ids": ids},
            )
    finally:
        await engine.dispose()
    assert counts == dict.fromkeys(ids, 3)
    assert processed == len(run_ids) * len(LIFECYCLE)


@pytest.mark.timeout(120)
async def test_sigterm_while_the_broker_is_unreachable_still_exits(
    settings: Settings, tmp_path: Path
) -> None:
    """The broker goes away (its connection cut, new ones refused), then SIGTERM: the worker
    gives up waiting after ARBITER_SHUTDOWN_TIMEOUT_S and exits 0 instead of hanging."""
    async with proxy_for(settings.amqp_url) as broker:
        flaky = settings.model_copy(
            update={"amqp_url": broker.url_through(settings.amqp_url), "shutdown_timeout_s": 2.0}
        )
        with WorkerPool(flaky, tmp_path) as pool:
            pool.start()
            async with ArbiterClient.connect(settings=settings) as client:
                outcome = await client.propose(
                    "task_run",
                    uuid.uuid4(),
                    ProposedState(type=StateType.PENDING),
                    run=TaskRunSpec(),
                    timeout_s=60,
                )
            assert outcome.status is OutcomeStatus.ACCEPT
            broker.refusing = True
            broker.cut()
            await asyncio.sleep(0.5)
            started = asyncio.get_running_loop().time()
            codes = await asyncio.to_thread(pool.stop, 60)
            took = asyncio.get_running_loop().time() - started
    assert codes == [0]
    assert took < 20, f"shutdown took {took:.1f} s"


@pytest.mark.timeout(120)
async def test_a_database_outage_longer_than_the_retry_budget_costs_no_proposal(
    settings: Settings, tmp_path: Path
) -> None:
    """PostgreSQL unreachable for several seconds, far longer than two attempts of two tries
    each: the worker holds the deliveries instead of spending their delivery attempts, and
    once the database is back every proposal is answered; none is dead-lettered."""
    settings = settings.model_copy(
        update={"delivery_limit": 2, "retry_attempts": 2, "retry_max_wait_s": 0.1}
    )
    async with proxy_for(settings.database_url) as db:
        flaky = settings.model_copy(update={"database_url": db.url_through(settings.database_url)})
        with WorkerPool(flaky, tmp_path, concurrency=8) as pool:
            pool.start()
            async with ArbiterClient.connect(settings=settings) as client:
                warm = await client.propose(
                    "task_run",
                    uuid.uuid4(),
                    ProposedState(type=StateType.PENDING),
                    run=TaskRunSpec(),
                    timeout_s=60,
                )
                assert warm.status is OutcomeStatus.ACCEPT
                db.refusing = True
                db.cut()
                futures = [
                    await client.publish(
                        "task_run",
                        uuid.uuid4(),
                        ProposedState(type=StateType.PENDING),
                        run=TaskRunSpec(),
                    )
                    for _ in range(40)
                ]
                await asyncio.sleep(6)
                assert not any(future.done() for future in futures)
                db.refusing = False
                outcomes = await asyncio.wait_for(asyncio.gather(*futures), 60)
            codes = await asyncio.to_thread(pool.stop)
        log = (tmp_path / "worker-0.log").read_text()
    assert [outcome.status for outcome in outcomes] == [OutcomeStatus.ACCEPT] * 40
    assert "the database is unreachable; holding" in log
    assert codes == [0]
    assert await dead_letter_count(settings) == 0


async def dead_letter_count(settings: Settings) -> int:
    import aio_pika

    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(settings.dead_queue, passive=True)
        return queue.declaration_result.message_count or 0


@pytest.mark.timeout(120)
async def test_an_executor_whose_connection_drops_still_gets_every_outcome(
    settings: Settings, tmp_path: Path
) -> None:
    """The executor's connection is cut with 60 proposals unanswered: outcomes published
    meanwhile are lost with its reply queue, so after reconnecting the client publishes
    the unanswered ones again; the worker answers replays, and nothing is written twice."""
    run_ids = [uuid.uuid4() for _ in range(60)]
    async with proxy_for(settings.amqp_url) as broker:
        flaky = settings.model_copy(update={"amqp_url": broker.url_through(settings.amqp_url)})
        with WorkerPool(settings, tmp_path, concurrency=8) as pool:
            pool.start()
            async with ArbiterClient.connect(settings=flaky) as client:
                futures = [
                    await client.publish(
                        "task_run",
                        run_id,
                        ProposedState(type=StateType.PENDING),
                        run=TaskRunSpec(),
                    )
                    for run_id in run_ids
                ]
                broker.cut()
                outcomes = await asyncio.wait_for(asyncio.gather(*futures), 60)
                republished = client.republished
            await asyncio.to_thread(pool.stop)
    assert [outcome.status for outcome in outcomes] == [OutcomeStatus.ACCEPT] * 60
    assert republished > 0
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT count(*) FROM task_run_state "
                    "WHERE task_run_id = ANY(CAST(:ids AS uuid[]))"
                ),
                {"ids": [str(r) for r in run_ids]},
            )
            assert rows.scalar() == 60
    finally:
        await engine.dispose()
