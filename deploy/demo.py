"""The main job: servers, migrations, two workers, and an executor driving real lifecycles.

Each flow run is scheduled, submitted, run; its tasks run inside it (some fail and
are retried, some share a cache key, some are held back by a tag concurrency
limit), then the flow completes or fails. Everything goes over the broker through
the workers, exactly as a remote executor would do it.

    deploy/demo.sh [--flows 120] [--tasks-per-flow 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a file: devtools/ sits beside deploy/, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client.parser import text_string_to_metric_families

from arbiter.schemas import (
    FlowRunPolicy,
    FlowRunSpec,
    OutcomeStatus,
    ProposedState,
    StateDetails,
    StateType,
    TaskRunPolicy,
    TaskRunSpec,
)
from arbiter.worker.client import ArbiterClient
from arbiter.worker.settings import Settings
from devtools.devservices import provide_services
from devtools.loadgen import Recorder
from devtools.pool import WorkerPool, settings_env

LIMITED_TAG = "warehouse"
LIMIT = 4


class Executor:
    """A Prefect-like engine: asks before every state change and obeys the answer."""

    def __init__(self, client: ArbiterClient, recorder: Recorder, rng: random.Random) -> None:
        self.client = client
        self.recorder = recorder
        self.rng = rng
        self.final_flows: Counter[str] = Counter()
        self.final_tasks: Counter[str] = Counter()

    async def flow(self, index: int, tasks_per_flow: int) -> None:
        run_id = uuid.uuid4()
        spec = FlowRunSpec(
            name=f"demo-{index}",
            flow_name="nightly-etl",
            tags=["demo"],
            empirical_policy=FlowRunPolicy(retries=1, retry_delay=0),
        )
        soon = dt.datetime.now(dt.UTC) + dt.timedelta(milliseconds=self.rng.randint(0, 1500))
        propose = self.recorder.propose
        await propose(
            self.client,
            "flow_run",
            run_id,
            ProposedState(
                type=StateType.SCHEDULED, state_details=StateDetails(scheduled_time=soon)
            ),
            run=spec,
        )
        await propose(self.client, "flow_run", run_id, ProposedState(type=StateType.PENDING))
        while True:
            running = await self._until_not_waiting("flow_run", run_id, StateType.RUNNING)
            if running.status is not OutcomeStatus.ACCEPT:
                self.final_flows[running.state.name if running.state else "none"] += 1
                return
            results = await asyncio.gather(
                *(self.task(run_id, index, t) for t in range(tasks_per_flow))
            )
            final = StateType.COMPLETED if all(results) else StateType.FAILED
            outcome = await propose(self.client, "flow_run", run_id, ProposedState(type=final))
            state = outcome.state
            if (
                outcome.status is OutcomeStatus.REJECT
                and state
                and state.type is StateType.SCHEDULED
            ):
                continue  # AwaitingRetry: run the flow again
            self.final_flows[state.name if state else "none"] += 1
            return

    async def task(self, flow_run_id: uuid.UUID, flow_index: int, task_index: int) -> bool:
        run_id = uuid.uuid4()
        flaky = self.rng.random() < 0.25
        tags = [LIMITED_TAG] if task_index == 0 else []
        cache_key = f"extract-{flow_index % 7}" if task_index == 1 else None
        spec = TaskRunSpec(
            name=f"task-{task_index}",
            flow_run_id=flow_run_id,
            task_key=f"task-{task_index}",
            tags=tags,
            empirical_policy=TaskRunPolicy(retries=2, retry_delay=0),
        )
        propose = self.recorder.propose
        await propose(
            self.client, "task_run", run_id, ProposedState(type=StateType.PENDING), run=spec
        )
        attempt = 0
        while True:
            details = StateDetails(cache_key=cache_key)
            running = await self._until_not_waiting("task_run", run_id, StateType.RUNNING, details)
            if running.status is not OutcomeStatus.ACCEPT:
                state = running.state
                self.final_tasks[state.name if state else "none"] += 1
                return bool(state and state.type is StateType.COMPLETED)
            attempt += 1
            await asyncio.sleep(self.rng.uniform(0.005, 0.03))  # the "work"
            fails = flaky and attempt == 1
            final = ProposedState(
                type=StateType.FAILED if fails else StateType.COMPLETED,
                state_details=StateDetails(cache_key=cache_key),
                data=None if fails else {"type": "reference", "key": f"result-{run_id}"},
            )
            outcome = await propose(self.client, "task_run", run_id, final)
            state = outcome.state
            if (
                outcome.status is OutcomeStatus.REJECT
                and state
                and state.type is StateType.SCHEDULED
            ):
                continue  # AwaitingRetry
            self.final_tasks[state.name if state else "none"] += 1
            return bool(state and state.type is StateType.COMPLETED)

    async def _until_not_waiting(
        self,
        kind: str,
        run_id: uuid.UUID,
        state_type: StateType,
        details: StateDetails | None = None,
    ):  # type: ignore[no-untyped-def]
        while True:
            outcome = await self.recorder.propose(
                self.client,
                kind,  # type: ignore[arg-type]
                run_id,
                ProposedState(type=state_type, state_details=details or StateDetails()),
            )
            if outcome.status is not OutcomeStatus.WAIT:
                return outcome
            await asyncio.sleep(min(outcome.details.delay_seconds or 0, 2) or 0.05)


async def drive(
    settings: Settings, flows: int, tasks_per_flow: int, in_flight: int
) -> tuple[Executor, Recorder]:
    recorder = Recorder()
    async with ArbiterClient.connect(settings=settings) as client:
        executor = Executor(client, recorder, random.Random(7))
        slots = asyncio.Semaphore(in_flight)
        finished = [0]

        async def one(index: int) -> None:
            async with slots:
                await executor.flow(index, tasks_per_flow)
                finished[0] += 1

        jobs = asyncio.gather(*(one(i) for i in range(flows)))
        while not jobs.done():
            await asyncio.sleep(1)
            print(
                f"  {finished[0]:>4}/{flows} flow runs finished, {recorder.count:>6} proposals, "
                f"{recorder.rate():7.1f} proposals/s",
                flush=True,
            )
        await jobs
    return executor, recorder


def scrape_metrics(port: int) -> float:
    """The proposals a worker settled, as its Prometheus endpoint counts them."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "arbiter_outcomes_total"
    )


