"""The RabbitMQ alternative for parked WAITs, measured: per-message TTL on a delay queue that
dead-letters back to a consuming queue. How late does a message come back after its TTL?

For each queue type (quorum, classic), publishes ``--messages`` persistent messages with a
per-message ``expiration`` of 1 to 8 s (random, as WaitForScheduledTime's delays are) or
all equal (``--equal``, as tag-limit WAITs are), to a delay queue with
``x-dead-letter-exchange``; a consumer on the target queue records arrival minus due time.
RabbitMQ expires per-message TTLs only at the head of a queue, so with unequal delays a
long one ahead holds shorter ones back: the figures show by how much.

    .venv/bin/python benchmarks/ttl_delay.py --messages 300
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aio_pika

from devtools.devservices import provide_services


async def measure(amqp_url: str, queue_type: str, messages: int, equal: bool) -> list[float]:
    prefix = f"ttl-{uuid.uuid4().hex[:6]}"
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        back = await channel.declare_exchange(f"{prefix}.back", aio_pika.ExchangeType.FANOUT)
        target = await channel.declare_queue(
            f"{prefix}.target", durable=True, arguments={"x-queue-type": queue_type}
        )
        await target.bind(back)
        arguments: dict[str, object] = {
            "x-queue-type": queue_type,
            "x-dead-letter-exchange": back.name,
        }
        if queue_type == "quorum":
            arguments |= {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
        delay_queue = await channel.declare_queue(
            f"{prefix}.delay",
            durable=True,
            arguments=arguments,  # type: ignore[arg-type]
        )
        lateness: list[float] = []
        done = asyncio.Event()

        async def arrived(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            due = float((message.headers or {})["due"])  # type: ignore[arg-type]
            lateness.append(time.time() - due)
            await message.ack()
            if len(lateness) == messages:
                done.set()

        tag = await target.consume(arrived)
        for _ in range(messages):
            delay_s = 2.0 if equal else random.uniform(1, 8)
            await channel.default_exchange.publish(
                aio_pika.Message(
                    b"{}",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    expiration=delay_s,
                    headers={"due": str(time.time() + delay_s)},
                ),
                routing_key=delay_queue.name,
            )
        await asyncio.wait_for(done.wait(), 120)
        await target.cancel(tag)
        await delay_queue.delete(if_unused=False, if_empty=False)
        await target.delete(if_unused=False, if_empty=False)
    return lateness


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--equal", action="store_true", help="every delay 2 s")
    args = parser.parse_args()
    with provide_services(durable=True, amqp_env="ARBITER_AMQP_URL") as services:
        for queue_type in ("quorum", "classic"):
            try:
                late = asyncio.run(
                    measure(services.amqp_url, queue_type, args.messages, args.equal)
                )
            except Exception as exc:  # e.g. a broker that refuses TTL on this queue type
                print(f"{queue_type:<8} failed: {exc!r}")
                continue
            late.sort()
            p99 = late[min(len(late) - 1, int(0.99 * len(late)))]
            print(
                f"{queue_type:<8} {'equal 2 s' if args.equal else '1-8 s random'}"
                f" n={len(late)} p50 {statistics.median(late) * 1000:.0f} ms"
                f" p99 {p99 * 1000:.0f} ms max {late[-1] * 1000:.0f} ms"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
