"""/livez and /readyz on a real worker: ready while it consumes and PostgreSQL answers; not
ready when the broker cancelled its consumer, the broker or the database is out of reach, it
holds deliveries through an outage, or it drains; not live while its event loop is blocked.
Each time it recovers, readiness comes back by itself."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable

import aio_pika
import pytest

from arbiter.schemas import FlowRunSpec, OutcomeStatus, ProposedState, StateType
from arbiter.worker.client import ArbiterClient
from arbiter.worker.settings import Settings
from arbiter.worker.topology import declare_topology
from devtools.devservices import Services
from tests.fixtures.proxy import proxy_for
from tests.fixtures.services import isolated_settings, running_worker

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode().strip()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode().strip()


async def probe(settings: Settings, path: str) -> tuple[int, str]:
    """A GET from another thread, as the kubelet's would come: the loop stays free."""
    assert settings.metrics_port is not None
    return await asyncio.to_thread(http_get, settings.metrics_port, path)


async def until(settings: Settings, path: str, wanted: Callable[[int, str], bool]) -> str:
    """Probe every 0.2 s until ``wanted(status, body)``; the body then (or fail after 45 s)."""
    deadline = time.monotonic() + 45
    while True:
        status, body = await probe(settings, path)
        if wanted(status, body):
            return body
        assert time.monotonic() < deadline, f"{path} still answers {status} {body!r}"
        await asyncio.sleep(0.2)


def ready(status: int, _: str) -> bool:
    return status == 200


def not_ready_because(reason: str) -> Callable[[int, str], bool]:
    return lambda status, body: status == 503 and reason in body


async def test_a_serving_worker_is_live_and_ready_beside_its_metrics(
    services: Services, database_url: str
) -> None:
    settings = isolated_settings(services, database_url, metrics_port=free_port())
    async with running_worker(settings):
        assert await until(settings, "/readyz", ready) == "ok"
        assert await probe(settings, "/livez") == (200, "ok")
        assert await probe(settings, "/healthz") == (200, "ok")
        status, metrics = await probe(settings, "/metrics")
        assert status == 200
        assert "arbiter_held_for_outage 0.0" in metrics


async def test_a_worker_whose_consumer_the_broker_cancelled_is_not_ready_until_it_consumes(
    services: Services, database_url: str
) -> None:
    """The admin deletes the proposals queue (basic.cancel): not ready, but live (nothing to
    restart). Once the queue exists again the robust channel consumes again: ready."""
    admin = isolated_settings(services, database_url)
    settings = admin.model_copy(update={"declare_topology": False, "metrics_port": free_port()})
    connection = await aio_pika.connect(admin.amqp_url)
    async with connection:
        channel = await connection.channel()
        await declare_topology(channel, admin)
        async with running_worker(settings):
            await until(settings, "/readyz", ready)
            await channel.queue_delete(settings.proposals_queue)
            body = await until(settings, "/readyz", not_ready_because("no live consumer"))
            assert (
                body
                == f"no live consumer on {settings.proposals_queue!r} (cancelled by the broker)"
            )
            assert await probe(settings, "/livez") == (200, "ok")
            await declare_topology(channel, admin)
            await until(settings, "/readyz", ready)
            async with ArbiterClient.connect(settings=settings) as client:
                outcome = await client.propose(
                    "flow_run",
                    uuid.uuid4(),
                    ProposedState(type=StateType.PENDING),
                    run=FlowRunSpec(),
                )
            assert outcome.status is OutcomeStatus.ACCEPT


async def test_a_worker_cut_off_from_rabbitmq_is_not_ready_until_it_reconnects(
    services: Services, database_url: str
) -> None:
    async with proxy_for(services.amqp_url) as broker:
        settings = isolated_settings(services, database_url, metrics_port=free_port())
        settings = settings.model_copy(update={"amqp_url": broker.url_through(services.amqp_url)})
        async with running_worker(settings):
            await until(settings, "/readyz", ready)
            broker.refusing = True
            broker.cut()
            await until(settings, "/readyz", not_ready_because("not connected to RabbitMQ"))
            broker.refusing = False
            await until(settings, "/readyz", ready)


async def test_a_worker_cut_off_from_postgres_is_not_ready_holds_deliveries_and_drains_after(
    services: Services, database_url: str
) -> None:
    """No database: not ready. A proposal arrives: held, and readiness says so. SIGTERM:
    "stopping" from then on, while the drain waits for the database; back, the held
    proposal is answered and the worker exits."""
    async with proxy_for(database_url) as db:
        settings = isolated_settings(
            services, db.url_through(database_url), metrics_port=free_port()
        )
        async with (
            running_worker(settings) as stop,
            ArbiterClient.connect(settings=settings) as client,
        ):
            await until(settings, "/readyz", ready)
            db.refusing = True
            db.cut()
            assert await until(settings, "/readyz", not_ready_because("PostgreSQL")) == (
                "PostgreSQL does not answer"
            )
            answer = await client.publish(
                "flow_run", uuid.uuid4(), ProposedState(type=StateType.PENDING), run=FlowRunSpec()
            )
            await until(
                settings, "/readyz", not_ready_because("holding 1 deliveries until PostgreSQL")
            )
            stop.set()
            assert await until(settings, "/readyz", not_ready_because("stopping")) == "stopping"
            assert await probe(settings, "/livez") == (200, "ok")
            db.refusing = False
            assert (await asyncio.wait_for(answer, 30)).status is OutcomeStatus.ACCEPT


async def test_a_worker_whose_event_loop_is_blocked_is_not_live(
    services: Services, database_url: str
) -> None:
    """A probe asked while the loop is stuck in a blocking call fails; afterwards it passes."""
    settings = isolated_settings(services, database_url, metrics_port=free_port())
    async with running_worker(settings):
        await until(settings, "/livez", ready)
        assert settings.metrics_port is not None
        answers: list[tuple[int, str]] = []
        asking = threading.Thread(
            target=lambda: answers.append(http_get(settings.metrics_port or 0, "/livez"))
        )
        asking.start()
        time.sleep(3)  # noqa: ASYNC251 (blocking the worker's loop is the point)
        await asyncio.to_thread(asking.join)
        [(status, body)] = answers
        assert (status, body) == (503, "the event loop did not answer within 2 s")
        assert await probe(settings, "/livez") == (200, "ok")
