"""Drain mode: a backlog of proposals published first, then the pool timed while it empties it.

Fire-and-await executors measure latency, but their own publishing and awaiting compete
with the workers for the box's two cores and cap the rate at what they keep in flight. A
backlog published before any worker runs removes both: the rate is what the pool alone
sustains. Each run needs its proposals applied in order, so they are published in
phases (every PENDING, then every RUNNING, then every COMPLETED): a run's next proposal
sits a whole phase behind its previous one, far beyond any worker's prefetch window.

With ``mix``, every ``tasks_per_flow`` task runs name one flow run (``run.flow_run_id``);
flow runs are created and started before their task runs (a task run needs its flow run
to exist, and to be RUNNING before it may start) and completed after them.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, DeliveryMode

from arbiter.schemas import FlowRunSpec, RunKind, StateType, TaskRunSpec
from arbiter.worker.settings import Settings
from arbiter.worker.topology import declare_topology

__all__ = ["Backlog", "DrainResult", "build_backlog", "drain"]

_CHUNK = 500  # publishes awaiting their confirms at once
_STALL_S = 120.0  # no outcome for this long: the drain is stuck; stop and report


@dataclass(frozen=True)
class Backlog:
    """The proposals' bodies in publishing order, and what they describe."""

    bodies: list[tuple[uuid.UUID, bytes]]
    flow_runs: int
    task_runs: int

    @property
    def smallest_gap(self) -> int:
        """Fewest proposals between two of one run's proposals (or a task run and its flow
        run's previous one): what must exceed the proposals the pool holds at once."""
        return self.flow_runs if self.flow_runs else self.task_runs


def _body(
    run_kind: RunKind, run_id: uuid.UUID, state: StateType, run: FlowRunSpec | TaskRunSpec | None
) -> tuple[uuid.UUID, bytes]:
    proposal_id = uuid.uuid4()
    document: dict[str, object] = {
        "schema_version": 1,
        "proposal_id": str(proposal_id),
        "run_kind": run_kind,
        "run_id": str(run_id),
        "state": {"type": state.value},
    }
    if run is not None:
        document["run"] = run.model_dump(mode="json", exclude_defaults=True)
    return proposal_id, json.dumps(document, separators=(",", ":")).encode()


def build_backlog(runs: int, *, mix: bool, tasks_per_flow: int) -> Backlog:
    """``runs`` runs P → R → C; with ``mix``, one in ``tasks_per_flow + 1`` is a flow run."""
    flows = [uuid.uuid4() for _ in range(runs // (tasks_per_flow + 1) if mix else 0)]
    tasks = [uuid.uuid4() for _ in range(runs - len(flows))]
    # Task run j belongs to flow run j mod F: at least F proposals after its flow's.
    parent = {task: flows[j % len(flows)] if flows else None for j, task in enumerate(tasks)}
    pending: list[tuple[RunKind, uuid.UUID, FlowRunSpec | TaskRunSpec]] = [
        ("flow_run", flow, FlowRunSpec(flow_name="bench")) for flow in flows
    ]
    pending += [
        ("task_run", task, TaskRunSpec(task_key="bench", flow_run_id=parent[task]))
        for task in tasks
    ]
    running: list[tuple[RunKind, uuid.UUID]] = [("flow_run", flow) for flow in flows]
    running += [("task_run", task) for task in tasks]
    completed: list[tuple[RunKind, uuid.UUID]] = [("task_run", task) for task in tasks]
    completed += [("flow_run", flow) for flow in flows]
    bodies = [_body(kind, run_id, StateType.PENDING, spec) for kind, run_id, spec in pending]
    bodies += [_body(kind, run_id, StateType.RUNNING, None) for kind, run_id in running]
    bodies += [_body(kind, run_id, StateType.COMPLETED, None) for kind, run_id in completed]
    return Backlog(bodies, len(flows), len(tasks))


@dataclass
class DrainResult:
    """What came back: counts by status, a few reasons for the rest, and when."""

    published: int
    publish_s: float
    leftover: int  # messages already in the proposals queue before publishing
    statuses: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0
    first_outcome_s: float | None = None
    missing: int = 0

    @property
    def count(self) -> int:
        return sum(self.statuses.values())


async def drain(
    settings: Settings,
    backlog: Backlog,
    *,
    start: Callable[[], None],
    first: Callable[[], None],
    stop: Callable[[], None],
    alive: Callable[[], bool],
) -> DrainResult:
    """Publish ``backlog`` with no worker running, then call ``start`` (which starts them)
    and wait for one outcome per proposal, or until no worker is ``alive``, or ``_STALL_S``
    without progress; ``first`` is called at the first outcome, ``stop`` at the end."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare_topology(channel, settings)
        leftover = topology.proposals_queue.declaration_result.message_count or 0
        # Outcomes of proposals without reply_to go to outcome.<kind>.<status>: catch all.
        outcomes = await channel.declare_queue(exclusive=True, auto_delete=True)
        await outcomes.bind(topology.outcomes_exchange, routing_key="#")

        published = time.perf_counter()
        for offset in range(0, len(backlog.bodies), _CHUNK):
            await asyncio.gather(
                *(
                    topology.proposals_exchange.publish(
                        aio_pika.Message(
                            body,
                            content_type="application/json",
                            delivery_mode=DeliveryMode.PERSISTENT,
                            message_id=str(proposal_id),
                        ),
                        routing_key=settings.proposals_routing_key,
                    )
                    for proposal_id, body in backlog.bodies[offset : offset + _CHUNK]
                )
            )
        result = DrainResult(
            published=len(backlog.bodies),
            publish_s=time.perf_counter() - published,
            leftover=leftover,
        )

        unanswered = {str(proposal_id) for proposal_id, _ in backlog.bodies}
        done = asyncio.Event()
        progress = asyncio.Event()

        def on_outcome(message: AbstractIncomingMessage) -> None:
            if message.message_id not in unanswered:
                return  # a duplicate delivery, or not ours
            unanswered.discard(message.message_id)
            if result.first_outcome_s is None:
                result.first_outcome_s = time.perf_counter() - started
                first()
            status = str((message.headers or {}).get("x-arbiter-status", "?"))
            result.statuses[status] += 1
            if status != "ACCEPT":
                details = json.loads(message.body).get("details") or {}
                result.reasons[f"{status}: {details.get('reason')}"] += 1
            progress.set()
            if not unanswered:
                done.set()

        async def consume(message: AbstractIncomingMessage) -> None:
            on_outcome(message)

        started = time.perf_counter()
        await outcomes.consume(consume, no_ack=True)
        start()
        last_progress = time.monotonic()
        while not done.is_set():
            progress.clear()
            try:
                await asyncio.wait_for(progress.wait(), 1.0)
                last_progress = time.monotonic()
            except TimeoutError:
                if not alive() or time.monotonic() - last_progress > _STALL_S:
                    break
        result.elapsed_s = time.perf_counter() - started
        stop()
        result.missing = len(unanswered)
    return result
