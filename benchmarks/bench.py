"""Throughput of a worker pool, and what each transition costs it, on durable PostgreSQL.

Starts RabbitMQ and PostgreSQL (fsync on, unless ARBITER_AMQP_URL/ARBITER_DATABASE_URL
name servers to use) and W worker processes; every proposal is a persistent message.

Fire-and-await (default): K executors each drive task runs PENDING → RUNNING →
COMPLETED, awaiting every outcome; prints the round trip's p50/p95/p99 latency. The
executors share the box with the pool, so the rate is partly theirs.

Drain (``--drain``): the proposals of M runs are published (confirmed) while no worker
runs, in phases (every PENDING, then every RUNNING, then every COMPLETED) so that a
run's proposals are never in flight together; then the workers start and the drain is
timed from the first outcome to the last (start-up is reported apart): the rate of the
pool alone. Task runs only, unless
``--mix`` (one flow run per ``--tasks-per-flow`` task runs, which name it).

Both print the outcomes by status, the batch-size distribution and the statements per
proposal (from the workers' /metrics; "n/a" when a worker does not count them), and the
CPU per transition of the workers, PostgreSQL and RabbitMQ (from /proc, over the timed
window). Per-transition CPU is the steadier figure on a shared box.

    .venv/bin/python benchmarks/bench.py --workers 2 --runs 2000 --executors 64
    .venv/bin/python benchmarks/bench.py --workers 1 --runs 600 --executors 16
    .venv/bin/python benchmarks/bench.py --drain --workers 2 --runs 3000
    .venv/bin/python benchmarks/bench.py --drain --workers 1 --runs 3000 --mix

Each worker runs ``--concurrency`` transactions at once (default: the worker's own
setting) with a prefetch of twice that, or of the worker's default prefetch when larger.
``--batch-max`` / ``--batch-wait-ms`` reach the workers as ARBITER_BATCH_MAX /
ARBITER_BATCH_WAIT_MS when their Settings have those fields (else they are ignored, saying
so).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the sibling modules importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aio_pika

from arbiter.schemas import OutcomeStatus, ProposedState, StateType, TaskRunSpec
from arbiter.worker.client import ArbiterClient
from arbiter.worker.settings import Settings
from arbiter.worker.topology import proposals_queue_arguments
from benchmarks.drain import build_backlog, drain
from benchmarks.procstat import ServerCpu, cpu_seconds
from benchmarks.scrape import Samples, delta, report_lines, scrape, total, wait_for_settled
from devtools.devservices import Services, provide_services
from devtools.loadgen import Recorder
from devtools.pool import WorkerPool, settings_env

LIFECYCLE = (StateType.PENDING, StateType.RUNNING, StateType.COMPLETED)
BATCH_SETTINGS = ("batch_max", "batch_wait_ms")
READY_TIMEOUT_S = 120.0


class Meter:
    """CPU seconds of the workers and both servers, and the workers' metrics, over a window."""

    def __init__(self, pool: WorkerPool, services: Services) -> None:
        self.pool = pool
        self.servers = {
            "PostgreSQL": ServerCpu("postgres", services.database_url, 5432),
            "RabbitMQ": ServerCpu("beam.smp", services.amqp_url, 5672),
        }
        self.began = self.ended = 0.0
        self.cpu_before: dict[str, float | None] = {}
        self.cpu_after: dict[str, float | None] = {}
        self.metrics_before: Samples | None = None

    def cpu(self) -> dict[str, float | None]:
        seconds = {name: server.seconds() for name, server in self.servers.items()}
        return {
            "worker": sum(cpu_seconds(proc.pid) for proc in self.pool.procs),
            "load generator": time.process_time(),  # this process: executors or drain consumer
            **seconds,
        }

    def begin(self) -> None:
        self.metrics_before = scrape(self.pool.ports)  # before the CPU: scraping costs some
        self.cpu_before = self.cpu()
        self.began = time.perf_counter()

    def end(self) -> None:
        self.ended = time.perf_counter()
        self.cpu_after = self.cpu()

    def used(self, name: str) -> float | None:
        after, before = self.cpu_after.get(name), self.cpu_before.get(name)
        return None if after is None or before is None else after - before

    def metrics(self, transitions: int) -> Samples | None:
        """The workers' counts over the window, once they have counted every outcome."""
        settled = int(total(self.metrics_before, "arbiter_outcomes_total")) + transitions
        return delta(
            wait_for_settled(lambda: scrape(self.pool.ports), settled), self.metrics_before
        )

    def cpu_lines(self, transitions: int) -> list[str]:
        """Each server's and this process's CPU per transition and share of the window (cores
        busy); the workers' per-transition figure is printed last, by ``main``."""
        window = max(self.ended - self.began, 1e-9)
        scopes = {name: server.scope for name, server in self.servers.items()}
        scopes["load generator"] = "this process"
        lines = []
        for name, scope in scopes.items():
            used = self.used(name)
            if used is None or transitions == 0:
                lines.append(f"{name} CPU/trans n/a ({scope})")
                continue
            lines.append(
                f"{name} CPU/trans {used / transitions * 1000:.2f} ms"
                f" ({used / window:.2f} cores; {scope})"
            )
        worker = self.used("worker") or 0.0
        lines.append(f"worker CPU       {worker:.1f} s ({worker / window:.2f} cores)")
        return lines


