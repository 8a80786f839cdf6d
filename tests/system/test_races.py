"""Races between two worker processes: the run lock and the tag-limit locks decide, once."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid

import pytest

from arbiter.schemas import FlowRunSpec, OutcomeStatus, ProposedState, StateType, TaskRunSpec
from arbiter.worker.client import ArbiterClient
from arbiter.worker.settings import Settings
from devtools.pool import WorkerPool, settings_env
from tests.integration.test_worker_roundtrip import OutcomeTap, history_of, publish_raw

pytestmark = pytest.mark.system


@pytest.mark.timeout(120)
async def test_forty_simultaneous_pending_proposals_give_one_accept(
    settings: Settings, worker_processes: WorkerPool
) -> None:
    """40 PENDING proposals for one SCHEDULED flow run: exactly one is accepted."""
    worker_processes.start()
    worker_processes.start()
    run_id = uuid.uuid4()
    async with ArbiterClient.connect(settings=settings) as client:
        first = await client.propose(
            "flow_run", run_id, ProposedState(type=StateType.SCHEDULED), run=FlowRunSpec()
        )
        assert first.status is OutcomeStatus.ACCEPT
        futures = [
            await client.publish("flow_run", run_id, ProposedState(type=StateType.PENDING))
            for _ in range(40)
        ]
        outcomes = await asyncio.wait_for(asyncio.gather(*futures), 60)
    statuses = sorted(o.status.value for o in outcomes)
    assert statuses == ["ABORT"] * 39 + ["ACCEPT"]


@pytest.mark.timeout(180)
async def test_thirty_tasks_racing_for_a_limit_of_three(
    settings: Settings, worker_processes: WorkerPool
) -> None:
    """30 task runs propose RUNNING under a tag limit of 3: 3 ACCEPT; none held at the end."""
    tag = f"race-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "arbiter", "limits", "set", tag, "3"],
        env=settings_env(settings),
        check=True,
        capture_output=True,
    )
    worker_processes.start()
    worker_processes.start()
    async with ArbiterClient.connect(settings=settings) as client:
        flow_id = uuid.uuid4()
        await client.propose(
            "flow_run", flow_id, ProposedState(type=StateType.RUNNING), run=FlowRunSpec()
        )
        task_ids = [uuid.uuid4() for _ in range(30)]
        spec = TaskRunSpec(flow_run_id=flow_id, tags=[tag])
        await asyncio.gather(
            *(
                client.propose("task_run", t, ProposedState(type=StateType.PENDING), run=spec)
                for t in task_ids
            )
        )
        running = await asyncio.gather(
            *(
                client.propose("task_run", t, ProposedState(type=StateType.RUNNING))
                for t in task_ids
            )
        )
        accepted = [
            t for t, o in zip(task_ids, running, strict=True) if o.status is OutcomeStatus.ACCEPT
        ]
        assert len(accepted) == 3
        assert {o.status for o in running} == {OutcomeStatus.ACCEPT, OutcomeStatus.WAIT}
        finished = await asyncio.gather(
            *(
                client.propose("task_run", t, ProposedState(type=StateType.COMPLETED))
                for t in accepted
            )
        )
        assert all(o.status is OutcomeStatus.ACCEPT for o in finished)
    listed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "arbiter", "limits", "ls", "--json"],
        env=settings_env(settings),
        check=True,
        capture_output=True,
        text=True,
    )
    [limit] = [row for row in json.loads(listed.stdout) if row["tag"] == tag]
    assert limit["active_slots"] == []


@pytest.mark.timeout(120)
async def test_twenty_copies_of_one_proposal_write_once(
    settings: Settings, worker_processes: WorkerPool
) -> None:
    """One proposal published 20 times at once (an executor republishing), consumed by two
    workers: one state is written and all 20 answers are the same outcome."""
    worker_processes.start()
    worker_processes.start()
    run_id = uuid.uuid4()
    async with ArbiterClient.connect(settings=settings) as client:
        created = await client.propose(
            "flow_run", run_id, ProposedState(type=StateType.SCHEDULED), run=FlowRunSpec()
        )
    assert created.status is OutcomeStatus.ACCEPT
    proposal_id = uuid.uuid4()
    body = json.dumps(
        {
            "schema_version": 1,
            "proposal_id": str(proposal_id),
            "run_kind": "flow_run",
            "run_id": str(run_id),
            "state": {"type": "PENDING"},
        }
    ).encode()
    async with OutcomeTap(settings, "copies.key") as tap:
        await asyncio.gather(
            *(publish_raw(settings, body, reply_to="copies.key") for _ in range(20))
        )
        answers = [await tap.next(timeout_s=60) for _ in range(20)]
    outcomes = {answer.body for answer in answers}
    assert len(outcomes) == 1
    assert json.loads(next(iter(outcomes)))["status"] == "ACCEPT"
    assert await history_of(settings, run_id) == ["Scheduled", "Pending"]
