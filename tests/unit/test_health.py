"""The probes' answers, from the HTTP server's side: liveness asks the event loop to run a
callback in time; readiness runs the worker's check on the loop and reports its reasons.
(tests/integration/test_health_probes.py runs them on a real worker.)"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable, Iterator
from wsgiref.types import StartResponse, WSGIEnvironment

import pytest

from arbiter.worker import health
from arbiter.worker.health import Health


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in its own thread, as the worker's runs beside the HTTP thread."""
    running = asyncio.new_event_loop()
    thread = threading.Thread(target=running.run_forever, daemon=True)
    thread.start()
    yield running
    running.call_soon_threadsafe(running.stop)
    thread.join(5)
    running.close()


def metrics_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"arbiter_outcomes_total 0\n"]


def get(probes: Health, path: str) -> tuple[str, str]:
    """Status line and body of a GET on ``path``, through the WSGI app a worker serves."""
    status: list[str] = []

    def start_response(line: str, headers: list[tuple[str, str]], *_: object) -> None:
        status.append(line)

    body = b"".join(probes.wsgi(metrics_app)({"PATH_INFO": path}, start_response))  # type: ignore[arg-type]
    return status[0], body.decode().strip()


def ready_when(*problems: str) -> health.Check:
    async def check() -> list[str]:
        return list(problems)

    return check


@pytest.mark.parametrize("path", ["/livez", "/healthz"])
def test_liveness_answers_ok_while_the_loop_runs(
    loop: asyncio.AbstractEventLoop, path: str
) -> None:
    assert get(Health(loop), path) == ("200 OK", "ok")


def test_liveness_fails_while_the_loop_is_blocked(
    loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(health, "LIVENESS_TIMEOUT_S", 0.2)
    loop.call_soon_threadsafe(time.sleep, 1.0)  # a blocking call on the loop
    status, body = get(Health(loop), "/livez")
    assert status == "503 Service Unavailable"
    assert "did not answer" in body


def test_liveness_fails_once_the_loop_is_closed() -> None:
    closed = asyncio.new_event_loop()
    closed.close()
    assert get(Health(closed), "/livez") == ("503 Service Unavailable", "the event loop is closed")


def test_readiness_is_starting_until_the_worker_serves(loop: asyncio.AbstractEventLoop) -> None:
    assert get(Health(loop), "/readyz") == ("503 Service Unavailable", "starting")


def test_readiness_is_ok_when_the_check_finds_nothing(loop: asyncio.AbstractEventLoop) -> None:
    probes = Health(loop)
    probes.serving(ready_when())
    assert get(probes, "/readyz") == ("200 OK", "ok")


def test_readiness_lists_every_problem_the_check_finds(loop: asyncio.AbstractEventLoop) -> None:
    probes = Health(loop)
    probes.serving(ready_when("not connected to RabbitMQ", "PostgreSQL does not answer"))
    assert get(probes, "/readyz") == (
        "503 Service Unavailable",
        "not connected to RabbitMQ; PostgreSQL does not answer",
    )


def test_readiness_ends_when_the_worker_starts_draining(loop: asyncio.AbstractEventLoop) -> None:
    probes = Health(loop)
    probes.serving(ready_when())
    probes.stopping()
    assert get(probes, "/readyz") == ("503 Service Unavailable", "stopping")


def test_a_check_that_raises_is_not_ready(loop: asyncio.AbstractEventLoop) -> None:
    async def broken() -> list[str]:
        raise RuntimeError("boom")

    probes = Health(loop)
    probes.serving(broken)
    status, body = get(probes, "/readyz")
    assert status == "503 Service Unavailable"
    assert "RuntimeError('boom')" in body


def test_a_check_that_hangs_is_not_ready_and_is_cancelled(
    loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(health, "READINESS_TIMEOUT_S", 0.2)
    cancelled = threading.Event()

    async def hangs() -> list[str]:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return []

    probes = Health(loop)
    probes.serving(hangs)
    status, body = get(probes, "/readyz")
    assert status == "503 Service Unavailable"
    assert "did not finish" in body
    assert cancelled.wait(5)


def test_readiness_fails_once_the_loop_is_closed() -> None:
    closed = asyncio.new_event_loop()
    probes = Health(closed)
    probes.serving(ready_when())
    closed.close()
    assert get(probes, "/readyz") == ("503 Service Unavailable", "the event loop is closed")


@pytest.mark.parametrize("path", ["/metrics", "/"])
def test_every_other_path_is_the_metrics(loop: asyncio.AbstractEventLoop, path: str) -> None:
    assert get(Health(loop), path) == ("200 OK", "arbiter_outcomes_total 0")
