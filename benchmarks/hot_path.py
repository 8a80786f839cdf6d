"""The transaction alone: what a batch's unit of work costs per proposal, without a broker.

Runs ``worker.batch.process_batch`` (lock, replay check, orchestrate with the core
policies, write, record, commit) for task runs PENDING → RUNNING → COMPLETED, ``--batch``
proposals per transaction (one phase of as many runs), on ``--concurrency`` connections at
once (kept between transactions, as the consumer keeps them; on the worker's event loop
and with its garbage-collector settings), and prints proposals/s, the mean time per
proposal, the CPU per proposal of this process, and the statements per proposal (counted
by SQLAlchemy's ``before_cursor_execute`` event; a multi-row statement counts once).

    .venv/bin/python benchmarks/hot_path.py --runs 1000 --concurrency 1 --batch 1
    .venv/bin/python benchmarks/hot_path.py --runs 2048 --concurrency 2 --batch 64

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
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make devtools/ importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arbiter.schemas import StateType
from arbiter.worker.batch import process_batch
from arbiter.worker.db.engine import create_engine
from arbiter.worker.db.migrate import upgrade_async
from arbiter.worker.db.transaction import HeldConnections, store_transaction
from arbiter.worker.decode import Decoded, decode_proposal
from arbiter.worker.runtime import build_orchestrator, run, tune_gc
from arbiter.worker.settings import Settings
from devtools.devservices import provide_services

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


async def measure(database_url: str, runs: int, concurrency: int, batch: int) -> None:
    await upgrade_async(database_url)
    settings = Settings(database_url=database_url)
    engine = create_engine(database_url, pool_size=concurrency)
    held = HeldConnections(engine)  # as the consumer keeps its connections
    orchestrator = build_orchestrator(settings)
    statements = 0

    def decoded(run_id: uuid.UUID, state_type: StateType) -> Decoded:
        result = decode_proposal(
            body(run_id, state_type, state_type is LIFECYCLE[0]),
            content_type="application/json",
            message_id=None,
            max_bytes=settings.max_message_bytes,
        )
        assert isinstance(result, Decoded), result
        return result

    async def one_batch(run_ids: list[uuid.UUID], state_type: StateType) -> None:
        proposals = [decoded(run_id, state_type) for run_id in run_ids]
        nonlocal statements
        async with store_transaction(engine, generic_plans=True, held=held) as store:
            results = await process_batch(store, orchestrator, proposals)
        statements += store.statements
        for processed in results:
            assert processed is not None
            assert processed.outcome.status.value == "ACCEPT", processed.outcome

    async def phase(batches: list[list[uuid.UUID]], state_type: StateType) -> None:
        queue: asyncio.Queue[list[uuid.UUID]] = asyncio.Queue()
        for chunk in batches:
            queue.put_nowait(chunk)

        async def runner() -> None:
            while not queue.empty():
                await one_batch(queue.get_nowait(), state_type)

        await asyncio.gather(*(runner() for _ in range(concurrency)))

    run_ids = [uuid.uuid4() for _ in range(runs)]
    batches = [run_ids[i : i + batch] for i in range(0, runs, batch)]
    warm = uuid.uuid4()
    for state_type in LIFECYCLE:  # warm up: prepared statements, compiled cache
        await one_batch([warm], state_type)
    statements = 0
    cpu, wall = time.process_time(), time.perf_counter()
    for state_type in LIFECYCLE:
        await phase(batches, state_type)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await held.close()
    await engine.dispose()
    proposals = runs * len(LIFECYCLE)
    print(
        f"proposals        {proposals} (task runs, core policy, one tag, {batch} per"
        f" transaction, {concurrency} at once)"
    )
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
    parser.add_argument("--batch", type=int, default=1, help="proposals per transaction")
    args = parser.parse_args()
    with provide_services(
        durable=True, amqp_env="ARBITER_AMQP_URL", database_env="ARBITER_DATABASE_URL"
    ) as services:
        tune_gc()  # as a worker process does, and on its event loop
        measuring = measure(services.database_url, args.runs, args.concurrency, args.batch)
        run(measuring, Settings())
    return 0


if __name__ == "__main__":
    sys.exit(main())
