"""Transient database faults: retried, then requeued, then dead-lettered past the delivery limit.

A test connection holds the run's row lock, so every attempt of the worker hits
its lock timeout, a retryable fault. Nothing is written and nothing is acked
until the lock is gone; a poison proposal ends in the dead-letter queue.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import aio_pika
import pytest
from sqlalchemy import text

from arbiter.schemas import ErrorCode, FlowRunSpec, Outcome, OutcomeStatus, ProposedState, StateType
from arbiter.worker.client import ArbiterClient
from arbiter.worker.db.engine import create_engine
from arbiter.worker.settings import Settings
from devtools.devservices import Services
from tests.fixtures.proxy import proxy_for
from tests.fixtures.services import isolated_settings, running_worker
from tests.integration.test_invalid_proposals import dead_letters
from tests.integration.test_worker_roundtrip import (
    OutcomeTap,
    history_of,
    proposal_body,
    publish_raw,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(services: Services, database_url: str) -> Settings:
    return isolated_settings(
        services,
        database_url,
        lock_timeout_s=0.2,
        retry_attempts=2,
        retry_max_wait_s=0.05,
        delivery_limit=2,
    )


async def create_flow_run(settings: Settings) -> uuid.UUID:
    run_id = uuid.uuid4()
    async with ArbiterClient.connect(settings=settings) as client:
        outcome = await client.propose(
            "flow_run", run_id, ProposedState(type=StateType.SCHEDULED), run=FlowRunSpec()
        )
    assert outcome.status is OutcomeStatus.ACCEPT
    return run_id


async def test_a_locked_run_is_retried_then_processed_once_the_lock_is_gone(
    settings: Settings, worker: asyncio.Event
) -> None:
    """A lock held for less than the retry budget only delays the outcome."""
    run_id = await create_flow_run(settings)
    engine = create_engine(settings.database_url)
    try:
        async with OutcomeTap(settings, "fault.key") as tap, engine.connect() as conn:
            transaction = await conn.begin()
            await conn.execute(
                text("SELECT 1 FROM flow_run WHERE id = :id FOR UPDATE"), {"id": run_id}
            )
            body = json.dumps(proposal_body(run_id, StateType.PENDING)).encode()
            await publish_raw(settings, body, reply_to="fault.key")
            await asyncio.sleep(0.3)  # at least one attempt timed out on the lock
            await transaction.rollback()
            outcome = Outcome.model_validate_json((await tap.next()).body)
    finally:
        await engine.dispose()
    assert outcome.status is OutcomeStatus.ACCEPT
    assert await history_of(settings, run_id) == ["Scheduled", "Pending"]


async def test_a_proposal_that_keeps_failing_is_answered_abort_and_dead_lettered_with_why(
    settings: Settings, worker: asyncio.Event
) -> None:
    """Retries exhausted on every delivery: requeued until the last one the queue allows,
    which is answered with a final ABORT (code delivery_limit, the last error) and copied
    to arbiter.dead with the reason in its headers. Nothing is written."""
    run_id = await create_flow_run(settings)
    engine = create_engine(settings.database_url)
    body = json.dumps(proposal_body(run_id, StateType.PENDING)).encode()
    try:
        async with OutcomeTap(settings, "fault.key") as tap, engine.connect() as conn:
            transaction = await conn.begin()
            await conn.execute(
                text("SELECT 1 FROM flow_run WHERE id = :id FOR UPDATE"), {"id": run_id}
            )
            await publish_raw(settings, body, reply_to="fault.key")
            outcome = Outcome.model_validate_json((await tap.next(timeout_s=30)).body)
            [dead] = await dead_letters(settings, 1, timeout_s=30)
            await transaction.rollback()
            with pytest.raises(TimeoutError):
                await tap.next(timeout_s=1.0)
    finally:
        await engine.dispose()
    assert outcome.status is OutcomeStatus.ABORT
    assert outcome.error is not None
    assert outcome.error.code is ErrorCode.DELIVERY_LIMIT
    assert "lock" in outcome.error.message
    assert outcome.details.reason is not None
    assert outcome.details.reason.startswith(
        f"Gave up after {settings.delivery_limit + 1} deliveries"
    )
    assert dead.body == body
    assert dead.headers["x-arbiter-error-code"] == "delivery_limit"
    assert "lock" in str(dead.headers["x-arbiter-error-message"])
    assert await history_of(settings, run_id) == ["Scheduled"]


async def test_the_worker_keeps_serving_other_runs_while_one_is_locked(
    settings: Settings, worker: asyncio.Event
) -> None:
    """A locked run costs only its own proposals: another run is answered meanwhile."""
    locked = await create_flow_run(settings)
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            transaction = await conn.begin()
            await conn.execute(
                text("SELECT 1 FROM flow_run WHERE id = :id FOR UPDATE"), {"id": locked}
            )
            await publish_raw(
                settings, json.dumps(proposal_body(locked, StateType.PENDING)).encode()
            )
            other = await create_flow_run(settings)
            await transaction.rollback()
    finally:
        await engine.dispose()
    assert await history_of(settings, other) == ["Scheduled"]


async def test_an_unreachable_database_at_startup_is_one_clear_error(services: Services) -> None:
    """A worker pointed at a closed port fails fast with the setting's name."""
    from arbiter.worker.runtime import ServiceError
    from arbiter.worker.service import run_worker

    settings = Settings(amqp_url=services.amqp_url, database_url="postgresql://x:y@127.0.0.1:1/db")
    with pytest.raises(ServiceError, match="ARBITER_DATABASE_URL"):
        await run_worker(settings)