def alive(pool: WorkerPool) -> bool:
    """Whether any worker still runs (else waiting for outcomes is pointless)."""
    return any(proc.poll() is None for proc in pool.procs)


async def wait_for_consumers(settings: Settings, pool: WorkerPool) -> None:
    """Wait until every worker consumes, so the timed window does not include start-up."""
    workers = len(pool.procs)
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with await aio_pika.connect(settings.amqp_url) as connection:
        channel = await connection.channel()
        while True:
            queue = await channel.declare_queue(
                settings.proposals_queue,
                durable=True,
                arguments=proposals_queue_arguments(settings),
            )
            if (queue.declaration_result.consumer_count or 0) >= workers:
                return
            if time.monotonic() > deadline or not all(p.poll() is None for p in pool.procs):
                raise RuntimeError(f"not all {workers} workers consuming; see {pool.log_dir}")
            await asyncio.sleep(0.2)


async def drive(
    settings: Settings, runs: int, executors: int, meter: Meter
) -> tuple[Recorder, Counter[str]]:
    """K executors, each taking the next run and awaiting every outcome of its lifecycle;
    a run whose proposal is not accepted ends there, its reason counted."""
    queue: asyncio.Queue[uuid.UUID] = asyncio.Queue()
    for _ in range(runs):
        queue.put_nowait(uuid.uuid4())
    reasons: Counter[str] = Counter()
    async with ArbiterClient.connect(settings=settings) as client:
        # Warm up connections and caches outside the measurement.
        await client.propose(
            "task_run", uuid.uuid4(), ProposedState(type=StateType.PENDING), run=TaskRunSpec()
        )
        meter.begin()
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
                        reasons[f"{outcome.status.value}: {outcome.details.reason}"] += 1
                        break

        await asyncio.gather(*(executor() for _ in range(executors)))
        meter.end()
    return recorder, reasons


@dataclass
class Measured:
    """One mode's result: what it counted, and its own lines for the report."""

    transitions: int
    lines: list[str]
    latency: list[str] = field(default_factory=list)
    complete: bool = True


def fire_and_await(
    args: argparse.Namespace, settings: Settings, pool: WorkerPool, meter: Meter
) -> Measured:
    for _ in range(args.workers):
        pool.start()
    asyncio.run(wait_for_consumers(settings, pool))
    recorder, reasons = asyncio.run(drive(settings, args.runs, args.executors, meter))
    latency = recorder.latency_ms()
    return Measured(
        transitions=recorder.count,
        lines=[_statuses_line(recorder.statuses), *_reason_lines(reasons)],
        latency=[f"latency {name}      {latency[name]:.1f} ms" for name in ("p50", "p95", "p99")],
    )


def drain_backlog(
    args: argparse.Namespace, settings: Settings, pool: WorkerPool, meter: Meter
) -> Measured:
    backlog = build_backlog(args.runs, mix=args.mix, tasks_per_flow=args.tasks_per_flow)
    worker_cpu_then: list[float] = []

    def start() -> None:
        for _ in range(args.workers):
            pool.start()

    def first() -> None:
        # The window opens at the first outcome: the pool's capacity, not its start-up
        # (importing and connecting cost a worker about a second of CPU).
        worker_cpu_then.append(sum(cpu_seconds(proc.pid) for proc in pool.procs))
        meter.begin()

    result = asyncio.run(
        drain(
            settings, backlog, start=start, first=first, stop=meter.end, alive=lambda: alive(pool)
        )
    )
    runs = f"{backlog.task_runs} task runs"
    if backlog.flow_runs:
        runs = f"{backlog.flow_runs} flow runs, {runs}"
    lines = [
        f"backlog          {result.published} proposals ({runs}) published in"
        f" {result.publish_s:.1f} s ({result.published / max(result.publish_s, 1e-9):.0f}/s,"
        " confirmed)"
    ]
    if result.leftover:
        lines.append(f"warning          {result.leftover} proposals were queued before ours")
    held = args.workers * settings.prefetch
    if backlog.smallest_gap <= held:
        lines.append(
            f"warning          phases only {backlog.smallest_gap} proposals apart, the pool"
            f" holds up to {held}: a run's proposals may be in flight together (raise --runs)"
        )
    lines += [_statuses_line(result.statuses), *_reason_lines(result.reasons)]
    if result.missing:
        lines.append(f"missing          {result.missing} outcomes (the drain stalled)")
    if result.first_outcome_s is not None and worker_cpu_then:
        lines.append(
            f"start-up         first outcome {result.first_outcome_s:.2f} s after the workers"
            f" started, {worker_cpu_then[0]:.2f} s of worker CPU by then (not counted below)"
        )
    # The first outcome opened the window; the rest were settled inside it.
    transitions = max(result.count - 1, 0)
    return Measured(transitions=transitions, lines=lines, complete=result.missing == 0)


