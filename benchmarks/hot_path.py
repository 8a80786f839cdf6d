"""The transaction alone: how long one proposal's unit of work takes, without a broker.

Runs ``worker.unit_of_work.run_in_transaction`` (lock, replay check, orchestrate with the
core policies, write, record, commit) for task runs PENDING → RUNNING → COMPLETED, on
``--concurrency`` connections at once, and prints proposals/s, the mean time per proposal,
the CPU per proposal of this process, and the statements per proposal (counted by
SQLAlchemy's ``before_cursor_execute`` event).

    .venv/bin/python benchmarks/hot_path.py --runs 1000 --concurrency 1

Servers: ``ARBITER_AMQP_URL`` / ``ARBITER_DATABASE_URL`` when set, else private ones
(PostgreSQL with fsync on; RabbitMQ is started but unused).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from typing import Any

from sqlalchemy import event

from schemas import StateType
from worker.db.engine import create_engine
from worker.db.migrate import upgrade_async
from worker.decode import Decoded, decode_proposal
from worker.devservices import provide_services
from worker.runtime import build_orchestrator
from worker.settings import Settings
from worker.unit_of_work import run_in_transaction

LIFECYCLE = (StateType.PENDING, StateType.RUNNING, StateType.COMPLETED)


def body(run_id: uuid.UUID, state_type: StateType, first: bool) -> bytes:
    document: dict[str, Any] = {
        "schema_version": 1,
        "proposal_id": str(uuid.uuid4()),
        "run_kind": "task_run",
        "run_id": str(run_id),
        "state": {"type": state_type.value},
    }
    if first:
        document["run"] = {"task_key": "hot-path", "tags": ["bench"]}
    return json.dumps(document).encode()


async def measure(database_url: str, runs: int, concurrency: int) -> None:
    await upgrade_async(database_url)
    settings = Settings(database_url=database_url)
    engine = create_engine(database_url, pool_size=concurrency)
    orchestrator = build_orchestrator(settings)
    statements = 0

    def count(*_: object) -> None:
        nonlocal statements
        statements += 1

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    queue: asyncio.Queue[uuid.UUID] = asyncio.Queue()
    for _ in range(runs):
        queue.put_nowait(uuid.uuid4())

    async def one_run(run_id: uuid.UUID) -> None:
        for index, state_type in enumerate(LIFECYCLE):
            decoded = decode_proposal(
                body(run_id, state_type, index == 0),
                content_type="application/json",
                message_id=None,
                max_bytes=settings.max_message_bytes,
            )
            assert isinstance(decoded, Decoded), decoded
            processed = await run_in_transaction(engine, orchestrator, decoded)
            assert processed.outcome.status.value == "ACCEPT", processed.outcome.details

    async def runner() -> None:
        while not queue.empty():
            await one_run(queue.get_nowait())

    await one_run(uuid.uuid4())  # warm up: prepared statements, compiled cache
    statements = 0
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(runner() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await engine.dispose()
    proposals = runs * len(LIFECYCLE)
    print(f"proposals        {proposals} (task runs, core policy, one tag, {concurrency} at once)")
    print(f"proposals/s      {proposals / wall:.1f}")
    print(f"wall/proposal    {wall / proposals * 1000:.2f} ms")
    print(f"cpu/proposal     {cpu / proposals * 1000:.2f} ms (this process)")
    print(f"statements/prop  {statements / proposals:.2f} (BEGIN/COMMIT not counted)")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    with provide_services(
        durable=True, amqp_env="ARBITER_AMQP_URL", database_env="ARBITER_DATABASE_URL"
    ) as services:
        asyncio.run(measure(services.database_url, args.runs, args.concurrency))
    return 0


if __name__ == "__main__":
    sys.exit(main())
