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
import json
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas import FlowRunSpec, ProposedState, RunKind, StateType, TaskRunSpec
from tests.fixtures.hostile import FuzzPlan, Record
from worker.client import ArbiterClient
from worker.devservices import provide_services
from worker.loadgen import Recorder, percentile
from worker.pool import WorkerPool, settings_env
from worker.settings import Settings
from worker.topology import declare_topology


@dataclass
class Observed:
    """What came back for a plan: each message's outcomes (status, error code), timings,
    and the dead letters (correlation id, ``x-arbiter-error-code``)."""

    outcomes: dict[str, list[tuple[str, str | None]]] = field(default_factory=dict)
    published_at: dict[str, float] = field(default_factory=dict)
    answered_at: dict[str, float] = field(default_factory=dict)
    publish_errors: dict[str, str] = field(default_factory=dict)
    uncorrelated: int = 0  # outcomes whose correlation_id names no message sent
    dead: list[tuple[str | None, str | None]] = field(default_factory=list)
    elapsed_s: float = 0.0

    def all_answered(self) -> bool:
        return len(self.outcomes) + len(self.publish_errors) >= len(self.published_at)


def _read_outcome(body: bytes) -> tuple[str, str | None]:
    try:
        document = json.loads(body)
        return str(document["status"]), (document.get("error") or {}).get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        return "UNREADABLE", None


def _header(message: AbstractIncomingMessage, name: str) -> str | None:
    value = (message.headers or {}).get(name)
    return value.decode() if isinstance(value, bytes) else None if value is None else str(value)