def _statuses_line(statuses: Counter[str]) -> str:
    counts = "  ".join(f"{status} {count}" for status, count in statuses.most_common())
    return f"outcomes         {counts or 'none'}"


def _reason_lines(reasons: Counter[str], shown: int = 5) -> list[str]:
    return [f"  {count} x {reason}" for reason, count in reasons.most_common(shown)]


def batch_settings(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """The batch settings asked for that these workers' Settings know; notes for the rest."""
    known: dict[str, Any] = {}
    notes = []
    for name in BATCH_SETTINGS:
        value = getattr(args, name)
        if value is None:
            continue
        if name in Settings.model_fields:
            known[name] = value
        else:
            notes.append(f"note             --{name.replace('_', '-')} ignored: no Settings.{name}")
    return known, notes


def default_prefetch(concurrency: int) -> int:
    """Two deliveries per proposal processed at once, as the pool was first measured, or the
    worker's own default if larger (a batching worker needs a window that holds batches)."""
    worker_default = Settings.model_fields["prefetch"].default
    return max(2 * concurrency, worker_default if isinstance(worker_default, int) else 0)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, help="default 2000; 3000 with --drain")
    parser.add_argument("--executors", type=int, default=64, help="fire-and-await only")
    parser.add_argument(
        "--concurrency", type=int, help="transactions at once per worker; default the worker's"
    )
    parser.add_argument(
        "--prefetch", type=int, help="per worker; default 2 x concurrency or the worker's default"
    )
    parser.add_argument("--drain", action="store_true", help="time a published backlog")
    parser.add_argument("--mix", action="store_true", help="drain: flow runs with task runs")
    parser.add_argument("--tasks-per-flow", type=int, default=4)
    parser.add_argument("--batch-max", type=int, help="ARBITER_BATCH_MAX, if supported")
    parser.add_argument("--batch-wait-ms", type=float, help="ARBITER_BATCH_WAIT_MS, if supported")
    args = parser.parse_args()
    if args.mix and not args.drain:
        parser.error("--mix needs --drain")
    if args.runs is None:
        args.runs = 3000 if args.drain else 2000
    batch, notes = batch_settings(args)

    with provide_services(
        durable=True, amqp_env="ARBITER_AMQP_URL", database_env="ARBITER_DATABASE_URL"
    ) as services:
        settings = Settings(
            amqp_url=services.amqp_url,
            database_url=services.database_url,
            concurrency=args.concurrency or Settings.model_fields["concurrency"].default,
            prefetch=args.prefetch or default_prefetch(args.concurrency or 0),
            metrics_port=0,  # each worker on a free port: WorkerPool.ports
            **batch,
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
        with WorkerPool(settings, Path(tempfile.mkdtemp(prefix="arbiter-bench-"))) as pool:
            meter = Meter(pool, services)
            measure = drain_backlog if args.drain else fire_and_await
            measured = measure(args, settings, pool, meter)
            metrics = meter.metrics(measured.transitions)
            for index, proc in enumerate(pool.procs):
                if proc.poll() is not None:
                    notes.append(
                        f"warning          worker {index} exited ({proc.returncode}) mid-run:"
                        f" {pool.log_dir}/worker-{index}.log"
                    )

    count = measured.transitions
    elapsed = meter.ended - meter.began
    mode = "drain" if args.drain else f"fire-and-await executors={args.executors}"
    batching = "".join(
        f" {name}={getattr(settings, name)}"
        for name in BATCH_SETTINGS
        if name in Settings.model_fields
    )
    print(
        f"mode={mode} workers={args.workers} concurrency/worker={settings.concurrency}"
        f" prefetch/worker={settings.prefetch}{batching} runs={args.runs}"
        " durable PostgreSQL (fsync on), persistent messages"
    )
    for line in [*notes, *measured.lines, *report_lines(metrics), *meter.cpu_lines(count)]:
        print(line)
    for line in measured.latency:
        print(line)
    print(f"transitions      {count}")
    print(f"elapsed          {elapsed:.2f} s")
    print(f"transitions/s    {count / elapsed:.1f}")
    # Steadier than transitions/s on a shared box: what one transition costs the workers.
    print(f"worker CPU/trans {(meter.used('worker') or 0.0) / max(count, 1) * 1000:.2f} ms")
    return 0 if measured.complete else 1


if __name__ == "__main__":
    sys.exit(main())
