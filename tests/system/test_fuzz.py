"""Hostile traffic on two worker processes: every message answered once, valid ones accepted.

The mix comes from ``tests/fixtures/hostile.py`` (seeded, so a failure reproduces); the
driver and the verdict are in ``tests/fixtures/fuzzing.py``, shared with
``benchmarks/fuzz.py``, which runs the same mix at larger sizes and prints it.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from arbiter.worker.settings import Settings
from devtools.pool import WorkerPool
from tests.fixtures.fuzzing import drive, summarise
from tests.fixtures.hostile import FuzzPlan

pytestmark = pytest.mark.system

SEED = 20261203
HOSTILE = 2300
VALID_RUNS = 100  # PENDING → RUNNING → COMPLETED each: 300 valid proposals, then replays


@pytest.mark.timeout(240)
async def test_hostile_messages_are_each_answered_once_and_cost_no_valid_proposal(
    settings: Settings, worker_processes: WorkerPool
) -> None:
    """About 2,700 messages, 2,300 of them hostile, on two workers: each gets exactly one
    outcome, every valid proposal is accepted (a replay answered as its original), every
    refusal is dead-lettered once with a reason, and neither worker falls over."""
    workers = [worker_processes.start(), worker_processes.start()]
    plan = FuzzPlan(
        SEED,
        hostile=HOSTILE,
        valid_runs=VALID_RUNS,
        max_bytes=settings.max_message_bytes,
        id_salt=uuid.uuid4().int,
    )
    seen = await drive(settings, plan, deadline_s=90)
    summary = summarise(plan, seen)

    problems = summary.problems()
    fallen = [(proc.pid, proc.returncode) for proc in workers if proc.poll() is not None]
    if fallen or worker_processes.procs != workers:
        problems.append(f"workers died or were replaced (pid, exit code): {fallen}")
    codes = await asyncio.to_thread(worker_processes.stop)
    if codes != [0, 0]:
        problems.append(f"a SIGTERM stop gave exit codes {codes}, not [0, 0]")
    assert not problems, "\n".join(
        [f"seed {SEED}, {summary.messages} messages:", *problems, "by kind:", summary.table()]
    )
