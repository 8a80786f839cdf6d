"""Fuzz a worker pool: hostile messages mixed with valid proposals, every answer accounted for.

Starts RabbitMQ and PostgreSQL (fsync on, unless ARBITER_AMQP_URL/ARBITER_DATABASE_URL
name servers to use) and N worker processes; measures fire-and-await latency on the
quiet pool; then publishes the same number of valid proposals mixed into M hostile
messages (``tests/fixtures/hostile.py``) and prints what came back: outcomes by status
and error code, messages answered never or twice, dead letters without a reason,
valid latency beside the quiet figure, and the workers' exit codes. Exits 0 only if
every message got exactly one outcome and no valid proposal was refused.

    .venv/bin/python benchmarks/fuzz.py --messages 10000 --workers 2 --seed 7
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import aio_pika

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from arbiter.schemas import FlowRunSpec, ProposedState, RunKind, StateType, TaskRunSpec
from arbiter.worker.client import ArbiterClient
from arbiter.worker.settings import Settings
from devtools.devservices import provide_services
from devtools.loadgen import Recorder, percentile
from devtools.pool import WorkerPool, settings_env
from tests.fixtures.fuzzing import Summary, drive, summarise, top
from tests.fixtures.hostile import FuzzPlan


async def quiet_pool(settings: Settings, proposals: int, executors: int) -> Recorder:
    """Fire-and-await PENDING proposals for new runs on a pool that sees nothing else."""
    remaining, state = list(range(proposals)), ProposedState(type=StateType.PENDING)
    async with ArbiterClient.connect(settings=settings) as client:
        # Warm up connections and caches outside the measurement, as bench.py does.
        await client.propose("task_run", uuid.uuid4(), state, run=TaskRunSpec())
        recorder = Recorder()

        async def executor() -> None:
            while remaining:
                kind: RunKind = "flow_run" if remaining.pop() % 2 else "task_run"
                spec = FlowRunSpec() if kind == "flow_run" else TaskRunSpec(task_key="quiet")
                await recorder.propose(client, kind, uuid.uuid4(), state, run=spec)

        await asyncio.gather(*(executor() for _ in range(executors)))
    return recorder


def _isolated(settings: Settings) -> Settings:
    """``settings`` with exchange and queue names of its own: the dead-letter count then
    holds this run's messages only, on a server named by ARBITER_AMQP_URL too."""
    prefix = f"fuzz-{uuid.uuid4().hex[:8]}"
    names = [name for name in Settings.model_fields if name.endswith(("_exchange", "_queue"))]
    return settings.model_copy(update={name: f"{prefix}.{name}" for name in names})


async def _delete_topology(settings: Settings) -> None:
    """Drop what ``_isolated`` declared, so repeated runs leave nothing behind."""
    async with await aio_pika.connect(settings.amqp_url) as connection:
        channel = await connection.channel()
        for queue in (settings.proposals_queue, settings.dead_queue):
            await channel.queue_delete(queue)
        for name in ("proposals", "outcomes", "dead", "events", "task_runs"):
            await channel.exchange_delete(getattr(settings, f"{name}_exchange"))


def report(summary: Summary, quiet: Recorder, codes: list[int], alive: bool) -> None:
    def ms(samples: list[float], fraction: float) -> str:
        return f"{percentile(samples, fraction) * 1000:.0f} ms"

    print(f"messages           {summary.messages} ({summary.valid} valid proposals, the rest "
          f"hostile, replays or replays with a changed body)")  # fmt: skip
    print(f"outcomes by status {dict(summary.statuses.most_common())}")
    print(f"outcomes by code   {dict(summary.codes.most_common())}")
    print(f"no outcome         {sum(summary.missing.values())}")
    print(f"several outcomes   {sum(summary.duplicated.values())}")
    print(f"dead letters       {summary.dead} ({summary.dead_without_reason} without a reason "
          f"header; {summary.refusals} refusals)")  # fmt: skip
    print(f"valid not accepted {len(summary.refused_valid)}")
    quiet_s, mixed_s = quiet.latencies_s, summary.valid_latency_s
    print(f"valid latency p50  {ms(mixed_s, 0.5)} (quiet pool: {ms(quiet_s, 0.5)})")
    print(f"valid latency p95  {ms(mixed_s, 0.95)} (quiet pool: {ms(quiet_s, 0.95)})")
    print(f"workers            exit codes {codes}; all alive before the stop: {alive}")
    print(f"hostile, decided   {top(summary.hostile_decided)}")
    print("by kind:")
    print(summary.table())
    for problem in summary.problems():
        print(f"PROBLEM: {problem}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=10000, help="hostile messages")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--valid-runs", type=int, default=100, help="3 proposals each")
    parser.add_argument("--executors", type=int, default=16, help="quiet pool, at once")
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds for the mix")
    args = parser.parse_args()

    with provide_services(
        durable=True, amqp_env="ARBITER_AMQP_URL", database_env="ARBITER_DATABASE_URL"
    ) as services:
        settings = _isolated(
            Settings(amqp_url=services.amqp_url, database_url=services.database_url)
        )
        subprocess.run(
            [sys.executable, "-m", "arbiter", "migrate"], env=settings_env(settings), check=True
        )
        with WorkerPool(settings, Path(tempfile.mkdtemp(prefix="arbiter-fuzz-"))) as pool:
            for _ in range(args.workers):
                pool.start()
            quiet = asyncio.run(quiet_pool(settings, 3 * args.valid_runs, args.executors))
            plan = FuzzPlan(
                args.seed,
                hostile=args.messages,
                valid_runs=args.valid_runs,
                max_bytes=settings.max_message_bytes,
                id_salt=uuid.uuid4().int,
            )
            seen = asyncio.run(drive(settings, plan, deadline_s=args.deadline))
            alive = all(proc.poll() is None for proc in pool.procs)
            codes = pool.stop()
        asyncio.run(_delete_topology(settings))
    summary = summarise(plan, seen)
    print(f"workers={args.workers} seed={args.seed} mix={seen.elapsed_s:.1f} s logs={pool.log_dir}")
    report(summary, quiet, codes, alive)
    answered_once = not (summary.missing or summary.duplicated or summary.publish_errors)
    return 0 if answered_once and not summary.refused_valid else 1


if __name__ == "__main__":
    sys.exit(main())