def _message(record: Record) -> aio_pika.Message:
    return aio_pika.Message(
        body=record.body,
        content_type=record.content_type,
        message_id=record.message_id,
        correlation_id=record.correlation_id,
        reply_to=record.reply_to,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def _silence(heard: asyncio.Event, quiet_s: float) -> None:
    """Return once ``quiet_s`` pass without ``heard`` being set."""
    while True:
        heard.clear()
        try:
            await asyncio.wait_for(heard.wait(), quiet_s)
        except TimeoutError:
            return


async def drive(
    settings: Settings,
    plan: FuzzPlan,
    *,
    deadline_s: float = 120.0,
    stall_s: float = 10.0,
    quiet_s: float = 1.0,
    publishers: int = 16,
) -> Observed:
    """Publish the plan, following it as outcomes arrive, until every message is answered
    (or nothing arrived for ``stall_s``, or ``deadline_s``); then ``quiet_s`` of silence on
    the outcomes and on the dead-letter queue, so duplicates and late dead letters count."""
    seen, loop = Observed(), asyncio.get_running_loop()
    began = loop.time()
    to_send: asyncio.Queue[Record] = asyncio.Queue()
    heard, heard_dead = asyncio.Event(), asyncio.Event()
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare_topology(channel, settings)
        tap = await channel.declare_queue(exclusive=True)
        await tap.bind(topology.outcomes_exchange, routing_key="#")
        dead = await channel.declare_queue(settings.dead_queue, passive=True)

        async def on_outcome(message: AbstractIncomingMessage) -> None:
            heard.set()
            cid = message.correlation_id or ""
            if cid not in plan.records:
                seen.uncorrelated += 1
                return
            answers = seen.outcomes.setdefault(cid, [])
            answers.append(_read_outcome(message.body))
            if len(answers) == 1:
                seen.answered_at[cid] = time.perf_counter()
                for follow in plan.answered(cid, answers[0][0]):
                    to_send.put_nowait(follow)

        async def on_dead(message: AbstractIncomingMessage) -> None:
            heard_dead.set()
            seen.dead.append((message.correlation_id, _header(message, "x-arbiter-error-code")))

        async def publisher() -> None:
            while True:
                record = await to_send.get()
                seen.published_at[record.correlation_id] = time.perf_counter()
                try:
                    exchange = topology.proposals_exchange
                    await exchange.publish(_message(record), settings.proposals_routing_key)
                except Exception as exc:
                    seen.publish_errors[record.correlation_id] = repr(exc)
                    heard.set()
                to_send.task_done()

        await tap.consume(on_outcome, no_ack=True)
        await dead.consume(on_dead, no_ack=True)
        for record in plan.opening():
            to_send.put_nowait(record)
        sending = [asyncio.create_task(publisher()) for _ in range(publishers)]
        try:
            await to_send.join()
            while not (to_send.empty() and seen.all_answered()):
                heard.clear()
                try:
                    await asyncio.wait_for(
                        heard.wait(), min(stall_s, began + deadline_s - loop.time())
                    )
                except TimeoutError:
                    break
                await to_send.join()
            await _silence(heard, quiet_s)
            await _silence(heard_dead, quiet_s)
        finally:
            for task in sending:
                task.cancel()
        seen.elapsed_s = loop.time() - began
    return seen


def _top(counts: Counter[str], limit: int = 40) -> str:
    shown = ", ".join(f"{label}: {n}" for label, n in counts.most_common(limit))
    return shown + (f", … {len(counts) - limit} more" if len(counts) > limit else "") or "none"


@dataclass
class Summary:
    """The verdict on one fuzz run; ``problems()`` is empty when every guarantee held."""

    messages: int
    valid: int
    statuses: Counter[str]  # each answered message's first status
    codes: Counter[str]  # and its error code
    missing: Counter[str]  # label (route) of messages never answered
    duplicated: Counter[str]  # label of messages answered more than once
    refused_valid: list[str]
    refusals: int  # messages answered INVALID or with an error: each should be dead-lettered
    dead: int
    dead_without_reason: int
    dead_not_refused: Counter[str]  # label of dead letters whose message was not refused
    refused_not_dead: Counter[str]
    hostile_decided: Counter[str]  # label of hostile messages answered other than refused
    by_kind: dict[str, Counter[str]]  # kind → what its messages got
    valid_latency_s: list[float]
    uncorrelated: int
    publish_errors: int

    def problems(self) -> list[str]:
        found = []
        if self.missing:
            found.append(
                f"{sum(self.missing.values())} messages got no outcome; by kind: "
                f"{_top(Counter(k.split(':')[0] for k in self.missing.elements()))}; "
                f"by label (route): {_top(self.missing)}"
            )
        if self.duplicated:
            found.append(f"{sum(self.duplicated.values())} messages got more than one outcome: "
                         f"{_top(self.duplicated)}")  # fmt: skip
        if self.refused_valid:
            shown = "; ".join(self.refused_valid[:20])
            found.append(f"{len(self.refused_valid)} valid proposals not accepted: {shown}")
        if self.dead_without_reason:
            found.append(f"{self.dead_without_reason} dead letters lack x-arbiter-error-code")
        if self.dead != self.refusals:
            found.append(
                f"{self.dead} dead letters but {self.refusals} refusals; dead-lettered, not "
                f"refused: {_top(self.dead_not_refused)}; refused, not dead-lettered: "
                f"{_top(self.refused_not_dead)}"
            )
        if self.uncorrelated:
            found.append(f"{self.uncorrelated} outcomes carry no correlation_id sent")
        if self.publish_errors:
            found.append(f"{self.publish_errors} messages could not be published")
        return found

    def table(self) -> str:
        return "\n".join(
            f"{kind:<14} {_top(got, 12)}" for kind, got in sorted(self.by_kind.items())
        )


def summarise(plan: FuzzPlan, seen: Observed) -> Summary:
    """Hold what came back against what each message expected."""
    statuses, codes, by_kind = Counter[str](), Counter[str](), dict[str, Counter[str]]()
    missing, duplicated, decided = Counter[str](), Counter[str](), Counter[str]()
    refused_valid: list[str] = []
    refused: set[str] = set()
    for cid, record in plan.records.items():
        if cid not in seen.published_at or cid in seen.publish_errors:
            continue
        answers = seen.outcomes.get(cid, [])
        got = by_kind.setdefault(record.kind, Counter())
        if not answers:
            missing[f"{record.label} ({'' if record.reply_to else 'no '}reply_to)"] += 1
            got["no outcome"] += 1
            continue
        status, code = answers[0]
        statuses[status] += 1
        codes[code or "-"] += 1
        got[f"{status} {code}" if code else status] += 1
        if len(answers) > 1:
            duplicated[record.label] += 1
        if status == "INVALID" or code is not None:
            refused.add(cid)
        elif record.expect == "hostile":
            decided[f"{record.label} {status}"] += 1
        wanted = plan.statuses.get(record.replay_of, "?") if record.replay_of else "ACCEPT"
        if record.expect == "valid" and status != wanted:
            refused_valid.append(f"{record.label} {cid}: {status} {code or ''} (wanted {wanted})")
    dead_ids, dead_not_refused = Counter(cid or "" for cid, _ in seen.dead), Counter[str]()
    for cid, copies in dead_ids.items():  # each refusal is dead-lettered once, nothing else is
        if copies > (cid in refused):
            dead_not_refused[plan.records[cid].label if cid in plan.records else "?"] += 1
    valid = [r for r in plan.records.values() if r.expect == "valid" and not r.replay_of]
    latency = [
        seen.answered_at[r.correlation_id] - seen.published_at[r.correlation_id]
        for r in valid
        if r.correlation_id in seen.answered_at
    ]
    return Summary(
        messages=len(seen.published_at),
        valid=len(valid),
        statuses=statuses,
        codes=codes,
        missing=missing,
        duplicated=duplicated,
        refused_valid=refused_valid,
        refusals=len(refused),
        dead=len(seen.dead),
        dead_without_reason=sum(1 for _, code in seen.dead if not code),
        dead_not_refused=dead_not_refused,
        refused_not_dead=Counter(plan.records[cid].label for cid in refused - set(dead_ids)),
        hostile_decided=decided,
        by_kind=by_kind,
        valid_latency_s=latency,
        uncorrelated=seen.uncorrelated,
        publish_errors=len(seen.publish_errors),
    )


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
    print(f"hostile, decided   {_top(summary.hostile_decided)}")
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
            [sys.executable, "-m", "worker.cli", "migrate"], env=settings_env(settings), check=True
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
