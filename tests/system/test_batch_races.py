"""Batches from two worker processes at once: over runs and tag limits they share, and
through a SIGKILL. Each test publishes a backlog before the workers start, so both find
work waiting and settle it in batches from the start.
"""

from __future__ import annotations

import asyncio
import random
import signal
import urllib.request
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from arbiter.schemas import Outcome, OutcomeStatus, StateType
from arbiter.worker.db.engine import create_engine
from arbiter.worker.db.store import PgStore
from arbiter.worker.settings import Settings
from devtools.devservices import Services
from devtools.pool import WorkerPool
from tests.fixtures.services import isolated_settings
from tests.fixtures.written import written_for
from tests.integration.test_batches import (
    Answers,
    Document,
    body,
    collect,
    flow,
    outcome,
    outcome_tap,
    proposal_id_of,
    publish_backlog,
    settle_alone,
    task,
)
from tests.integration.test_worker_roundtrip import OutcomeTap, history_of

pytestmark = pytest.mark.system

RACERS = {"a": 12, "ab": 8, "b": 10}  # task runs per tag set: tags "a", both, "b"
LIMITS = {"a": 3, "b": 2}
PILED_RUNS, PILE = 6, 40  # flow runs, and PENDING proposals for each
NEW_RUNS, FIRSTS = 4, 20  # flow runs not created yet, and first proposals (with `run`) for each
CRASH_RUNS = 200  # task runs, P → R → C each
KILL_AFTER = 80  # outcomes of the first step seen before the SIGKILL


@pytest.fixture
def settings(services: Services, database_url: str) -> Settings:
    """Windows of 32 deliveries (a few batches of up to 16), so neither worker takes a whole
    backlog and each runs several batches at once; metrics served, so a test can read each
    worker's batch sizes."""
    return isolated_settings(services, database_url, prefetch=32, batch_max=16, metrics_port=0)


async def set_limits(settings: Settings, limits: dict[str, int]) -> None:
    engine = create_engine(settings.database_url)
    try:
        async with engine.begin() as conn:
            for tag, limit in limits.items():
                await PgStore(conn).upsert_tag_limit(tag, limit)
    finally:
        await engine.dispose()


async def active_slots(settings: Settings, tags: Sequence[str]) -> dict[str, set[str]]:
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            limits = await PgStore(conn).list_tag_limits()
    finally:
        await engine.dispose()
    return {limit.tag: set(limit.active_slots) for limit in limits if limit.tag in tags}


async def collect_all(tap: OutcomeTap, ids: set[uuid.UUID], answers: Answers) -> None:
    """Collect into ``answers`` until every id in ``ids`` has at least one answer."""
    while not ids <= answers.keys():
        for proposal_id, bodies in (await collect(tap, 1, timeout_s=30)).items():
            answers.setdefault(proposal_id, []).extend(bodies)


def batch_counts(pool: WorkerPool) -> list[tuple[int, int]]:
    """Per worker: (transactions committed, those that settled two proposals or more)."""
    counts = []
    for port in pool.ports:
        assert port is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
            families = text_string_to_metric_families(page.read().decode())
            [family] = [f for f in families if f.name == "arbiter_batch_size"]
        samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
        total = int(samples[("arbiter_batch_size_count", None)])
        counts.append((total, total - int(samples[("arbiter_batch_size_bucket", "1.0")])))
    return counts


def assert_no_error_answers(answers: Answers) -> None:
    """Every copy of a proposal got the same answer, and no answer reports an error."""
    for proposal_id, bodies in answers.items():
        assert len(set(bodies)) == 1, f"{proposal_id} was answered differently: {bodies}"
        answer = Outcome.model_validate_json(bodies[0])
        reason = answer.details.reason or ""
        assert answer.status is not OutcomeStatus.INVALID, answer
        assert answer.error is None, answer
        assert not reason.startswith("Aborting orchestration due to error"), answer
        assert "deadlock" not in reason.lower(), answer


def first_answer(answers: Answers, document: Document) -> Outcome:
    return Outcome.model_validate_json(answers[proposal_id_of(document)][0])


def deadlock_lines(log_dir: Path) -> list[str]:
    """Log lines that mention a deadlock other than as a batch split (which is internal:
    the halves are run again and nobody is answered with it)."""
    return [
        line
        for log in sorted(log_dir.glob("worker-*.log"))
        for line in log.read_text(errors="replace").splitlines()
        if "deadlock" in line.lower() and "splitting it" not in line
    ]


