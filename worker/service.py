"""One worker process: serve metrics, consume until SIGTERM/SIGINT, drain, report."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from worker.consumer import Consumer
from worker.metrics import WorkerMetrics
from worker.settings import Settings

log = logging.getLogger("worker.consumer")

__all__ = ["run_worker"]


async def run_worker(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    metrics: WorkerMetrics | None = None,
) -> int:
    """Run one worker until SIGTERM/SIGINT (or ``stop``), drain, and return the exit code.
    ``metrics`` lets an in-process caller (a test) read the worker's counters."""
    from worker.runtime import ServiceError

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    metrics = metrics or WorkerMetrics()
    if settings.metrics_port is not None:
        try:
            port = metrics.serve(settings.metrics_port)
        except OSError as exc:
            message = f"ARBITER_METRICS_PORT: cannot serve metrics on port {settings.metrics_port}"
            raise ServiceError(f"{message}: {exc.strerror or exc}") from None
        log.info("metrics on http://0.0.0.0:%d/metrics", port)
    try:
        return await _consume_until_stopped(settings, metrics, stop)
    finally:
        metrics.close()


async def _consume_until_stopped(
    settings: Settings, metrics: WorkerMetrics, stop: asyncio.Event
) -> int:
    from worker.runtime import build_runtime

    async with build_runtime(settings) as runtime:
        consumer = Consumer(
            settings, runtime.engine, runtime.orchestrator, runtime.connection, metrics
        )
        await consumer.start()
        purger = asyncio.create_task(consumer.purge_forever())
        await stop.wait()
        log.info("stopping: draining %d in-flight proposals", consumer.unsettled)
        try:
            await asyncio.wait_for(consumer.drain(), settings.shutdown_timeout_s)
        except TimeoutError:
            # Typically the broker is unreachable. Nothing is lost: whatever was not acked
            # is redelivered to another worker, and committed work replays its outcome.
            log.warning(
                "stopping: gave up after %.0f s (ARBITER_SHUTDOWN_TIMEOUT_S) with %d"
                " proposals unsettled; the broker will redeliver them",
                settings.shutdown_timeout_s,
                consumer.unsettled,
            )
        purger.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await purger
        invalid = metrics.total("arbiter_invalid_proposals")
        log.info(
            "stopped after %d proposals (%d replays, %d invalid, %d requeued)",
            metrics.total("arbiter_outcomes") - invalid,
            metrics.total("arbiter_replays"),
            invalid,
            metrics.total("arbiter_requeued"),
        )
    return 0
