"""A broker connection lost while the worker starts: it tries again instead of exiting."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from aio_pika.abc import AbstractRobustConnection
from aiormq.exceptions import AMQPConnectionError

from arbiter.schemas import FlowRunSpec, OutcomeStatus, ProposedState, StateType
from arbiter.worker.client import ArbiterClient
from arbiter.worker.consumer import Consumer
from arbiter.worker.metrics import WorkerMetrics
from arbiter.worker.runtime import Runtime, build_runtime
from arbiter.worker.settings import Settings

pytestmark = pytest.mark.integration


class CutWhileOpening:
    """The real robust connection, except that its first channels fail as if the TCP
    connection had just been cut under them."""

    def __init__(self, connection: AbstractRobustConnection, failures: int) -> None:
        self._connection = connection
        self.failures = failures

    async def channel(self, *args: Any, **kwargs: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise AMQPConnectionError("Server connection unexpectedly closed")
        return await self._connection.channel(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


def consumer_over(settings: Settings, runtime: Runtime, connection: CutWhileOpening) -> Consumer:
    """A consumer of the real runtime whose connection is ``connection``."""
    return Consumer(
        settings,
        runtime.engine,
        runtime.orchestrator,
        connection,  # type: ignore[arg-type]
        WorkerMetrics(),
    )


async def test_a_connection_lost_while_starting_is_retried_and_the_worker_serves(
    settings: Settings,
) -> None:
    async with build_runtime(settings) as runtime:
        flaky = CutWhileOpening(runtime.connection, failures=2)
        consumer = consumer_over(settings, runtime, flaky)
        await consumer.start()
        assert flaky.failures == 0
        try:
            async with ArbiterClient.connect(settings=settings) as client:
                outcome = await client.propose(
                    "flow_run",
                    uuid.uuid4(),
                    ProposedState(type=StateType.SCHEDULED),
                    run=FlowRunSpec(name="n", flow_name="f"),
                )
            assert outcome.status is OutcomeStatus.ACCEPT
        finally:
            await consumer.drain()


async def test_a_fault_that_is_not_a_lost_connection_is_not_retried(
    settings: Settings,
) -> None:
    """A bug or a refusal shows at once; only a lost connection is worth waiting out."""

    class Refusing(CutWhileOpening):
        async def channel(self, *args: Any, **kwargs: Any) -> Any:
            self.failures += 1
            raise ValueError("not a connection fault")

    async with build_runtime(settings) as runtime:
        refusing = Refusing(runtime.connection, failures=0)
        consumer = consumer_over(settings, runtime, refusing)
        with pytest.raises(ValueError, match="not a connection fault"):
            await consumer.start()
        assert refusing.failures == 1


async def test_a_channel_refused_by_a_connection_that_just_died_is_retried(
    settings: Settings,
) -> None:
    """aiormq refuses a channel on a connection cut a moment ago with RuntimeError
    "<Connection ...> closed" before aio-pika marks the robust one as reconnecting; the
    worker opens several channels at start (one to consume, ARBITER_PUBLISH_CHANNELS to
    publish on), so a cut among them must be retried like any lost connection."""

    class ClosedUnderneath(CutWhileOpening):
        opened = 0

        async def channel(self, *args: Any, **kwargs: Any) -> Any:
            self.opened += 1
            if self.opened == 2 and self.failures:  # the first publishing channel
                self.failures -= 1
                raise RuntimeError('<Connection: "amqp://127.0.0.1:5672/" at 0x7f> closed')
            return await self._connection.channel(*args, **kwargs)

    async with build_runtime(settings) as runtime:
        flaky = ClosedUnderneath(runtime.connection, failures=1)
        consumer = consumer_over(settings, runtime, flaky)
        await consumer.start()
        try:
            assert flaky.failures == 0
            assert await consumer.consuming()
        finally:
            await consumer.drain()
