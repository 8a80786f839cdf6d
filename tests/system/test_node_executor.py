"""An executor in another language: the Node.js one in examples/node-executor.

It knows Arbiter only by its contract (the README and the JSON Schemas, which it checks
every proposal and outcome against). Each test runs it as a process against two worker
processes on this test's own exchanges and queues, then reads the runs back the way an
operator would, with ``arbiter runs show --json``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from arbiter.worker.settings import Settings
from arbiter.worker.topology import declare_topology
from devtools.devservices import Services
from devtools.pool import WorkerPool, settings_env
from tests.fixtures.proxy import proxy_for
from tests.fixtures.services import isolated_settings

pytestmark = pytest.mark.system

NODE_EXECUTOR = Path(__file__).resolve().parents[2] / "examples" / "node-executor"
LIFECYCLE = ["PENDING", "RUNNING", "COMPLETED"]


@pytest.fixture
def node() -> str:
    """The ``node`` binary, with the executor's npm packages installed; a clear failure if not."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            "node is not installed, so the Node.js executor cannot run: install Node.js and npm "
            "(deploy/setup.sh does as root), then run deploy/setup.sh"
        )
    if not (NODE_EXECUTOR / "node_modules" / "amqplib").is_dir():
        pytest.fail(
            f"{NODE_EXECUTOR}/node_modules is missing: run deploy/setup.sh "
            "(it runs npm ci there, which needs the npm registry)"
        )
    return node


class ExecutorRun:
    """The executor as a process; ``finish()`` returns its summary (EXECUTOR_OUTPUT=json)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, node: str, settings: Settings, **env: str | int) -> ExecutorRun:
        variables = settings_env(settings) | {"EXECUTOR_OUTPUT": "json"}
        variables |= {f"EXECUTOR_{name.upper()}": str(value) for name, value in env.items()}
        process = await asyncio.create_subprocess_exec(
            node,
            str(NODE_EXECUTOR / "executor.js"),
            env=variables,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def finish(self, timeout_s: float = 60) -> dict[str, Any]:
        stdout, stderr = await asyncio.wait_for(self.process.communicate(), timeout_s)
        assert self.process.returncode == 0, (
            f"the executor exited {self.process.returncode}\n{stdout.decode()}\n{stderr.decode()}"
        )
        summary: dict[str, Any] = json.loads(stdout)
        print(f"node executor: {json.dumps(summary)}\n{stderr.decode()}")
        return summary


async def arbiter(settings: Settings, *args: str) -> Any:
    """``arbiter <args>`` as a process on these settings; its JSON output, parsed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "arbiter",
        *args,
        env=settings_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, f"arbiter {' '.join(args)}: {stderr.decode()}"
    return json.loads(stdout) if "--json" in args else None


async def shown(settings: Settings, run_ids: list[str]) -> dict[str, dict[str, Any]]:
    """``arbiter runs show <id> --json`` for every run, a few at a time."""
    slots = asyncio.Semaphore(4)

    async def one(run_id: str) -> dict[str, Any]:
        async with slots:
            document: dict[str, Any] = await arbiter(settings, "runs", "show", run_id, "--json")
            return document

    documents = await asyncio.gather(*(one(run_id) for run_id in run_ids))
    return dict(zip(run_ids, documents, strict=True))


def history(document: Mapping[str, Any]) -> list[str]:
    return [state["type"] for state in document["history"]]


async def assert_all_completed(settings: Settings, summary: Mapping[str, Any]) -> None:
    """Every run the executor reported is COMPLETED in the database, with each state once;
    every task run belongs to one of the executor's flow runs."""
    flows, tasks = summary["flow_runs"], summary["task_runs"]
    assert set(flows.values()) == set(tasks.values()) == {"COMPLETED"}
    documents = await shown(settings, [*flows, *tasks])
    assert {run_id: doc["run"]["state_type"] for run_id, doc in documents.items()} == dict.fromkeys(
        documents, "COMPLETED"
    )
    assert {run_id: history(doc) for run_id, doc in documents.items()} == dict.fromkeys(
        documents, LIFECYCLE
    )
    assert {documents[task]["run"]["flow_run_id"] for task in tasks} <= set(flows)


