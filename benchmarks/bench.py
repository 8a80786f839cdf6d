"""Throughput and fire-and-await latency of a worker pool, on durable PostgreSQL.

Starts RabbitMQ and PostgreSQL (fsync on, unless ARBITER_AMQP_URL/ARBITER_DATABASE_URL
name servers to use), N worker processes, and K concurrent executors that drive M
task runs through PENDING → RUNNING → COMPLETED with persistent messages, then prints
transitions/s and the p50/p95/p99 latency of one propose-and-await round trip.

    .venv/bin/python benchmarks/bench.py --workers 2 --runs 2000 --executors 64
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from schemas import OutcomeStatus, ProposedState, StateType, TaskRunSpec
from worker.client import ArbiterClient
from worker.devservices import provide_services
from worker.loadgen import Recorder
from worker.pool import WorkerPool, settings_env
from worker.settings import Settings

LIFECYCLE = (StateType.PENDING, StateType.RUNNING, StateType.COMPLETED)


async def drive(settings: Settings, runs: int, executors: int) -> Recorder:
    queue: asyncio.Queue[uuid.UUID] = asyncio.Queue()
    for _ in range(runs):
        queue.put_nowait(uuid.uuid4())
    async with ArbiterClient.connect(settings=settings) as client:
        # Warm up connections and caches outside the measurement.
        await client.propose(
            "task_run", uuid.uuid4(), ProposedState(type=StateType.PENDING), run=TaskRunSpec()
        )
        recorder = Recorder()

        async def executor() -> None:
            while not queue.empty():
                run_id = queue.get_nowait()
                for index, state_type in enumerate(LIFECYCLE):
                    outcome = await recorder.propose(
                        client,
                        "task_run",
                        run_id,
                        ProposedState(type=state_type),
                        run=TaskRunSpec(task_key="bench") if index == 0 else None,
                    )
                    if outcome.status is not OutcomeStatus.ACCEPT:
                        raise RuntimeError(f"unexpected {outcome.status}: {outcome.details}")

        await asyncio.gather(*(executor() for _ in range(executors)))
    return recorder


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--executors", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16, help="per worker")
    args = parser.parse_args()

    with provide_services(
        durable=True, amqp_env="ARBITER_AMQP_URL", database_env="ARBITER_DATABASE_URL"
    ) as services:
        settings = Settings(
            amqp_url=services.amqp_url,
            database_url=services.database_url,
            concurrency=args.concurrency,
            prefetch=args.concurrency * 2,
        )
        subprocess.run(
            [sys.executable, "-m", "worker.cli", "migrate"], env=settings_env(settings), check=True
        )
        with WorkerPool(settings, Path(tempfile.mkdtemp(prefix="arbiter-bench-"))) as pool:
            for _ in range(args.workers):
                pool.start()
            time.sleep(1.0)
            cpu_before = sum(cpu_seconds(proc.pid) for proc in pool.procs)
            recorder = asyncio.run(drive(settings, args.runs, args.executors))
            elapsed = recorder.elapsed_s()
            worker_cpu = sum(cpu_seconds(proc.pid) for proc in pool.procs) - cpu_before
    latency = recorder.latency_ms()
    print(
        f"workers={args.workers} concurrency/worker={args.concurrency} runs={args.runs} "
        f"executors={args.executors} durable PostgreSQL (fsync on), persistent messages"
    )
    print(f"transitions      {recorder.count}")
    print(f"elapsed          {elapsed:.2f} s")
    print(f"transitions/s    {recorder.count / elapsed:.1f}")
    print(f"latency p50      {latency['p50']:.1f} ms")
    print(f"latency p95      {latency['p95']:.1f} ms")
    print(f"latency p99      {latency['p99']:.1f} ms")
    # Steadier than transitions/s on a shared box: what one transition costs the workers.
    print(f"worker CPU/trans {worker_cpu / recorder.count * 1000:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
