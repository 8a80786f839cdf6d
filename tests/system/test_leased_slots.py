"""A tag limit (global, or V1) under fire: two worker processes, one SIGKILLed and restarted twice,
60 task runs racing for 3 leased slots. The slot invariant holds throughout."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from arbiter.schemas import OutcomeStatus, ProposedState, StateType, TaskRunSpec
from arbiter.worker.client import ArbiterClient
from arbiter.worker.db.engine import create_engine
from arbiter.worker.db.store import PgStore
from arbiter.worker.settings import Settings
from devtools.pool import WorkerPool, settings_env
from tests.integration.test_worker_roundtrip import history_of

pytestmark = pytest.mark.system

RUNS = 60
LIMIT = 3


async def running_now(
    settings: Settings, run_ids: list[uuid.UUID], tag: str, kind: str
) -> tuple[int, int]:
    """(task runs RUNNING, slots held) as the database says now."""
    engine = create_engine(settings.database_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            store = PgStore(conn)
            rows = await store.fetch_rows(
                "SELECT count(*) AS n FROM task_run WHERE state_type = 'RUNNING'"
                " AND id = ANY($1::uuid[])",
                run_ids,
            )
            if kind == "global":
                limits = await store.list_global_limits()
                [held] = [lim.active_slots for lim in limits if lim.name == f"tag:{tag}"]
            else:
                tag_limits = await store.list_tag_limits()
                [held] = [len(lim.active_slots) for lim in tag_limits if lim.tag == tag]
    finally:
        await engine.dispose()
    return int(rows[0][0]), held


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", ["global", "v1"])
async def test_sixty_tasks_three_leased_slots_and_a_worker_killed_twice(
    settings: Settings, tmp_path: Path, kind: str
) -> None:
    """Each executor proposes RUNNING once (the pool follows its WAITs), works 0.1 s and
    proposes COMPLETED. Meanwhile one worker is SIGKILLed and restarted, twice. Sampled
    throughout: never more than 3 RUNNING, never more slots than the limit; at the end
    every run COMPLETED after one RUNNING, and no slot held."""
    settings = settings.model_copy(
        update={"tag_concurrency_slot_wait_s": 1, "parked_poll_s": 0.2, "slot_lease_ttl_s": 60}
    )
    tag = f"leased-{uuid.uuid4().hex[:8]}"
    limit_args = ["--global", f"tag:{tag}", "3"] if kind == "global" else [tag, "3"]
    await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "arbiter", "limits", "set", *limit_args],
        env=settings_env(settings),
        check=True,
        capture_output=True,
    )
    run_ids = [uuid.uuid4() for _ in range(RUNS)]
    spec = TaskRunSpec(task_key="leased", tags=[tag])
    samples: list[tuple[int, int]] = []
    with WorkerPool(settings, tmp_path, concurrency=8) as pool:
        victim = pool.start()
        pool.start()
        async with ArbiterClient.connect(settings=settings) as client:

            async def execute(run_id: uuid.UUID) -> list[OutcomeStatus]:
                pending = ProposedState(type=StateType.PENDING)
                await client.propose("task_run", run_id, pending, run=spec, timeout_s=60)
                running = await client.propose(
                    "task_run",
                    run_id,
                    ProposedState(type=StateType.RUNNING),
                    follow_waits=True,
                    max_wait_s=180,
                    timeout_s=60,
                )
                await asyncio.sleep(0.1)
                done = await client.propose(
                    "task_run", run_id, ProposedState(type=StateType.COMPLETED), timeout_s=60
                )
                return [running.status, done.status]

            async def sample(until: asyncio.Event) -> None:
                while not until.is_set():
                    samples.append(await running_now(settings, run_ids, tag, kind))
                    await asyncio.sleep(0.05)

            finished = asyncio.Event()
            sampler = asyncio.create_task(sample(finished))
            executors = asyncio.gather(*(execute(run_id) for run_id in run_ids))
            for _ in range(2):
                await asyncio.sleep(1.5)
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                victim = pool.start()
            statuses = await asyncio.wait_for(executors, 200)
            finished.set()
            await sampler
        codes = pool.stop()

    assert statuses == [[OutcomeStatus.ACCEPT, OutcomeStatus.ACCEPT]] * RUNS
    assert samples, "the sampler saw nothing"
    assert max(running for running, _ in samples) <= LIMIT
    assert max(held for _, held in samples) <= LIMIT
    assert max(running for running, _ in samples) == LIMIT  # the limit was actually reached
    assert await running_now(settings, run_ids, tag, kind) == (0, 0)
    for run_id in run_ids:
        assert await history_of(settings, run_id, "task_run") == ["Pending", "Running", "Completed"]
    assert codes == [-signal.SIGKILL, 0, -signal.SIGKILL, 0]
