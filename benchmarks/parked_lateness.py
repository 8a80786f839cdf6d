"""How late a parked WAIT is re-evaluated after its due time, with the pool under load.

Starts RabbitMQ and PostgreSQL (durable, as bench.py does) and W worker processes. While K
executors drive task runs PENDING → RUNNING → COMPLETED as fast as they are answered (the
load), parked proposals are made two ways, all with ``follow_waits``:

- flow runs scheduled 1 to 8 s ahead, proposed RUNNING at once (WaitForScheduledTime: a
  WAIT for the time left);
- task runs sharing a tag limited to ``--limit``, each proposed RUNNING once and completed
  0.2 s after its ACCEPT (SecureTaskConcurrencySlots: WAITs of TAG_CONCURRENCY_SLOT_WAIT_S).

Lateness is what the workers measure when they claim a due proposal (``now - due_at``,
histogram ``arbiter_parked_lateness_seconds``); p50 and p99 are interpolated in its
buckets, as Prometheus' histogram_quantile does.

    .venv/bin/python benchmarks/parked_lateness.py --workers 2 --executors 16 \
        --flows 200 --tasks 100
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arbiter.schemas import FlowRunSpec, OutcomeStatus, ProposedState, StateType, TaskRunSpec
from arbiter.schemas.states import StateDetails, utcnow
from arbiter.worker.client import ArbiterClient
from arbiter.worker.db.engine import create_engine
from arbiter.worker.db.store import PgStore
from arbiter.worker.settings import Settings
from benchmarks.bench import wait_for_consumers
from benchmarks.scrape import Samples, scrape
from devtools.devservices import provide_services
from devtools.pool import WorkerPool, settings_env

LIFECYCLE = (StateType.PENDING, StateType.RUNNING, StateType.COMPLETED)
HISTOGRAM = "arbiter_parked_lateness_seconds"


def quantile(samples: Samples, q: float) -> float | None:
    """histogram_quantile over the summed buckets of every worker."""
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (name, labels), value in samples.items()
        if name == f"{HISTOGRAM}_bucket"
    )
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            share = (rank - lower_count) / max(count - lower_count, 1e-9)
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return None


async def load(client: ArbiterClient, stop: asyncio.Event, executors: int) -> int:
    done = 0

    async def executor() -> None:
        nonlocal done
        while not stop.is_set():
            run_id = uuid.uuid4()
            for index, state_type in enumerate(LIFECYCLE):
                spec = TaskRunSpec(task_key="load") if index == 0 else None
                await client.propose("task_run", run_id, ProposedState(type=state_type), run=spec)
                done += 1

    await asyncio.gather(*(executor() for _ in range(executors)))
    return done


async def parked_flow(client: ArbiterClient) -> OutcomeStatus:
    run_id = uuid.uuid4()
    start = utcnow() + dt.timedelta(seconds=random.uniform(1, 8))
    scheduled = ProposedState(
        type=StateType.SCHEDULED, state_details=StateDetails(scheduled_time=start)
    )
    await client.propose("flow_run", run_id, scheduled, run=FlowRunSpec())
    await client.propose("flow_run", run_id, ProposedState(type=StateType.PENDING))
    running = ProposedState(type=StateType.RUNNING)
    outcome = await client.propose("flow_run", run_id, running, follow_waits=True, max_wait_s=120)
    return outcome.status


async def parked_task(client: ArbiterClient, flow_run: uuid.UUID, tag: str) -> OutcomeStatus:
    run_id = uuid.uuid4()
    spec = TaskRunSpec(flow_run_id=flow_run, tags=[tag])
    await client.propose("task_run", run_id, ProposedState(type=StateType.PENDING), run=spec)
    running = ProposedState(type=StateType.RUNNING)
    outcome = await client.propose("task_run", run_id, running, follow_waits=True, max_wait_s=600)
    await asyncio.sleep(0.2)
    await client.propose("task_run", run_id, ProposedState(type=StateType.COMPLETED))
    return outcome.status


async def measure(args: argparse.Namespace, settings: Settings, pool: WorkerPool) -> None:
    for _ in range(args.workers):
        pool.start()
    await wait_for_consumers(settings, pool)
    tag = f"bench-{uuid.uuid4().hex[:8]}"
    engine = create_engine(settings.database_url)
    async with engine.begin() as conn:
        await PgStore(conn).upsert_tag_limit(tag, args.limit)
    await engine.dispose()
    async with ArbiterClient.connect(settings=settings) as client:
        flow_run = uuid.uuid4()
        await client.propose(
            "flow_run", flow_run, ProposedState(type=StateType.RUNNING), run=FlowRunSpec()
        )
        stop = asyncio.Event()
        began = time.monotonic()
        background = asyncio.create_task(load(client, stop, args.executors))
        statuses = await asyncio.gather(
            *(parked_flow(client) for _ in range(args.flows)),
            *(parked_task(client, flow_run, tag) for _ in range(args.tasks)),
        )
        stop.set()
        transitions = await background
        elapsed = time.monotonic() - began
    samples = scrape(pool.ports) or {}
    count = samples.get((f"{HISTOGRAM}_count", ()), 0)
    p50, p99 = quantile(samples, 0.5), quantile(samples, 0.99)
    total = samples.get((f"{HISTOGRAM}_sum", ()), 0.0)
    print(
        f"workers={args.workers} load executors={args.executors} parked flows={args.flows}"
        f" tasks={args.tasks} limit={args.limit} parked_poll_s={settings.parked_poll_s}"
    )
    print(f"final outcomes   {dict(sorted(_count(statuses).items()))}")
    print(
        f"load             {transitions} transitions in {elapsed:.1f} s"
        f" ({transitions / elapsed:.0f}/s)"
    )
    print(f"re-evaluations   {count:.0f}, mean lateness {total / max(count, 1) * 1000:.1f} ms")
    print(f"lateness p50     {_ms(p50)}")
    print(f"lateness p99     {_ms(p99)}")


def _count(statuses: list[OutcomeStatus]) -> dict[str, int]:
    counted: dict[str, int] = {}
    for status in statuses:
        counted[status.value] = counted.get(status.value, 0) + 1
    return counted


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--executors", type=int, default=16, help="load: fire-and-await executors")
    parser.add_argument("--flows", type=int, default=200, help="flow runs parked until scheduled")
    parser.add_argument("--tasks", type=int, default=100, help="task runs parked on a tag limit")
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument(
        "--slot-wait-s", type=int, default=1, help="ARBITER_TAG_CONCURRENCY_SLOT_WAIT_S"
    )
    args = parser.parse_args()
    with provide_services(
        durable=True, amqp_env="ARBITER_AMQP_URL", database_env="ARBITER_DATABASE_URL"
    ) as services:
        settings = Settings(
            amqp_url=services.amqp_url,
            database_url=services.database_url,
            metrics_port=0,
            tag_concurrency_slot_wait_s=args.slot_wait_s,
        )
        migrate = subprocess.run(
            [sys.executable, "-m", "arbiter", "migrate"],
            env=settings_env(settings),
            capture_output=True,
            text=True,
            check=False,
        )
        if migrate.returncode != 0:
            print(migrate.stdout, migrate.stderr, sep="\n", file=sys.stderr)
            return 2
        with WorkerPool(settings, Path(tempfile.mkdtemp(prefix="arbiter-parked-"))) as pool:
            asyncio.run(measure(args, settings, pool))
    return 0


if __name__ == "__main__":
    sys.exit(main())