@pytest.mark.timeout(90)
async def test_two_workers_batching_over_shared_runs_and_tag_limits_decide_each_once(
    settings: Settings, worker_processes: WorkerPool, tmp_path: Path
) -> None:
    """30 task runs race to RUNNING under two shared tag limits (3 on "a", 2 on "b", 8 runs
    holding both), each proposal published twice, mixed with 40 PENDING proposals for each
    of 6 flow runs and 20 first proposals for each of 4 new ones; two workers settle the
    backlog in concurrent batches. Exactly the limit
    is accepted per tag and every other racer WAITs, each pile gives one ACCEPT, copies get
    one answer, and no proposal is answered with an error or a deadlock."""
    suffix = uuid.uuid4().hex[:8]
    tags = {name: f"race-{name}-{suffix}" for name in LIMITS}
    await set_limits(settings, {tags[name]: limit for name, limit in LIMITS.items()})
    flow_id = uuid.uuid4()
    racers = {
        uuid.uuid4(): [tags[name] for name in tag_set]
        for tag_set, count in RACERS.items()
        for _ in range(count)
    }
    piled = [uuid.uuid4() for _ in range(PILED_RUNS)]
    # The flow runs first: a task run naming a flow run still being created in a concurrent
    # transaction would rightly be unknown_run.
    for setup in (
        [
            flow(flow_id, StateType.RUNNING, run={}),
            *(flow(r, StateType.SCHEDULED, run={}) for r in piled),
        ],
        [
            task(run_id, StateType.PENDING, run={"flow_run_id": str(flow_id), "tags": run_tags})
            for run_id, run_tags in racers.items()
        ],
    ):
        set_up = await settle_alone(settings, setup)
        assert {outcome(set_up, d).status for d in setup} == {OutcomeStatus.ACCEPT}

    starts = {run_id: task(run_id, StateType.RUNNING) for run_id in racers}
    piles = {run_id: [flow(run_id, StateType.PENDING) for _ in range(PILE)] for run_id in piled}
    born = [uuid.uuid4() for _ in range(NEW_RUNS)]
    piles.update((r, [flow(r, StateType.PENDING, run={}) for _ in range(FIRSTS)]) for r in born)
    backlog = [*starts.values(), *starts.values(), *(d for p in piles.values() for d in p)]
    random.Random(7).shuffle(backlog)
    async with outcome_tap(settings) as tap:
        await publish_backlog(settings, [body(d) for d in backlog])
        worker_processes.start()
        worker_processes.start()
        answers = await collect(tap, len(backlog), timeout_s=30)
        per_worker = await asyncio.to_thread(batch_counts, worker_processes)
    assert await asyncio.to_thread(worker_processes.stop) == [0, 0]

    assert_no_error_answers(answers)
    assert [len(answers[proposal_id_of(d)]) for d in starts.values()] == [2] * len(racers)
    started = {run_id: first_answer(answers, d).status for run_id, d in starts.items()}
    assert set(started.values()) == {OutcomeStatus.ACCEPT, OutcomeStatus.WAIT}
    accepted = {str(run_id) for run_id, status in started.items() if status is OutcomeStatus.ACCEPT}
    slots = await active_slots(settings, list(tags.values()))
    for name, limit in LIMITS.items():
        holders = {str(run_id) for run_id, run_tags in racers.items() if tags[name] in run_tags}
        assert len(accepted & holders) == limit, name
        assert slots[tags[name]] == accepted & holders, name
    for run_id in racers:
        expected = ["Pending", "Running"] if str(run_id) in accepted else ["Pending"]
        assert await history_of(settings, run_id, "task_run") == expected
    for run_id, pile in piles.items():
        statuses = Counter(outcome(answers, d).status for d in pile)
        assert statuses == {OutcomeStatus.ACCEPT: 1, OutcomeStatus.ABORT: len(pile) - 1}
        history = ["Pending"] if run_id in born else ["Scheduled", "Pending"]
        assert await history_of(settings, run_id) == history
    # Both workers settled batches of several from the one backlog.
    assert all(several > 0 for _, several in per_worker), per_worker
    assert deadlock_lines(tmp_path) == []


@pytest.mark.timeout(120)
async def test_a_worker_killed_mid_batches_loses_and_doubles_nothing(
    settings: Settings, worker_processes: WorkerPool
) -> None:
    """600 proposals over 200 task runs (PENDING, then RUNNING, then COMPLETED for each),
    each step a backlog of 200 drained by two workers in batches; one worker is SIGKILLed
    in the middle of the first and restarted. Every proposal is answered (copies only as
    identical replays), each run has its three states once, 600 proposal ids are recorded.

    A step is published once the previous one is answered, as executors do: proposals in
    flight together have no order (two workers, several batches each), so a run's RUNNING
    could overtake its PENDING and be, rightly, INVALID unknown_run.
    """
    runs = [uuid.uuid4() for _ in range(CRASH_RUNS)]
    random.Random(11).shuffle(runs)
    steps = [
        [task(r, step, run={} if step is StateType.PENDING else None) for r in runs]
        for step in (StateType.PENDING, StateType.RUNNING, StateType.COMPLETED)
    ]
    backlog = [d for step in steps for d in step]
    answers: Answers = {}
    async with outcome_tap(settings) as tap:
        await publish_backlog(settings, [body(d) for d in steps[0]])
        victim = worker_processes.start()
        worker_processes.start()
        while len(answers) < KILL_AFTER:
            for proposal_id, bodies in (await collect(tap, 1, timeout_s=30)).items():
                answers.setdefault(proposal_id, []).extend(bodies)
        victim.send_signal(signal.SIGKILL)
        await asyncio.to_thread(victim.wait)
        answered_at_kill = len(answers)
        worker_processes.start()
        for step in steps:
            if step is not steps[0]:
                await publish_backlog(settings, [body(d) for d in step])
            await collect_all(tap, {proposal_id_of(d) for d in step}, answers)
        assert (await asyncio.to_thread(worker_processes.stop))[1:] == [0, 0]
        while not tap.messages.empty():  # late copies (replays) count too
            message = tap.messages.get_nowait()
            answers[uuid.UUID(str(message.message_id))].append(message.body)

    assert answered_at_kill < len(steps[0]), "the kill came after the backlog drained"
    assert answers.keys() == {proposal_id_of(d) for d in backlog}
    assert_no_error_answers(answers)
    assert {first_answer(answers, d).status for d in backlog} == {OutcomeStatus.ACCEPT}
    written = await written_for(settings, "task_run", runs)
    run_ids = [str(r) for r in runs]
    states, recorded = written.states, written.processed
    assert states == {run_id: (3, 3) for run_id in run_ids}
    assert recorded == len(backlog)
