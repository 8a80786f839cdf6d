"""A proposal that fails, or waits, inside a batch costs only itself: its neighbours in the
same transaction commit and are answered as if it were not there.

Helpers and the one-batch set-up are in ``tests/integration/test_batches.py``.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sqlalchemy import text

from arbiter.schemas import OutcomeStatus, StateType
from arbiter.worker.db.engine import create_engine
from arbiter.worker.metrics import WorkerMetrics
from arbiter.worker.settings import Settings
from devtools.devservices import Services
from tests.fixtures.exploding_policy import EXPLODE
from tests.fixtures.services import isolated_settings
from tests.integration.test_batches import (
    batches,
    body,
    collect,
    flow,
    outcome,
    outcome_tap,
    proposal_id_of,
    publish_backlog,
    run_exists,
    settle_alone,
    settle_as_one_batch,
    task,
    worker_taking_one_batch,
)
from tests.integration.test_worker_roundtrip import history_of

pytestmark = pytest.mark.integration

RULE_ERROR = "Aborting orchestration due to error: RuleBug('the rule blew up on purpose')"
LOCK_HELD_S = 1.0  # about; half of it at least after the other proposals are answered


@pytest.fixture
def settings(services: Services, database_url: str) -> Settings:
    """Policies whose outermost rule raises for a state with the message ``EXPLODE``."""
    return isolated_settings(
        services,
        database_url,
        flow_policy="tests.fixtures.exploding_policy.ExplodingFlowPolicy",
        task_policy="tests.fixtures.exploding_policy.ExplodingTaskPolicy",
    )


def exploding(document: dict[str, object]) -> dict[str, object]:
    """``document`` with a proposed state that makes the rule raise."""
    state = document["state"]
    assert isinstance(state, dict)
    return {**document, "state": {**state, "message": EXPLODE}}


async def test_a_rule_error_aborts_only_its_proposal_and_the_batch_commits(
    settings: Settings,
) -> None:
    """Two proposals whose rule raises (a flow run's, a task run's) among proposals that
    create and move other runs: each failing one is answered with a stored ABORT naming the
    error and changes nothing; the rest of the batch, before and after them, is written. A
    republish of a failed proposal replays its ABORT byte for byte."""
    flow_id, neighbour, task_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    failing_flow = exploding(flow(flow_id, StateType.PENDING))
    failing_task = exploding(task(task_id, StateType.RUNNING))
    documents = [
        flow(flow_id, StateType.SCHEDULED, run={}),
        flow(neighbour, StateType.SCHEDULED, run={}),
        failing_flow,
        task(task_id, StateType.PENDING, run={}),
        failing_task,
        flow(neighbour, StateType.PENDING),
        task(task_id, StateType.RUNNING),
    ]
    metrics = WorkerMetrics()

    async with outcome_tap(settings) as tap:
        await publish_backlog(settings, [body(d) for d in documents])
        async with worker_taking_one_batch(settings, metrics, len(documents)):
            answers = await collect(tap, len(documents))
            await publish_backlog(settings, [body(failing_flow)])
            replayed = await collect(tap, 1)

    statuses = [outcome(answers, d).status for d in documents]
    accept, abort = OutcomeStatus.ACCEPT, OutcomeStatus.ABORT
    assert statuses == [accept, accept, abort, accept, abort, accept, accept]
    for failing, state_type in (
        (failing_flow, StateType.SCHEDULED),
        (failing_task, StateType.PENDING),
    ):
        aborted = outcome(answers, failing)
        assert aborted.details.reason == RULE_ERROR
        assert [(t.rule, t.effect.value) for t in aborted.rule_trace] == [
            ("Orchestration", "abort")
        ]
        assert aborted.run is not None
        assert aborted.run.state_type is state_type  # the run as it was: nothing written
    assert replayed == {proposal_id_of(failing_flow): answers[proposal_id_of(failing_flow)]}
    assert await history_of(settings, flow_id) == ["Scheduled"]
    assert await history_of(settings, neighbour) == ["Scheduled", "Pending"]
    assert await history_of(settings, task_id, "task_run") == ["Pending", "Running"]
    # One committed transaction for the batch (its two failed attempts rolled back), one for
    # the replay.
    assert batches(metrics) == (2, len(documents) + 1)


async def test_a_rule_error_on_a_runs_first_proposal_creates_no_run(settings: Settings) -> None:
    """An ABORT writes nothing, so a run whose very first proposal fails in a rule is not
    created: the executor's next proposal without
    `run` is INVALID unknown_run, as it was when each proposal had its own transaction."""
    run_id = uuid.uuid4()
    first = exploding(flow(run_id, StateType.PENDING, run={"name": "never created"}))
    documents = [first, flow(run_id, StateType.PENDING)]

    answers = await settle_as_one_batch(settings, documents, WorkerMetrics())

    aborted, then = outcome(answers, first), outcome(answers, documents[1])
    assert (aborted.status, aborted.details.reason) == (OutcomeStatus.ABORT, RULE_ERROR)
    # All three at once, so that a failure tells the whole story.
    assert {
        "abort describes a run": aborted.run is not None,
        "run exists": await run_exists(settings, run_id),
        "next proposal": then.status,
    } == {
        "abort describes a run": False,
        "run exists": False,
        "next proposal": OutcomeStatus.INVALID,
    }


async def test_a_rule_error_before_its_run_is_created_describes_no_run(
    settings: Settings,
) -> None:
    """A first proposal whose rule raises, then another first proposal for the same run in
    the same batch: the second creates the run, but the first was decided before it, when
    there was no run, so its ABORT describes none (as it would alone)."""
    run_id = uuid.uuid4()
    documents = [
        exploding(flow(run_id, StateType.PENDING, run={})),
        flow(run_id, StateType.PENDING, run={}),
    ]

    answers = await settle_as_one_batch(settings, documents, WorkerMetrics())

    aborted, created = outcome(answers, documents[0]), outcome(answers, documents[1])
    assert (aborted.status, aborted.details.reason) == (OutcomeStatus.ABORT, RULE_ERROR)
    assert created.status is OutcomeStatus.ACCEPT
    assert await history_of(settings, run_id) == ["Pending"]
    assert aborted.run is None


async def test_a_run_locked_elsewhere_delays_only_its_own_proposal(settings: Settings) -> None:
    """While another transaction holds one run's row lock, a batch skips that run: the
    other proposals are answered at once, while the lock is still held, and the locked
    run's proposal is settled alone as soon as the lock is released."""
    locked = uuid.uuid4()
    created = flow(locked, StateType.SCHEDULED, run={})
    assert outcome(await settle_alone(settings, [created]), created).status is OutcomeStatus.ACCEPT
    others = [uuid.uuid4(), uuid.uuid4()]
    waiting = flow(locked, StateType.PENDING)
    documents = [
        flow(others[0], StateType.SCHEDULED, run={}),
        waiting,
        flow(others[1], StateType.SCHEDULED, run={}),
        flow(others[0], StateType.PENDING),
    ]
    metrics = WorkerMetrics()
    engine = create_engine(settings.database_url)
    loop = asyncio.get_running_loop()
    try:
        async with outcome_tap(settings) as tap, engine.connect() as conn:
            transaction = await conn.begin()
            await conn.execute(
                text("SELECT 1 FROM flow_run WHERE id = :id FOR UPDATE"), {"id": locked}
            )
            locked_at = loop.time()
            await publish_backlog(settings, [body(d) for d in documents])
            async with worker_taking_one_batch(settings, metrics, len(documents)):
                # Only this test lets go of the lock, so these come while it is held; a batch
                # that waited for it would answer nothing before its lock timeout (10 s).
                prompt_s = settings.lock_timeout_s / 2
                answers = await collect(tap, len(documents) - 1, timeout_s=prompt_s)
                answered_in_s = loop.time() - locked_at
                await asyncio.sleep(max(LOCK_HELD_S / 2, LOCK_HELD_S - answered_in_s))
                assert tap.messages.empty(), "the locked run's proposal did not wait for it"
                await transaction.rollback()
                answers.update(await collect(tap, 1))
    finally:
        await engine.dispose()

    assert answered_in_s < prompt_s
    assert [outcome(answers, d).status for d in documents] == [OutcomeStatus.ACCEPT] * 4
    assert await history_of(settings, locked) == ["Scheduled", "Pending"]
    assert await history_of(settings, others[0]) == ["Scheduled", "Pending"]
    assert await history_of(settings, others[1]) == ["Scheduled"]
    # The batch (the held proposal counted in it), then the held proposal alone.
    assert batches(metrics) == (2, len(documents) + 1)