async def declare(settings: Settings) -> None:
    """The pool's exchanges and queues, as any client may declare them before the pool runs."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        await declare_topology(await connection.channel(), settings)


async def queued_proposals(settings: Settings) -> int:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        queue = await (await connection.channel()).declare_queue(
            settings.proposals_queue, passive=True
        )
        count = queue.declaration_result.message_count
        assert count is not None
        return count


async def until_queued(settings: Settings, expected: int, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while (count := await queued_proposals(settings)) != expected:
        assert time.monotonic() < deadline, f"{count} proposals queued, not {expected}"
        await asyncio.sleep(0.05)


@pytest.mark.timeout(90)
async def test_it_drives_flow_runs_and_their_task_runs_to_completed(
    node: str, settings: Settings, tmp_path: Path
) -> None:
    """3 flow runs of 3 task runs each: 36 proposals, each answered ACCEPT with its trace;
    in the database every run went PENDING → RUNNING → COMPLETED, once."""
    began = time.monotonic()
    with WorkerPool(settings, tmp_path) as pool:
        pool.start()
        pool.start()
        await declare(settings)
        executor = await ExecutorRun.start(node, settings, flows=3, tasks_per_flow=3)
        summary = await executor.finish()
        assert pool.stop() == [0, 0]

    assert summary["failures"] == []
    assert (len(summary["flow_runs"]), len(summary["task_runs"])) == (3, 9)
    assert summary["outcomes"] == {"ACCEPT": 36}
    assert summary["traced_outcomes"] == 36  # each came back with its proposal's traceparent
    await assert_all_completed(settings, summary)
    print(f"12 runs completed in {time.monotonic() - began:.1f} s, checked with arbiter runs show")


@pytest.mark.timeout(90)
async def test_task_runs_held_back_by_a_tag_limit_wait_then_complete(
    node: str, services: Services, database_url: str, tmp_path: Path
) -> None:
    """With `arbiter limits set <tag> 1`, four task runs carrying the tag answer WAIT while
    another holds the slot; the executor sleeps delay_seconds, proposes again under a new
    proposal id, and every run completes. A WAIT writes nothing, and every slot is given back."""
    settings = isolated_settings(services, database_url, tag_concurrency_slot_wait_s=1)
    tag = f"node-{uuid.uuid4().hex[:8]}"
    await arbiter(settings, "limits", "set", tag, "1")
    try:
        with WorkerPool(settings, tmp_path) as pool:
            pool.start()
            pool.start()
            await declare(settings)
            executor = await ExecutorRun.start(
                node, settings, flows=2, tasks_per_flow=2, task_tags=tag, work_ms=300
            )
            summary = await executor.finish()
            assert pool.stop() == [0, 0]
        limits = await arbiter(settings, "limits", "ls", "--json")
    finally:
        await arbiter(settings, "limits", "rm", tag)

    assert summary["failures"] == []
    assert summary["outcomes"]["ACCEPT"] == 2 * 3 + 4 * 3
    assert summary["outcomes"].get("WAIT", 0) >= 1
    assert summary["proposals"] == summary["outcomes"]["ACCEPT"] + summary["outcomes"]["WAIT"]
    assert summary["traced_outcomes"] == summary["proposals"]
    await assert_all_completed(settings, summary)
    assert [limit["active_slots"] for limit in limits if limit["tag"] == tag] == [[]]


@pytest.mark.timeout(90)
async def test_after_a_reconnect_it_publishes_unanswered_proposals_again_under_their_ids(
    node: str, settings: Settings, tmp_path: Path
) -> None:
    """The executor's connection is cut while its first 4 proposals wait in the queue (no
    worker runs yet). It reconnects and publishes them again, same ids: 8 messages queued.
    Then the pool starts: each id is processed once (the copy is answered by a replay), so
    every run still has each of its states exactly once."""
    await declare(settings)
    async with proxy_for(settings.amqp_url) as broker:
        flaky = settings.model_copy(update={"amqp_url": broker.url_through(settings.amqp_url)})
        executor = await ExecutorRun.start(node, flaky, flows=4, tasks_per_flow=1)
        await until_queued(settings, 4)  # each flow run's PENDING, unanswered
        assert broker.cut() == 1
        await until_queued(settings, 8)  # the same 4, published again
        with WorkerPool(settings, tmp_path) as pool:
            pool.start()
            pool.start()
            summary = await executor.finish()
            assert await asyncio.to_thread(pool.stop) == [0, 0]

    assert summary["failures"] == []
    assert summary["reconnects"] == 1
    assert summary["republished"] == 4
    assert summary["outcomes"] == {"ACCEPT": 4 * 3 + 4 * 3}
    await assert_all_completed(settings, summary)
