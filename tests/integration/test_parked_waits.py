"""Server-side WAIT following on real services: a proposal with ``follow_waits`` is parked
after a WAIT, re-evaluated by the pool when due, and answered once with its final outcome,
under its own id and correlation id; re-evaluations never write twice, and a replay of the
original id returns the final outcome once there is one."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator

import pytest

from arbiter.rules.engine import Orchestrator
from arbiter.schemas import FlowRunSpec, OutcomeStatus, ProposedState, StateType, TaskRunSpec
from arbiter.schemas.states import StateDetails, utcnow
from arbiter.worker import reevaluation
from arbiter.worker.client import ArbiterClient
from arbiter.worker.db.engine import create_engine
from arbiter.worker.db.store import PgStore
from arbiter.worker.reevaluation import Reevaluator
from arbiter.worker.runtime import connect_broker
from arbiter.worker.settings import Settings
from devtools.devservices import Services
from tests.fixtures.services import isolated_settings, running_worker
from tests.integration.test_worker_roundtrip import OutcomeTap, history_of, publish_raw

pytestmark = pytest.mark.integration


@pytest.fixture
def parking_settings(services: Services, database_url: str) -> Settings:
    """Short tag-limit WAITs and a quick look for newly parked proposals."""
    return isolated_settings(
        services, database_url, tag_concurrency_slot_wait_s=1, parked_poll_s=0.2
    )


@contextlib.asynccontextmanager
async def two_workers(settings: Settings) -> AsyncIterator[None]:
    async with running_worker(settings), running_worker(settings):
        yield


async def set_limit(settings: Settings, tag: str, limit: int) -> None:
    engine = create_engine(settings.database_url)
    try:
        async with engine.begin() as conn:
            await PgStore(conn).upsert_tag_limit(tag, limit)
    finally:
        await engine.dispose()


def body(
    run_id: uuid.UUID, proposal_id: uuid.UUID, state: dict[str, object], **extra: object
) -> bytes:
    document = {
        "schema_version": 1,
        "proposal_id": str(proposal_id),
        "run_kind": "flow_run",
        "run_id": str(run_id),
        "state": state,
        **extra,
    }
    return json.dumps(document).encode()


async def scheduled_soon(client: ArbiterClient, seconds: float) -> uuid.UUID:
    """A flow run PENDING whose scheduled time is ``seconds`` ahead: RUNNING now is a WAIT."""
    run_id = uuid.uuid4()
    soon = utcnow() + dt.timedelta(seconds=seconds)
    scheduled = ProposedState(
        type=StateType.SCHEDULED, state_details=StateDetails(scheduled_time=soon)
    )
    await client.propose("flow_run", run_id, scheduled, run=FlowRunSpec())
    await client.propose("flow_run", run_id, ProposedState(type=StateType.PENDING))
    return run_id


def max_overlap(intervals: list[tuple[dt.datetime, dt.datetime]]) -> int:
    """The most intervals open at once; an interval that ends when another starts does not
    overlap it (the slot is released before it is taken)."""
    points = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    open_now = peak = 0
    for _, step in points:
        open_now += step
        peak = max(peak, open_now)
    return peak


async def test_twenty_tasks_for_a_limit_of_two_each_propose_running_once_and_get_one_accept(
    parking_settings: Settings,
) -> None:
    """20 task runs share a tag limited to 2. Each executor sends one RUNNING proposal
    (follow_waits) and receives exactly one outcome, an ACCEPT, for that proposal id; the
    pool follows the WAITs. From the states written, never more than 2 run at once."""
    settings = parking_settings
    tag = f"parked-{uuid.uuid4().hex[:8]}"
    await set_limit(settings, tag, 2)
    flow_run = uuid.uuid4()
    tasks = [uuid.uuid4() for _ in range(20)]
    async with two_workers(settings), ArbiterClient.connect(settings=settings) as client:
        await client.propose(
            "flow_run", flow_run, ProposedState(type=StateType.RUNNING), run=FlowRunSpec()
        )

        async def executor(task_id: uuid.UUID) -> tuple[uuid.UUID, OutcomeStatus, uuid.UUID | None]:
            spec = TaskRunSpec(flow_run_id=flow_run, tags=[tag])
            await client.propose(
                "task_run", task_id, ProposedState(type=StateType.PENDING), run=spec
            )
            proposal_id = uuid.uuid4()
            future = await client.publish(
                "task_run",
                task_id,
                ProposedState(type=StateType.RUNNING),
                proposal_id=proposal_id,
                follow_waits=True,
                max_wait_s=120,
            )
            outcome = await asyncio.wait_for(future, 150)
            await asyncio.sleep(0.3)  # the task's work
            done = await client.propose(
                "task_run", task_id, ProposedState(type=StateType.COMPLETED)
            )
            assert done.status is OutcomeStatus.ACCEPT
            return proposal_id, outcome.status, outcome.proposal_id

        answers = await asyncio.gather(*(executor(task) for task in tasks))
        duplicates = client.duplicates_dropped
    assert all(status is OutcomeStatus.ACCEPT for _, status, _ in answers)
    assert all(sent == answered for sent, _, answered in answers)
    assert duplicates == 0
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            store = PgStore(conn)
            intervals = []
            for task in tasks:
                states = await store.read_history("task_run", task)
                assert [s.name for s in states] == ["Pending", "Running", "Completed"]
                intervals.append((states[1].timestamp, states[2].timestamp))
            [limit] = [lim for lim in await store.list_tag_limits() if lim.tag == tag]
            # The pool did follow WAITs: re-evaluations answered WAIT are recorded too.
            [followed] = await store.fetch_rows(
                "SELECT count(*) AS n FROM processed_proposal"
                " WHERE run_id = ANY($1::uuid[]) AND status = 'WAIT'",
                tasks,
            )
    finally:
        await engine.dispose()
    assert max_overlap(intervals) == 2
    assert followed["n"] > 0
    assert limit.active_slots == []


async def test_notices_then_one_final_outcome_and_a_replay_answers_the_final(
    parking_settings: Settings,
) -> None:
    """With wait_notices, the executor hears the interim WAIT (parked) and then the final
    ACCEPT, both under its proposal id and correlation id; publishing the original proposal
    again afterwards replays the ACCEPT, and the run was written once."""
    settings = parking_settings
    async with two_workers(settings), ArbiterClient.connect(settings=settings) as client:
        run_id = await scheduled_soon(client, 1.5)
        proposal_id = uuid.uuid4()
        raw = body(run_id, proposal_id, {"type": "RUNNING"}, follow_waits=True, wait_notices=True)
        async with OutcomeTap(settings, "parked.key") as tap:
            await publish_raw(settings, raw, reply_to="parked.key", correlation_id="corr-7")
            notice, final = await tap.next(), await tap.next(15)
            await publish_raw(settings, raw, reply_to="parked.key", correlation_id="corr-7")
            replay = await tap.next()
    answers = [json.loads(m.body) for m in (notice, final, replay)]
    assert [a["status"] for a in answers] == ["WAIT", "ACCEPT", "ACCEPT"]
    assert [a["details"]["parked"] for a in answers] == [True, False, False]
    assert {a["proposal_id"] for a in answers} == {str(proposal_id)}
    assert {m.correlation_id for m in (notice, final, replay)} == {"corr-7"}
    assert answers[1]["state"]["id"] == answers[2]["state"]["id"]
    assert await history_of(settings, run_id) == ["Scheduled", "Pending", "Running"]


async def test_a_proposal_waiting_past_its_max_wait_is_answered_with_the_last_wait(
    parking_settings: Settings,
) -> None:
    """A tag slot that is never freed: after max_wait_s the answer is the last WAIT (not
    parked), a replay says the same, and nothing is left parked."""
    settings = parking_settings
    tag = f"held-{uuid.uuid4().hex[:8]}"
    await set_limit(settings, tag, 1)
    flow_run, holder, waiter = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    async with two_workers(settings), ArbiterClient.connect(settings=settings) as client:
        await client.propose(
            "flow_run", flow_run, ProposedState(type=StateType.RUNNING), run=FlowRunSpec()
        )
        spec = TaskRunSpec(flow_run_id=flow_run, tags=[tag])
        for task in (holder, waiter):
            await client.propose("task_run", task, ProposedState(type=StateType.PENDING), run=spec)
        assert (
            await client.propose("task_run", holder, ProposedState(type=StateType.RUNNING))
        ).status is OutcomeStatus.ACCEPT
        started = asyncio.get_running_loop().time()
        outcome = await client.propose(
            "task_run",
            waiter,
            ProposedState(type=StateType.RUNNING),
            follow_waits=True,
            max_wait_s=2.5,
        )
        waited = asyncio.get_running_loop().time() - started
    assert outcome.status is OutcomeStatus.WAIT
    assert not outcome.details.parked
    assert 2.0 <= waited < 10
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            store = PgStore(conn)
            record = await store.find_processed(outcome.proposal_id)  # type: ignore[arg-type]
            left = await store.fetch_rows(
                "SELECT count(*) AS n FROM parked_proposal WHERE proposal_id = $1",
                outcome.proposal_id,
            )
    finally:
        await engine.dispose()
    assert record is not None
    assert json.loads(record.outcome_json)["details"]["parked"] is False
    assert left[0]["n"] == 0
    assert await history_of(settings, waiter, "task_run") == ["Pending"]


async def test_racing_reevaluators_write_each_parked_proposal_once(
    parking_settings: Settings,
) -> None:
    """30 proposals parked at once, re-evaluated by two workers and two more re-evaluators
    racing for them: each run is written RUNNING once, each proposal answered ACCEPT, and
    every answer carries the proposal's own id."""
    settings = parking_settings
    async with two_workers(settings), ArbiterClient.connect(settings=settings) as client:
        runs = [await scheduled_soon(client, 2.0) for _ in range(30)]
        extra = [await started_reevaluator(settings) for _ in range(2)]
        racing = [asyncio.create_task(r.run_forever()) for r in extra]
        try:
            futures = [
                await client.publish(
                    "flow_run", run_id, ProposedState(type=StateType.RUNNING), follow_waits=True
                )
                for run_id in runs
            ]
            outcomes = [await asyncio.wait_for(f, 30) for f in futures]
        finally:
            for task in racing:
                task.cancel()
            for reevaluator_ in extra:
                await reevaluator_.connection.close()
                await reevaluator_.engine.dispose()
    assert {o.status for o in outcomes} == {OutcomeStatus.ACCEPT}
    for run_id in runs:
        assert await history_of(settings, run_id) == ["Scheduled", "Pending", "Running"]


