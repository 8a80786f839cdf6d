"""Opening the worker's resources, with one clear line when a service is unusable."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.rules.context import RuleSettings
from arbiter.rules.engine import Orchestrator, PolicySet, default_policies
from arbiter.rules.policy import BaseOrchestrationPolicy
from arbiter.worker.broker import ClosingRobustConnection
from arbiter.worker.db.engine import create_engine
from arbiter.worker.settings import Settings

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 5.0


class ServiceError(Exception):
    """A setting points at a service that cannot be used; the message names the setting."""


def redact(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def _import_policy(path: str, setting: str) -> type[BaseOrchestrationPolicy]:
    module_name, _, attribute = path.replace(":", ".").rpartition(".")
    try:
        policy = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ServiceError(f"{setting}={path!r} cannot be imported: {exc}") from None
    if not (isinstance(policy, type) and issubclass(policy, BaseOrchestrationPolicy)):
        raise ServiceError(f"{setting}={path!r} is not an orchestration policy class")
    return policy


def build_orchestrator(settings: Settings) -> Orchestrator:
    """The orchestrator with the configured policies (import paths) and rule settings."""
    policies: PolicySet = default_policies()
    if settings.flow_policy:
        policies = replace(
            policies, flow=_import_policy(settings.flow_policy, "ARBITER_FLOW_POLICY")
        )
    if settings.task_policy:
        policies = replace(
            policies, task=_import_policy(settings.task_policy, "ARBITER_TASK_POLICY")
        )
    return Orchestrator(
        policies=policies,
        settings=RuleSettings(
            max_cache_key_length=settings.max_cache_key_length,
            tag_concurrency_slot_wait_s=settings.tag_concurrency_slot_wait_s,
            slot_lease_ttl_s=settings.slot_lease_ttl_s,
            deployment_concurrency_slot_wait_s=settings.deployment_concurrency_slot_wait_s,
            deployment_lease_duration_s=settings.deployment_lease_duration_s,
        ),
    )


@contextlib.asynccontextmanager
async def open_database(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """An engine whose server answered ``SELECT 1``."""
    url = settings.database_url
    try:
        engine = create_engine(
            url, pool_size=settings.db_pool_size, lock_timeout_s=settings.lock_timeout_s
        )
    except Exception as exc:
        raise ServiceError(f"ARBITER_DATABASE_URL={redact(url)!r} is not usable: {exc}") from None
    try:
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ServiceError(
                f"cannot reach PostgreSQL at ARBITER_DATABASE_URL={redact(url)}: {reason}"
            ) from None
        yield engine
    finally:
        await engine.dispose()


async def connect_broker(settings: Settings) -> AbstractRobustConnection:
    """A robust AMQP connection, or a ServiceError naming ARBITER_AMQP_URL."""
    url = settings.amqp_url
    try:
        return await aio_pika.connect_robust(
            url,
            timeout=10,
            connection_class=ClosingRobustConnection,
            client_properties={"connection_name": f"arbiter-{os.getpid()}"},
        )
    except Exception as exc:
        reason = str(exc).strip() or type(exc).__name__
        raise ServiceError(
            f"cannot reach RabbitMQ at ARBITER_AMQP_URL={redact(url)}: {reason}"
        ) from None


@dataclass(frozen=True)
class Runtime:
    engine: AsyncEngine
    connection: AbstractRobustConnection
    orchestrator: Orchestrator


@contextlib.asynccontextmanager
async def build_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """Database, broker and orchestrator for one worker process."""
    orchestrator = build_orchestrator(settings)
    async with open_database(settings) as engine:
        connection = await connect_broker(settings)
        try:
            yield Runtime(engine=engine, connection=connection, orchestrator=orchestrator)
        finally:
            # A robust connection that is reconnecting to an unreachable broker would
            # wait for it; an unclean close loses nothing (unacked deliveries come back).
            try:
                await asyncio.wait_for(connection.close(), CLOSE_TIMEOUT_S)
            except TimeoutError:
                log.warning("the broker connection did not close within %.0f s", CLOSE_TIMEOUT_S)


T = TypeVar("T")


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``ARBITER_EVENT_LOOP`` names (None: asyncio's default)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ServiceError("ARBITER_EVENT_LOOP=uvloop, but uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], settings: Settings) -> T:
    """Run ``main`` to completion on the event loop the settings choose."""
    with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
        return runner.run(main)


# CPython collects its youngest generation every 700 net allocations of container objects.
# A proposal makes thousands (pydantic models, dicts, coroutines and futures), so a worker
# ran a collection several times per proposal, scanning objects that live on anyway.
GC_GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    """For a worker process, once started up: what exists now (modules, settings, pools)
    is never scanned again (``gc.freeze``), and the youngest generation is collected every
    ``GC_GEN0_THRESHOLD`` allocations instead of 700 (about 8 % less CPU per proposal at
    64 per transaction, ``benchmarks/hot_path.py``). Reference cycles are still freed."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, older, oldest)
