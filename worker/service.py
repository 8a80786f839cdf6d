"""One worker process: serve metrics and probes, consume until SIGTERM/SIGINT, drain, report."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal

from arbiter.worker.consumer import Consumer
from arbiter.worker.health import Health, readiness_problems
from arbiter.worker.metrics import WorkerMetrics
from arbiter.worker.passes import Passes
from arbiter.worker.purge import purge_forever
from arbiter.worker.reevaluation import Reevaluator
from arbiter.worker.settings import Settings
from arbiter.worker.sweepers import Sweeper
from arbiter.worker.topology import TopologyMissing

log = logging.getLogger("arbiter.worker.consumer")

# How long stopping waits for a background pass in progress (sweep, re-evaluation, purge).
BACKGROUND_STOP_S = 10.0

__all__ = ["run_worker"]


async def run_worker(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    metrics: WorkerMetrics | None = None,
) -> int:
    """Run one worker until SIGTERM/SIGINT (or ``stop``), drain, and return the exit code.
    ``metrics`` lets an in-process caller (a test) read the worker's counters."""
    from arbiter.worker.runtime import ServiceError

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    metrics = metrics or WorkerMetrics()
    health = Health(loop)
    if settings.metrics_port is not None:
        try:
            port = metrics.serve(settings.metrics_port, health=health)
        except OSError as exc:
            message = f"ARBITER_METRICS_PORT: cannot serve metrics on port {settings.metrics_port}"
            raise ServiceError(f"{message}: {exc.strerror or exc}") from None
        log.info("metrics on http://0.0.0.0:%d/metrics, probes on /livez and /readyz", port)
    try:
        return await _consume_until_stopped(settings, metrics, stop, health)
    finally:
        metrics.close()


async def _consume_until_stopped(
    settings: Settings, metrics: WorkerMetrics, stop: asyncio.Event, health: Health
) -> int:
    from arbiter.worker.runtime import ServiceError, build_runtime

    async with build_runtime(settings) as runtime:
        consumer = Consumer(
            settings, runtime.engine, runtime.orchestrator, runtime.connection, metrics
        )
        try:
            await consumer.start()
        except TopologyMissing as exc:
            raise ServiceError(str(exc)) from None
        health.serving(
            functools.partial(readiness_problems, consumer, runtime.connection, runtime.engine)
        )
        reevaluator = Reevaluator(
            settings, runtime.engine, runtime.orchestrator, runtime.connection, metrics
        )
        parked = asyncio.create_task(reevaluator.run_forever())
        if settings.sweepers:
            sweeper = Sweeper(
                settings, runtime.engine, runtime.orchestrator, runtime.connection, metrics
            )
            purges = sweeper.passes
            purger = asyncio.create_task(sweeper.run_forever())  # the purge included
        else:
            clock, purges = runtime.orchestrator.clock, Passes()
            purger = asyncio.create_task(
                purge_forever(runtime.engine, clock, settings.retention_days, purges)
            )
        await stop.wait()
        health.stopping()
        log.info("stopping: draining %d in-flight proposals", consumer.unsettled)
        draining = asyncio.create_task(consumer.drain())
        await asyncio.wait({draining}, timeout=settings.shutdown_timeout_s)
        if not draining.done():
            # Typically the broker is unreachable. Nothing is lost: whatever was not acked
            # is redelivered to another worker, and committed work replays its outcome.
            log.warning(
                "stopping: gave up after %.0f s (ARBITER_SHUTDOWN_TIMEOUT_S) with %d"
                " proposals unsettled; the broker will redeliver them",
                settings.shutdown_timeout_s,
                consumer.unsettled,
            )
            # Before cancelling the drain, so that where it waits is in the dump too.
            log.info("stopping: the unsettled batches wait at\n%s", consumer.describe_unsettled())
            draining.cancel()
            await asyncio.gather(draining, return_exceptions=True)
            await consumer.close_connections()
        elif (error := draining.exception()) is not None:
            raise error
        # Between passes: a pass cut off mid-transaction would leave its connection behind.
        for passes, task in ((purges, purger), (reevaluator.passes, parked)):
            await passes.stop(task, BACKGROUND_STOP_S)
        invalid = metrics.total("arbiter_invalid_proposals")
        log.info(
            "stopped after %d proposals (%d replays, %d invalid, %d requeued)",
            metrics.total("arbiter_outcomes") - invalid,
            metrics.total("arbiter_replays"),
            invalid,
            metrics.total("arbiter_requeued"),
        )
    return 0
