"""Two worker processes, one SIGKILLed and restarted mid-stream: nothing lost, nothing doubled."""

from __future__ import annotations

import asyncio
import signal
import uuid

import pytest

from arbiter.schemas import FlowRunSpec, OutcomeStatus, ProposedState, StateType
from arbiter.worker.client import ArbiterClient
from arbiter.worker.settings import Settings
from devtools.pool import WorkerPool
from tests.fixtures.written import written_for

pytestmark = pytest.mark.system

LIFECYCLE = (StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.COMPLETED)
RUNS = 260  # 1,040 proposals
IN_FLIGHT_RUNS = 40
KILL_AFTER = 300  # outcomes received before the SIGKILL


async def drive(
    client: ArbiterClient, run_id: uuid.UUID, done: list[int], midway: asyncio.Event
) -> list[OutcomeStatus]:
    statuses = []
    for index, state_type in enumerate(LIFECYCLE):
        outcome = await client.propose(
            "flow_run",
            run_id,
            ProposedState(type=state_type),
            run=FlowRunSpec(name=f"run-{run_id}") if index == 0 else None,
            timeout_s=120,
        )
        statuses.append(outcome.status)
        done[0] += 1
        if done[0] >= KILL_AFTER:
            midway.set()
    return statuses


@pytest.mark.timeout(300)
async def test_a_killed_worker_loses_nothing_and_doubles_nothing(
    settings: Settings, worker_processes: WorkerPool
) -> None:
    """1,040 proposals, a worker SIGKILLed and restarted: every proposal answered, one row each."""
    first = worker_processes.start()
    worker_processes.start()
    run_ids = [uuid.uuid4() for _ in range(RUNS)]
    done = [0]
    midway = asyncio.Event()
    slots = asyncio.Semaphore(IN_FLIGHT_RUNS)

    async def bounded(run_id: uuid.UUID) -> list[OutcomeStatus]:
        async with slots:
            return await drive(client, run_id, done, midway)

    async with ArbiterClient.connect(settings=settings) as client:
        drivers = asyncio.gather(*(bounded(run_id) for run_id in run_ids))
        await midway.wait()
        first.send_signal(signal.SIGKILL)
        first.wait()
        await asyncio.sleep(0.5)
        worker_processes.start()
        results = await drivers

    assert all(statuses == [OutcomeStatus.ACCEPT] * 4 for statuses in results)
    written = await written_for(settings, "flow_run", run_ids)
    ids = [str(r) for r in run_ids]
    counts, processed = written.states, written.processed
    assert counts == {run_id: (4, 4) for run_id in ids}
    assert processed == RUNS * len(LIFECYCLE)
    assert worker_processes.stop()[1:] == [0, 0]


@pytest.mark.timeout(120)
async def test_sigterm_drains_in_flight_proposals_and_exits_zero(
    settings: Settings, worker_processes: WorkerPool
) -> None:
    """SIGTERM while proposals are in flight: each is answered, the process exits 0."""
    proc = worker_processes.start()
    async with ArbiterClient.connect(settings=settings) as client:
        futures = [
            await client.publish(
                "flow_run", uuid.uuid4(), ProposedState(type=StateType.PENDING), run=FlowRunSpec()
            )
            for _ in range(100)
        ]
        await asyncio.wait_for(futures[0], 60)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0
        answered = [f for f in futures if f.done()]
        # Whatever the draining worker took was answered; the rest waits in the queue.
        assert answered
        assert all(f.result().status is OutcomeStatus.ACCEPT for f in answered)
        worker_processes.start()
        outcomes = await asyncio.wait_for(asyncio.gather(*futures), 60)
    assert all(o.status is OutcomeStatus.ACCEPT for o in outcomes)
