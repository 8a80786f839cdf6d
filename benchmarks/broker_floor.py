"""The broker's share of a lone proposal's round trip: the same legs with no worker logic.

An executor publishes a persistent message (confirmed) to a durable queue and awaits the
answer on its private reply queue; a responder in another connection answers each delivery
at once (a persistent publish to the reply queue, then the ack), as a worker does, with no
decoding, no database and no rules. One message in flight at a time; the first
``--warmup`` round trips are not counted. Run for a quorum queue (what the proposals queue
is) and a classic one: what remains of ``bench.py --executors 1``'s p50 above this figure is
the worker's own share (decode, transaction, rules, publish).

    .venv/bin/python benchmarks/broker_floor.py --messages 600
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from arbiter.worker.broker import ClosingRobustConnection
from devtools.devservices import provide_services
from devtools.loadgen import percentile

PERSISTENT = aio_pika.DeliveryMode.PERSISTENT


async def round_trips(amqp_url: str, queue_type: str, messages: int, warmup: int) -> list[float]:
    """Seconds per round trip, after the warm-up."""
    executor = await aio_pika.connect_robust(amqp_url, connection_class=ClosingRobustConnection)
    responder = await aio_pika.connect_robust(amqp_url, connection_class=ClosingRobustConnection)
    async with executor, responder:
        asking = await executor.channel(publisher_confirms=True)
        answering = await responder.channel(publisher_confirms=True)
        await answering.set_qos(prefetch_count=16)
        queue = await answering.declare_queue(
            f"broker-floor-{uuid.uuid4().hex[:8]}",
            durable=True,
            arguments={"x-queue-type": queue_type},
        )
        replies = await asking.declare_queue(exclusive=True)
        waiting: dict[str, asyncio.Future[float]] = {}

        async def respond(message: AbstractIncomingMessage) -> None:
            answer = aio_pika.Message(
                message.body, delivery_mode=PERSISTENT, correlation_id=message.correlation_id
            )
            await answering.default_exchange.publish(answer, routing_key=message.reply_to or "")
            await message.ack()

        async def on_reply(message: AbstractIncomingMessage) -> None:
            future = waiting.pop(message.correlation_id or "", None)
            if future is not None:
                future.set_result(time.perf_counter())

        responding = await queue.consume(respond)
        await replies.consume(on_reply, no_ack=True)
        seconds = []
        try:
            for number in range(messages + warmup):
                future = asyncio.get_running_loop().create_future()
                waiting[str(number)] = future
                began = time.perf_counter()
                request = aio_pika.Message(
                    b"x" * 400,
                    delivery_mode=PERSISTENT,
                    correlation_id=str(number),
                    reply_to=replies.name,
                )
                await asking.default_exchange.publish(request, routing_key=queue.name)
                answered = await asyncio.wait_for(future, 10)
                if number >= warmup:
                    seconds.append(answered - began)
        finally:
            await queue.cancel(responding)
            await asking.queue_delete(queue.name)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=600)
    parser.add_argument("--warmup", type=int, default=100)
    args = parser.parse_args()
    with provide_services(durable=True, amqp_env="ARBITER_AMQP_URL") as services:
        for queue_type in ("quorum", "classic"):
            seconds = asyncio.run(
                round_trips(services.amqp_url, queue_type, args.messages, args.warmup)
            )
            p50, p95 = (percentile(seconds, fraction) * 1000 for fraction in (0.5, 0.95))
            print(f"{queue_type:<8} n={len(seconds)} p50 {p50:.2f} ms p95 {p95:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