def table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max([len(k) for k, _ in rows] + [len(title)])
    print(f"\n{title}")
    print("-" * (width + 14))
    for key, value in rows:
        print(f"{key:<{width}}  {value:>12}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--flows", type=int, default=120)
    parser.add_argument("--tasks-per-flow", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--in-flight", type=int, default=40, help="flow runs driven at once")
    args = parser.parse_args()

    print("== starting RabbitMQ and PostgreSQL", flush=True)
    began = time.perf_counter()
    with provide_services(
        amqp_env="ARBITER_AMQP_URL", database_env="ARBITER_DATABASE_URL"
    ) as services:
        print(f"   ready in {time.perf_counter() - began:.1f} s", flush=True)
        settings = Settings(
            amqp_url=services.amqp_url, database_url=services.database_url, metrics_port=0
        )
        env = settings_env(settings)
        arbiter = [sys.executable, "-m", "arbiter"]
        print("== arbiter migrate", flush=True)
        subprocess.run([*arbiter, "migrate"], env=env, check=True)
        print(f"== arbiter limits set {LIMITED_TAG} {LIMIT}", flush=True)
        subprocess.run([*arbiter, "limits", "set", LIMITED_TAG, str(LIMIT)], env=env, check=True)
        log_dir = Path(tempfile.mkdtemp(prefix="arbiter-demo-"))
        print(f"== starting {args.workers} workers (logs in {log_dir})", flush=True)
        with WorkerPool(settings, log_dir) as pool:
            for _ in range(args.workers):
                pool.start()
            print(
                f"== driving {args.flows} flow runs with {args.tasks_per_flow} tasks each",
                flush=True,
            )
            executor, recorder = asyncio.run(
                drive(settings, args.flows, args.tasks_per_flow, args.in_flight)
            )
            elapsed = recorder.elapsed_s()
            scraped = [scrape_metrics(port) for port in pool.ports if port is not None]
            codes = pool.stop()
        print("\n== arbiter limits ls", flush=True)
        subprocess.run([*arbiter, "limits", "ls"], env=env, check=True)

    latency = recorder.latency_ms()
    table(
        "Summary",
        [
            ("flow runs", str(sum(executor.final_flows.values()))),
            ("task runs", str(sum(executor.final_tasks.values()))),
            ("proposals", str(recorder.count)),
            ("elapsed", f"{elapsed:.1f} s"),
            ("proposals/s", f"{recorder.count / elapsed:.1f}"),
            ("latency p50", f"{latency['p50']:.1f} ms"),
            ("latency p95", f"{latency['p95']:.1f} ms"),
            ("latency p99", f"{latency['p99']:.1f} ms"),
            ("worker exit codes", " ".join(map(str, codes))),
        ],
    )
    table("Outcomes", sorted(recorder.statuses.items()))  # type: ignore[arg-type]
    table(
        "Settled per worker (from each worker's /metrics)",
        [(f"worker {i}", f"{int(counts):d}") for i, counts in enumerate(scraped)],
    )
    table("Final flow-run states", [(k, str(v)) for k, v in executor.final_flows.most_common()])
    table("Final task-run states", [(k, str(v)) for k, v in executor.final_tasks.most_common()])
    table(
        "Rule decisions",
        [(k, str(v)) for k, v in recorder.decisions.most_common()] or [("none", "0")],
    )
    ok = all(code == 0 for code in codes) and sum(executor.final_flows.values()) == args.flows
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