async def wait_parked(settings: Settings, proposal_id: uuid.UUID) -> None:
    """Until the proposal's parked row has committed."""
    engine = create_engine(settings.database_url)
    try:
        for _ in range(100):
            async with engine.connect() as conn:
                rows = await PgStore(conn).fetch_rows(
                    "SELECT count(*) AS n FROM parked_proposal WHERE proposal_id = $1",
                    proposal_id,
                )
            if rows[0]["n"]:
                return
            await asyncio.sleep(0.05)
    finally:
        await engine.dispose()
    raise AssertionError(f"proposal {proposal_id} was never parked")


async def started_reevaluator(settings: Settings) -> Reevaluator:
    connection = await connect_broker(settings)
    made = Reevaluator(settings, create_engine(settings.database_url), Orchestrator(), connection)
    await made.start()
    return made


async def test_a_final_outcome_committed_by_a_worker_that_died_is_published_by_another(
    parking_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-evaluator that commits the final outcome and dies before publishing it: the
    answer is kept, another re-evaluator publishes it after REPUBLISH_AFTER_S, and the
    executor gets it; the run was written once."""
    settings = parking_settings.model_copy(update={"parked_poll_s": 0.2})
    monkeypatch.setattr(reevaluation, "REPUBLISH_AFTER_S", 1.0)
    dies = await started_reevaluator(settings)

    async def die(plan: object) -> None:
        raise asyncio.CancelledError  # the process is gone: nothing published, nothing forgotten

    monkeypatch.setattr(dies, "_announce", die)
    async with ArbiterClient.connect(settings=settings) as client:
        # The worker parks the WAIT and stops before it is due: its own re-evaluator,
        # woken at the due time, would otherwise publish first.
        async with running_worker(settings):
            run_id = await scheduled_soon(client, 2.5)
            proposal_id = uuid.uuid4()
            future = await client.publish(
                "flow_run",
                run_id,
                ProposedState(type=StateType.RUNNING),
                proposal_id=proposal_id,
                follow_waits=True,
            )
            await wait_parked(settings, proposal_id)
        await asyncio.sleep(2.6)
        with contextlib.suppress(asyncio.CancelledError):
            await dies.pass_once()
        assert not future.done()
        survivor = await started_reevaluator(settings)
        await asyncio.sleep(1.2)
        await survivor.pass_once()
        outcome = await asyncio.wait_for(future, 10)
        for made in (dies, survivor):
            await made.connection.close()
            await made.engine.dispose()
    assert outcome.status is OutcomeStatus.ACCEPT
    assert outcome.proposal_id == proposal_id
    assert await history_of(settings, run_id) == ["Scheduled", "Pending", "Running"]
