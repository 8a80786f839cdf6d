"""The background sweeps on real services: each stuck run is transitioned once, by the rules,
however many workers sweep, and never over a state that moved on meanwhile.

Runs are set up in-process through ``process_batch`` (the proposal path without the broker),
so hundreds of them cost one transaction. The database is shared with other tests, whose
leftover runs the sweeps may transition too: assertions only look at this test's runs.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.rules.engine import Orchestrator
from arbiter.schemas import FlowRunSpec, Proposal, ProposedState, StateType, TaskRunSpec
from arbiter.schemas.runs import RunKind
from arbiter.schemas.states import StateDetails, utcnow
from arbiter.worker.batch import process_batch
from arbiter.worker.db.engine import create_engine
from arbiter.worker.db.store import PgStore
from arbiter.worker.db.transaction import store_transaction
from arbiter.worker.decode import Decoded, body_digest
from arbiter.worker.metrics import WorkerMetrics
from arbiter.worker.runtime import connect_broker
from arbiter.worker.settings import Settings
from arbiter.worker.sweepers import Sweeper
from devtools.devservices import Services
from tests.fixtures.services import isolated_settings, running_worker
from tests.integration.test_cli import arbiter
from tests.integration.test_worker_roundtrip import OutcomeTap

pytestmark = pytest.mark.integration

TERMINAL = {"Completed", "Failed", "Cancelled", "Crashed"}


def _decoded(proposal: Proposal) -> Decoded:
    document = json.loads(proposal.model_dump_json())
    return Decoded(proposal=proposal, body_sha256=body_digest(document))


async def propose(
    engine: AsyncEngine,
    kind: RunKind,
    run_ids: Sequence[uuid.UUID],
    state: ProposedState,
    *,
    run: FlowRunSpec | TaskRunSpec | None = None,
    force: bool = False,
) -> None:
    """One transaction proposing ``state`` for every run, as the worker would decide it."""
    batch = [
        _decoded(
            Proposal(
                schema_version=1,
                proposal_id=uuid.uuid4(),
                run_kind=kind,
                run_id=run_id,
                state=state,
                force=force,
                run=run,
            )
        )
        for run_id in run_ids
    ]
    async with store_transaction(engine) as store:
        results = await process_batch(store, Orchestrator(), batch)
    assert all(result is not None and result.invalid is None for result in results)


async def histories(
    engine: AsyncEngine, kind: RunKind, run_ids: Sequence[uuid.UUID]
) -> list[list[str]]:
    async with engine.connect() as conn:
        store = PgStore(conn)
        return [[s.name for s in await store.read_history(kind, run_id)] for run_id in run_ids]


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    created = create_engine(settings.database_url, pool_size=6)
    try:
        yield created
    finally:
        await created.dispose()


async def started_sweeper(settings: Settings, metrics: WorkerMetrics | None = None) -> Sweeper:
    """A sweeper with its own engine and broker connection, as another worker would have."""
    connection = await connect_broker(settings)
    sweeper = Sweeper(
        settings, create_engine(settings.database_url), Orchestrator(), connection, metrics
    )
    await sweeper.start()
    return sweeper


async def stopped(sweeper: Sweeper) -> None:
    await sweeper.connection.close()
    await sweeper.engine.dispose()


async def drained(tap: OutcomeTap, quiet_s: float = 1.0) -> list[AbstractIncomingMessage]:
    """Everything the tap received, once nothing more arrived for ``quiet_s``."""
    received = []
    while True:
        try:
            received.append(await tap.next(quiet_s))
        except TimeoutError:
            return received


def overdue(minutes: float = 60) -> ProposedState:
    late = utcnow() - dt.timedelta(minutes=minutes)
    return ProposedState(type=StateType.SCHEDULED, state_details=StateDetails(scheduled_time=late))


async def test_two_workers_sweeping_500_late_runs_mark_each_late_exactly_once(
    settings: Settings, engine: AsyncEngine
) -> None:
    """Two sweepers (own engines and connections) pass three times each over the same 500
    overdue runs while an executor starts and completes 100 of them: every run not started
    is Late exactly once, with one event and one ACCEPT outcome; a run started first is
    never marked Late; none is touched after it started or completed."""
    runs = [uuid.uuid4() for _ in range(500)]
    started = runs[:100]
    await propose(engine, "flow_run", runs, overdue(), run=FlowRunSpec(flow_name="sweep"))
    first, second = await started_sweeper(settings), await started_sweeper(settings)

    async def sweep_three_times(sweeper: Sweeper) -> None:
        for _ in range(3):
            await sweeper.sweep_once()
            await asyncio.sleep(0.05)

    async def executor() -> None:
        for run_id in started:
            for state_type in (StateType.PENDING, StateType.RUNNING, StateType.COMPLETED):
                await propose(engine, "flow_run", [run_id], ProposedState(type=state_type))

    events_tap = OutcomeTap(settings, "prefect.flow-run.Late", exchange=settings.events_exchange)
    async with events_tap as events, OutcomeTap(settings, "outcome.flow_run.#") as outcomes:
        await asyncio.gather(sweep_three_times(first), sweep_three_times(second), executor())
        late_events = await drained(events)
        sweep_outcomes = await drained(outcomes)
    await stopped(first)
    await stopped(second)

    ours = set(map(str, runs))
    resource_ids = [
        json.loads(m.body)["resource"]["prefect.resource.id"].removeprefix("prefect.flow-run.")
        for m in late_events
    ]
    events_per_run = collections.Counter(r for r in resource_ids if r in ours)
    answers = [json.loads(m.body) for m in sweep_outcomes]
    answers = [a for a in answers if a["run_id"] in ours]

    history = dict(zip(runs, await histories(engine, "flow_run", runs), strict=True))
    for run_id in runs[100:]:
        assert history[run_id] == ["Scheduled", "Late"], run_id
        assert events_per_run[str(run_id)] == 1
    for run_id in started:
        names = history[run_id]
        assert names[-3:] == ["Pending", "Running", "Completed"], names
        assert names.count("Late") <= 1
        assert names[0] == "Scheduled"
        assert events_per_run[str(run_id)] == names.count("Late")
    assert len({m.message_id for m in late_events}) == len(late_events)
    marked = sum(names.count("Late") for names in history.values())
    assert len(answers) == marked, "one outcome per mark, and no proposal the rules refused"
    assert {(a["status"], a["state"]["name"]) for a in answers} == {("ACCEPT", "Late")}
    assert {a["rule_trace"][0]["rule"] for a in answers if a["rule_trace"]} <= {
        "InstrumentFlowRunStateTransitions"
    }


async def test_a_run_already_late_or_not_yet_due_is_left_alone(
    settings: Settings, engine: AsyncEngine
) -> None:
    """A pass over a run marked Late does not mark it again (no Late → Late), and a run
    scheduled within ARBITER_LATE_AFTER_S is not late yet."""
    late, not_yet = uuid.uuid4(), uuid.uuid4()
    await propose(engine, "flow_run", [late], overdue(), run=FlowRunSpec())
    await propose(engine, "flow_run", [not_yet], overdue(minutes=0.05), run=FlowRunSpec())
    sweeper = await started_sweeper(settings.model_copy(update={"late_after_s": 60.0}))
    try:
        await sweeper.sweep_once()
        await sweeper.sweep_once()
    finally:
        await stopped(sweeper)
    assert await histories(engine, "flow_run", [late, not_yet]) == [
        ["Scheduled", "Late"],
        ["Scheduled"],
    ]


async def test_an_expired_pause_fails_the_run_without_waiting_for_a_proposal(
    settings: Settings, engine: AsyncEngine
) -> None:
    """A paused run past its pause_timeout is failed by the resume rule (the sweep proposes
    FAILED, the rule rejects it into its own Failed state), with its event and a REJECT on
    outcome.flow_run.reject; a pause still in time is untouched."""
    expired, in_time = uuid.uuid4(), uuid.uuid4()
    await propose(
        engine,
        "flow_run",
        [expired, in_time],
        ProposedState(type=StateType.RUNNING),
        run=FlowRunSpec(),
    )
    for run_id, minutes in ((expired, -1), (in_time, 10)):
        timeout = utcnow() + dt.timedelta(minutes=minutes)
        paused = ProposedState(
            type=StateType.PAUSED, state_details=StateDetails(pause_timeout=timeout)
        )
        await propose(engine, "flow_run", [run_id], paused, force=True)
    sweeper = await started_sweeper(settings)
    events_tap = OutcomeTap(settings, "prefect.flow-run.Failed", exchange=settings.events_exchange)
    async with events_tap as events, OutcomeTap(settings, "outcome.flow_run.reject") as outcomes:
        try:
            await sweeper.sweep_once()
        finally:
            await stopped(sweeper)
        answers = [json.loads(m.body) for m in await drained(outcomes)]
        failed_events = [json.loads(m.body) for m in await drained(events, 0.3)]
    [answer] = [a for a in answers if a["run_id"] == str(expired)]
    # The rule's own words: it names the proposed state (FAILED) as Prefect's does.
    assert answer["state"]["message"] == "The flow was failed and never resumed."
    assert answer["details"]["reason"] == (
        "The flow run pause has timed out and can no longer resume."
    )
    assert answer["rule_trace"][0]["rule"] == "HandleResumingPausedFlows"
    assert [e["resource"]["prefect.resource.id"] for e in failed_events].count(
        f"prefect.flow-run.{expired}"
    ) == 1
    assert await histories(engine, "flow_run", [expired, in_time]) == [
        ["Running", "Paused", "Failed"],
        ["Running", "Paused"],
    ]


async def test_task_runs_of_a_cancelled_flow_run_are_cancelled_and_free_their_slots(
    settings: Settings, engine: AsyncEngine
) -> None:
    """The unfinished task runs of a cancelled flow run become Cancelled (their tag slot is
    released); a completed one is left as it is."""
    flow_run = uuid.uuid4()
    running, pending, done = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    tag = f"sweep-{uuid.uuid4().hex[:8]}"
    async with engine.begin() as conn:
        await PgStore(conn).upsert_tag_limit(tag, 1)
    await propose(
        engine, "flow_run", [flow_run], ProposedState(type=StateType.RUNNING), run=FlowRunSpec()
    )
    spec = TaskRunSpec(flow_run_id=flow_run, tags=[tag])
    await propose(engine, "task_run", [pending], ProposedState(type=StateType.PENDING), run=spec)
    for run_id in (running, done):
        await propose(
            engine,
            "task_run",
            [run_id],
            ProposedState(type=StateType.RUNNING),
            run=TaskRunSpec(flow_run_id=flow_run, tags=[tag] if run_id == running else []),
        )
    await propose(engine, "task_run", [done], ProposedState(type=StateType.COMPLETED))
    await propose(
        engine, "flow_run", [flow_run], ProposedState(type=StateType.CANCELLED), force=True
    )
    sweeper = await started_sweeper(settings)
    try:
        first = await sweeper.sweep_once()
        await sweeper.sweep_once()  # a second pass finds nothing of these left to cancel
    finally:
        await stopped(sweeper)
    assert first["cancelled_flow_task_runs"] >= 2
    assert await histories(engine, "task_run", [running, pending, done]) == [
        ["Running", "Cancelled"],
        ["Pending", "Cancelled"],
        ["Running", "Completed"],
    ]
    async with engine.connect() as conn:
        [limit] = [lim for lim in await PgStore(conn).list_tag_limits() if lim.tag == tag]
    assert limit.active_slots == []


async def test_a_worker_marks_a_late_run_by_itself_and_counts_it(
    services: Services, database_url: str, engine: AsyncEngine
) -> None:
    """With ARBITER_SWEEPERS on, a worker marks an overdue run Late with no proposal for it,
    and arbiter_swept_total counts the mark."""
    settings = isolated_settings(services, database_url, sweepers=True, sweep_interval_s=0.2)
    run_id = uuid.uuid4()
    await propose(engine, "flow_run", [run_id], overdue(), run=FlowRunSpec())
    metrics = WorkerMetrics()
    async with running_worker(settings, metrics):
        for _ in range(100):
            if (await histories(engine, "flow_run", [run_id]))[0][-1] == "Late":
                break
            await asyncio.sleep(0.1)
    assert await histories(engine, "flow_run", [run_id]) == [["Scheduled", "Late"]]
    labels = {"sweep": "late_runs", "status": "ACCEPT"}
    assert (metrics.registry.get_sample_value("arbiter_swept_total", labels) or 0) >= 1


def test_arbiter_sweep_runs_one_pass_by_hand(settings: Settings) -> None:
    """`arbiter sweep` runs every sweep once and prints what each transitioned, as JSON."""
    done = arbiter(settings, "sweep")
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)) == {
        "late_runs",
        "expired_pauses",
        "cancelled_flow_task_runs",
        "expired_leases",
        "purged_proposals",
    }
