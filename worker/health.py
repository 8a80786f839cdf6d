"""Liveness and readiness probes, served beside ``/metrics`` on ``ARBITER_METRICS_PORT``.

``/livez`` (also ``/healthz``): the event loop runs a callback within ``LIVENESS_TIMEOUT_S``. A
loop stuck in a blocking call settles nothing, so an orchestrator should restart the worker.

``/readyz``: connected to RabbitMQ with a live consumer on the proposals queue, holding no
deliveries through a database outage, and PostgreSQL answering ``SELECT 1``. A worker that
is not ready is not broken: the broker cancelled its consumer (the queue was deleted) or a
server is down; it recovers by itself once the cause is gone, so it is not restarted for it.

The HTTP server runs in its own thread (as prometheus_client's does) and asks the loop with
thread-safe calls, so a probe never depends on the loop it judges.
"""

from __future__ import annotations

import asyncio
import socketserver
import threading
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from arbiter.worker.outage import database_answers

if TYPE_CHECKING:
    from aio_pika.abc import AbstractRobustConnection
    from sqlalchemy.ext.asyncio import AsyncEngine

    from arbiter.worker.consumer import Consumer

__all__ = ["Health", "readiness_problems", "serve"]

LIVENESS_TIMEOUT_S = 2.0
READINESS_TIMEOUT_S = 4.0  # the whole check; each part has its own shorter bound
PART_TIMEOUT_S = 1.5

# What a readiness check returns: the reasons the worker is not ready (none: ready).
Check = Callable[[], Coroutine[Any, Any, list[str]]]


class Health:
    """The worker's state as the probes see it: starting, serving (with a check), stopping."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._check: Check | None = None
        self._phase = "starting"

    def serving(self, check: Check) -> None:
        """From now on readiness is what ``check`` finds."""
        self._check = check
        self._phase = "serving"

    def stopping(self) -> None:
        """Draining after SIGTERM: take no new work, so never ready again."""
        self._check = None
        self._phase = "stopping"

    def live(self) -> tuple[bool, str]:
        """Called from the HTTP thread: does the event loop run a callback in time?"""
        answered = threading.Event()
        try:
            self._loop.call_soon_threadsafe(answered.set)
        except RuntimeError:  # the loop is closed: the worker has ended
            return False, "the event loop is closed"
        if answered.wait(LIVENESS_TIMEOUT_S):
            return True, "ok"
        return False, f"the event loop did not answer within {LIVENESS_TIMEOUT_S:.0f} s"

    def ready(self) -> tuple[bool, str]:
        """Called from the HTTP thread: run the check on the loop and report what it found."""
        check = self._check
        if check is None:
            return False, self._phase
        coroutine = check()
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        except RuntimeError:
            coroutine.close()
            return False, "the event loop is closed"
        try:
            problems = future.result(READINESS_TIMEOUT_S)
        except TimeoutError:
            future.cancel()
            return False, f"the readiness check did not finish within {READINESS_TIMEOUT_S:.0f} s"
        except Exception as exc:
            return False, f"the readiness check failed: {exc!r}"
        return (False, "; ".join(problems)) if problems else (True, "ok")

    def wsgi(self, fallback: WSGIApplication) -> WSGIApplication:
        """The probes on their paths; every other path goes to ``fallback`` (the metrics)."""
        probes = {"/livez": self.live, "/healthz": self.live, "/readyz": self.ready}

        def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
            probe = probes.get(environ.get("PATH_INFO", ""))
            if probe is None:
                return fallback(environ, start_response)
            ok, reason = probe()
            status = "200 OK" if ok else "503 Service Unavailable"
            body = f"{reason}\n".encode()
            headers = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]
            start_response(status, [*headers, ("Content-Length", str(len(body)))])
            return [body]

        return app


async def readiness_problems(
    consumer: Consumer, connection: AbstractRobustConnection, engine: AsyncEngine
) -> list[str]:
    """Why the worker cannot settle proposals now (an empty list: it can)."""
    problems: list[str] = []
    if not connection.connected.is_set():
        problems.append("not connected to RabbitMQ (reconnecting)")
    else:
        try:
            async with asyncio.timeout(PART_TIMEOUT_S):
                consuming = await consumer.consuming()
        except TimeoutError:
            problems.append("the broker channel is being restored")
        else:
            if not consuming:
                queue = consumer.settings.proposals_queue
                problems.append(f"no live consumer on {queue!r} (cancelled by the broker)")
    held = consumer.metrics.registry.get_sample_value("arbiter_held_for_outage") or 0
    if held:
        problems.append(f"holding {held:.0f} deliveries until PostgreSQL answers again")
    elif not await database_answers(engine, PART_TIMEOUT_S):
        problems.append("PostgreSQL does not answer")
    return problems


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    """One thread per request: a slow readiness check does not hold up a scrape."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Probes come every few seconds; they are not worth a log line each."""


def serve(host: str, port: int, app: WSGIApplication) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``app`` from a daemon thread; ``port`` 0 picks a free one."""
    server = make_server(host, port, app, _ThreadingServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="arbiter-http", daemon=True)
    thread.start()
    return server, thread
