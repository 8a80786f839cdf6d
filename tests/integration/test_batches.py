"""Batched orchestration on real services: one transaction settles many proposals, and each
is decided as if it had been alone, in delivery order.

Each test publishes its proposals *before* the worker starts and holds the worker's
dispatcher until all of them are delivered, so they form one batch; the worker's
``arbiter_batch_size`` histogram proves that they did.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Sequence

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from arbiter.schemas import ErrorCode, Outcome, OutcomeStatus, StateType
from arbiter.worker.batching import Batcher
from arbiter.worker.consumer import Consumer
from arbiter.worker.db.engine import create_engine
from arbiter.worker.db.store import PgStore
from arbiter.worker.metrics import WorkerMetrics
from arbiter.worker.settings import Settings
from arbiter.worker.topology import declare_topology
from tests.fixtures.services import running_worker
from tests.integration.test_invalid_proposals import dead_letters
from tests.integration.test_worker_roundtrip import OutcomeTap, history_of, proposal_body

pytestmark = pytest.mark.integration

REPLY_TO = "batch.key"
Document = dict[str, object]
# Every answer to a proposal id, as published (raw bodies, so replays compare byte for byte).
Answers = dict[uuid.UUID, list[bytes]]


def body(document: Document) -> bytes:
    return json.dumps(document).encode()


def proposal_id_of(document: Document) -> uuid.UUID:
    return uuid.UUID(str(document["proposal_id"]))


async def publish_backlog(settings: Settings, bodies: Sequence[bytes]) -> None:
    """Declare the topology and publish ``bodies`` in order, each answered to ``REPLY_TO``."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare_topology(channel, settings)
        for message_body in bodies:
            await topology.proposals_exchange.publish(
                aio_pika.Message(
                    body=message_body,
                    content_type="application/json",
                    reply_to=REPLY_TO,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=settings.proposals_routing_key,
            )


@contextlib.asynccontextmanager
async def outcome_tap(settings: Settings) -> AsyncIterator[OutcomeTap]:
    """A tap on ``REPLY_TO``, usable before any worker ran (it declares the topology)."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        await declare_topology(await connection.channel(), settings)
    async with OutcomeTap(settings, REPLY_TO) as tap:
        yield tap


@contextlib.asynccontextmanager
async def worker_taking_one_batch(
    settings: Settings, metrics: WorkerMetrics, deliveries: int
) -> AsyncIterator[None]:
    """A worker whose dispatcher first waits until ``deliveries`` deliveries are in, so a
    backlog waiting in the queue becomes one batch; then it dispatches as usual.

    Unheld, an idle worker dispatches its first delivery at once (as it should, to answer
    promptly), so a backlog found at start-up is cut wherever the broker's frames happen
    to split: 8 waiting proposals came as two or three batches in each of ten tries.
    """
    delivered = asyncio.Event()
    on_delivery, dispatch = Consumer._on_delivery, Batcher.run

    async def count_delivery(self: Consumer, message: AbstractIncomingMessage) -> None:
        await on_delivery(self, message)
        if self.unsettled >= deliveries:
            delivered.set()

    async def dispatch_once_delivered(self: Batcher[AbstractIncomingMessage]) -> None:
        with contextlib.suppress(TimeoutError):  # then the batch-size assertion tells
            await asyncio.wait_for(delivered.wait(), 10)
        await dispatch(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Consumer, "_on_delivery", count_delivery)
        patch.setattr(Batcher, "run", dispatch_once_delivered)
        async with running_worker(settings, metrics=metrics):
            yield


async def collect(tap: OutcomeTap, count: int, timeout_s: float = 15) -> Answers:
    """The next ``count`` answers on ``tap``, by proposal id."""
    answers: Answers = {}
    for _ in range(count):
        message = await tap.next(timeout_s)
        answers.setdefault(uuid.UUID(str(message.message_id)), []).append(message.body)
    return answers


async def settle_as_one_batch(
    settings: Settings, documents: Sequence[Document], metrics: WorkerMetrics
) -> Answers:
    """Publish ``documents`` with no worker running, let one worker take them as one batch,
    and return every answer (one per document)."""
    async with outcome_tap(settings) as tap:
        await publish_backlog(settings, [body(d) for d in documents])
        async with worker_taking_one_batch(settings, metrics, len(documents)):
            return await collect(tap, len(documents))


async def settle_alone(settings: Settings, documents: Sequence[Document]) -> Answers:
    """Settle ``documents`` on a worker of their own (set-up for a later batch)."""
    return await settle_as_one_batch(settings, documents, WorkerMetrics())


def outcome(answers: Answers, document: Document) -> Outcome:
    """The one answer to ``document``'s proposal id."""
    [answer] = answers[proposal_id_of(document)]
    return Outcome.model_validate_json(answer)


def batches(metrics: WorkerMetrics) -> tuple[int, int]:
    """(transactions committed, proposals they settled), from ``arbiter_batch_size``."""
    [family] = metrics.batch_size.collect()
    samples = {s.name: s.value for s in family.samples}
    return int(samples["arbiter_batch_size_count"]), int(samples["arbiter_batch_size_sum"])


def flow(
    run_id: uuid.UUID,
    state_type: StateType,
    *,
    run: Document | None = None,
    proposal_id: uuid.UUID | None = None,
) -> Document:
    """A flow-run proposal; ``run`` describes the run on its first one."""
    return proposal_body(run_id, state_type, proposal_id=proposal_id, run=run)


def task(run_id: uuid.UUID, state_type: StateType, *, run: Document | None = None) -> Document:
    """A task-run proposal; ``run`` describes the run on its first one."""
    return proposal_body(run_id, state_type, run_kind="task_run", run=run)


async def run_exists(settings: Settings, run_id: uuid.UUID) -> bool:
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            return await PgStore(conn).run_kind_of(run_id) is not None
    finally:
        await engine.dispose()


async def test_a_batch_settles_a_runs_proposals_in_delivery_order(settings: Settings) -> None:
    """A flow run's whole lifecycle and its task run's, interleaved in one batch: each
    proposal sees the ones before it (the task starts only because its flow run was made
    RUNNING earlier in the batch), so all are accepted and written once, in order."""
    flow_id, task_id = uuid.uuid4(), uuid.uuid4()
    documents = [
        flow(flow_id, StateType.SCHEDULED, run={"name": "nightly"}),
        flow(flow_id, StateType.PENDING),
        flow(flow_id, StateType.RUNNING),
        task(task_id, StateType.PENDING, run={"flow_run_id": str(flow_id), "task_key": "k"}),
        task(task_id, StateType.RUNNING),
        task(task_id, StateType.COMPLETED),
        flow(flow_id, StateType.COMPLETED),
    ]
    metrics = WorkerMetrics()

    answers = await settle_as_one_batch(settings, documents, metrics)

    outcomes = [outcome(answers, d) for d in documents]
    assert [o.status for o in outcomes] == [OutcomeStatus.ACCEPT] * len(documents)
    assert [o.state.type for o in outcomes if o.state] == [
        StateType.SCHEDULED,
        StateType.PENDING,
        StateType.RUNNING,
        StateType.PENDING,
        StateType.RUNNING,
        StateType.COMPLETED,
        StateType.COMPLETED,
    ]
    assert await history_of(settings, flow_id) == ["Scheduled", "Pending", "Running", "Completed"]
    assert await history_of(settings, task_id, "task_run") == ["Pending", "Running", "Completed"]
    assert batches(metrics) == (1, len(documents))


async def test_one_proposal_twice_in_a_batch_is_answered_twice_and_written_once(
    settings: Settings,
) -> None:
    """An executor's republish lands in the same batch as the original: the copy replays the
    original's outcome, byte for byte, and the run gets one state."""
    run_id, other = uuid.uuid4(), uuid.uuid4()
    original = flow(run_id, StateType.SCHEDULED, run={})
    documents = [original, flow(other, StateType.SCHEDULED, run={}), original]
    metrics = WorkerMetrics()

    answers = await settle_as_one_batch(settings, documents, metrics)

    first, copy = answers[proposal_id_of(original)]
    assert first == copy
    assert Outcome.model_validate_json(first).status is OutcomeStatus.ACCEPT
    assert await history_of(settings, run_id) == ["Scheduled"]
    assert await history_of(settings, other) == ["Scheduled"]
    assert metrics.total("arbiter_replays") == 1
    assert batches(metrics) == (1, 3)


async def test_a_proposal_settled_earlier_is_replayed_inside_a_later_batch(
    settings: Settings,
) -> None:
    """A proposal id processed by an earlier transaction and published again among new
    proposals for its run: the stored outcome comes back, nothing is written for it, and the
    run's new proposals proceed from its real state."""
    run_id = uuid.uuid4()
    earlier = flow(run_id, StateType.SCHEDULED, run={})
    [first] = (await settle_alone(settings, [earlier]))[proposal_id_of(earlier)]
    documents = [
        flow(run_id, StateType.PENDING),
        earlier,
        flow(run_id, StateType.RUNNING),
    ]
    metrics = WorkerMetrics()

    answers = await settle_as_one_batch(settings, documents, metrics)

    assert answers[proposal_id_of(earlier)] == [first]
    assert outcome(answers, documents[0]).status is OutcomeStatus.ACCEPT
    assert outcome(answers, documents[2]).status is OutcomeStatus.ACCEPT
    assert await history_of(settings, run_id) == ["Scheduled", "Pending", "Running"]
    assert metrics.total("arbiter_replays") == 1
    assert batches(metrics) == (1, 3)


async def test_one_proposal_id_with_two_bodies_in_a_batch_refuses_the_second(
    settings: Settings,
) -> None:
    """The same proposal id with another body later in the batch is INVALID
    proposal_id_conflict and dead-lettered; the first is settled and written as usual."""
    run_id, proposal_id = uuid.uuid4(), uuid.uuid4()
    first = flow(run_id, StateType.SCHEDULED, proposal_id=proposal_id, run={})
    second = flow(run_id, StateType.PENDING, proposal_id=proposal_id)
    metrics = WorkerMetrics()

    answers = await settle_as_one_batch(settings, [first, second], metrics)

    statuses = {
        Outcome.model_validate_json(a).status: Outcome.model_validate_json(a)
        for a in answers[proposal_id]
    }
    assert set(statuses) == {OutcomeStatus.ACCEPT, OutcomeStatus.INVALID}
    refusal = statuses[OutcomeStatus.INVALID]
    assert refusal.error is not None
    assert refusal.error.code is ErrorCode.PROPOSAL_ID_CONFLICT
    [dead] = await dead_letters(settings, 1)
    assert dead.body == body(second)
    assert await history_of(settings, run_id) == ["Scheduled"]
    assert batches(metrics) == (1, 2)


async def test_runs_created_in_a_batch_are_known_to_the_proposals_after_them(
    settings: Settings,
) -> None:
    """A flow run and a task run of it, both new, in one batch: both are created and
    accepted. A task run naming a flow run that exists nowhere is INVALID unknown_run and
    dead-lettered, and its neighbours commit all the same."""
    flow_id, task_id, orphan, neighbour = (uuid.uuid4() for _ in range(4))
    documents = [
        flow(flow_id, StateType.RUNNING, run={}),
        task(task_id, StateType.PENDING, run={"flow_run_id": str(flow_id)}),
        task(orphan, StateType.PENDING, run={"flow_run_id": str(uuid.uuid4())}),
        flow(neighbour, StateType.PENDING, run={}),
        task(task_id, StateType.RUNNING),
    ]
    metrics = WorkerMetrics()

    answers = await settle_as_one_batch(settings, documents, metrics)

    statuses = [outcome(answers, d).status for d in documents]
    assert (
        statuses
        == [OutcomeStatus.ACCEPT] * 2 + [OutcomeStatus.INVALID] + [OutcomeStatus.ACCEPT] * 2
    )
    refusal = outcome(answers, documents[2])
    assert refusal.error is not None
    assert refusal.error.code is ErrorCode.UNKNOWN_RUN
    [dead] = await dead_letters(settings, 1)
    assert dead.body == body(documents[2])
    assert await history_of(settings, flow_id) == ["Running"]
    assert await history_of(settings, task_id, "task_run") == ["Pending", "Running"]
    assert not await run_exists(settings, orphan)
    assert await history_of(settings, neighbour) == ["Pending"]
    assert batches(metrics) == (1, len(documents))


async def test_a_run_is_created_by_its_first_proposal_in_delivery_order(
    settings: Settings,
) -> None:
    """Creation follows delivery order, as if each proposal were alone: a proposal without
    `run` before the one that creates its run is INVALID unknown_run, one after it is
    accepted; a task run naming a flow run created later in the batch is unknown_run."""
    late, early, parent, child = (uuid.uuid4() for _ in range(4))
    documents = [
        flow(late, StateType.SCHEDULED),  # nothing creates `late` yet: unknown_run
        flow(late, StateType.SCHEDULED, run={}),
        flow(late, StateType.PENDING),
        flow(early, StateType.SCHEDULED, run={}),
        flow(early, StateType.PENDING, run={"name": "ignored: the run exists"}),
        task(child, StateType.PENDING, run={"flow_run_id": str(parent)}),  # parent not yet
        flow(parent, StateType.RUNNING, run={}),
    ]
    metrics = WorkerMetrics()

    answers = await settle_as_one_batch(settings, documents, metrics)

    outcomes = [outcome(answers, d) for d in documents]
    accept, invalid = OutcomeStatus.ACCEPT, OutcomeStatus.INVALID
    assert [o.status for o in outcomes] == [
        invalid,
        accept,
        accept,
        accept,
        accept,
        invalid,
        accept,
    ]
    assert [o.error.code for o in outcomes if o.error] == [ErrorCode.UNKNOWN_RUN] * 2
    assert await history_of(settings, late) == ["Scheduled", "Pending"]
    assert await history_of(settings, early) == ["Scheduled", "Pending"]
    assert not await run_exists(settings, child)
    assert len(await dead_letters(settings, 2)) == 2
    assert batches(metrics) == (1, len(documents))