async def test_an_unreachable_broker_at_startup_is_one_clear_error(database_url: str) -> None:
    """A worker pointed at a closed AMQP port fails fast with the setting's name."""
    from arbiter.worker.runtime import ServiceError
    from arbiter.worker.service import run_worker

    settings = Settings(amqp_url="amqp://guest:guest@127.0.0.1:1/", database_url=database_url)
    with pytest.raises(ServiceError, match="ARBITER_AMQP_URL"):
        await run_worker(settings)


async def test_an_unexpected_error_requeues_the_delivery_instead_of_stranding_it(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug while handling a delivery (here: decoding raises once) gives the delivery back
    to the queue; the redelivery is processed, so no prefetch slot is lost for good."""
    import arbiter.worker.consumer
    from arbiter.worker.decode import decode_proposal as real_decode

    calls = 0

    def decode_failing_once(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in decoding")
        return real_decode(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(arbiter.worker.consumer, "decode_proposal", decode_failing_once)
    run_id = uuid.uuid4()
    body = json.dumps(proposal_body(run_id, StateType.PENDING, run={})).encode()
    async with running_worker(settings), OutcomeTap(settings, "bug.key") as tap:
        await publish_raw(settings, body, reply_to="bug.key")
        outcome = Outcome.model_validate_json((await tap.next()).body)
    assert outcome.status is OutcomeStatus.ACCEPT
    assert calls == 2
    assert await history_of(settings, run_id) == ["Pending"]


async def test_an_error_on_every_delivery_is_answered_on_the_last_one(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug that strikes every delivery (decoding always raises): the proposal is given
    back until its last allowed delivery, which publishes an ABORT and dead-letters it."""
    import arbiter.worker.consumer

    calls = 0

    def decode_always_failing(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        raise RuntimeError("a bug in decoding")

    monkeypatch.setattr(arbiter.worker.consumer, "decode_proposal", decode_always_failing)
    proposal_id = uuid.uuid4()
    document = proposal_body(uuid.uuid4(), StateType.PENDING, proposal_id=proposal_id, run={})
    body = json.dumps(document).encode()
    async with running_worker(settings), OutcomeTap(settings, "bug.key") as tap:
        await publish_raw(settings, body, reply_to="bug.key", message_id=str(proposal_id))
        outcome = Outcome.model_validate_json((await tap.next()).body)
        [dead] = await dead_letters(settings, 1)
    assert outcome.status is OutcomeStatus.ABORT
    assert outcome.proposal_id == proposal_id
    assert outcome.error is not None
    assert outcome.error.code is ErrorCode.DELIVERY_LIMIT
    assert outcome.error.message == "RuntimeError: a bug in decoding"
    assert dead.headers["x-arbiter-error-code"] == "delivery_limit"
    # Each delivery decodes once; the last one tries once more to read the proposal's id.
    assert calls == settings.delivery_limit + 2


async def test_a_stop_while_the_broker_is_unreachable_does_not_wait_for_a_reconnect(
    settings: Settings,
) -> None:
    """SIGTERM while the broker connection is down: cancelling the consumer would wait for
    aio-pika's reconnect, so it is bounded and the drain (nothing in flight) ends at once
    instead of after ARBITER_SHUTDOWN_TIMEOUT_S."""
    async with proxy_for(settings.amqp_url) as broker:
        flaky = settings.model_copy(
            update={"amqp_url": broker.url_through(settings.amqp_url), "shutdown_timeout_s": 20.0}
        )
        loop = asyncio.get_running_loop()
        async with running_worker(flaky) as stop:
            await _until_consumed(settings)
            broker.refusing = True
            broker.cut()
            await asyncio.sleep(0.5)  # the worker has seen its connection die
            began = loop.time()
            stop.set()
        assert loop.time() - began < 8.0  # the 2 s cancel bound, then background passes end


async def _until_consumed(settings: Settings) -> None:
    """Until the worker consumes its queue (its start opens several channels after the
    queue exists)."""
    async with await aio_pika.connect(settings.amqp_url) as connection:
        channel = await connection.channel()
        for _ in range(200):
            queue = await channel.declare_queue(settings.proposals_queue, passive=True)
            if queue.declaration_result.consumer_count:
                return
            await asyncio.sleep(0.05)
    raise TimeoutError("the worker never consumed")
