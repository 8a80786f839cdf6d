"""Worker settings, from ``ARBITER_*`` environment variables (and ``.env``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything a worker, the CLI and the client read from the environment."""

    model_config = SettingsConfigDict(env_prefix="ARBITER_", env_file=".env", extra="ignore")

    amqp_url: str = "amqp://guest:guest@localhost:5672/"
    database_url: str = "postgresql+asyncpg://arbiter:arbiter@localhost:5432/arbiter"

    proposals_exchange: str = "arbiter.proposals"
    proposals_queue: str = "arbiter.proposals"
    proposals_routing_key: str = "propose"
    outcomes_exchange: str = "arbiter.outcomes"
    dead_exchange: str = "arbiter.dead"
    dead_queue: str = "arbiter.dead"
    events_exchange: str = "arbiter.events"
    task_runs_exchange: str = "arbiter.task-runs"
    # False: the topology is the broker admin's (deploy/rabbitmq/definitions.json); workers and
    # clients only check it exists (passive declares), so they need no configure permission.
    declare_topology: bool = True

    delivery_limit: int = Field(default=5, ge=1)
    prefetch: int = Field(default=256, ge=1)
    # Transactions (batches of proposals) a worker runs at once.
    concurrency: int = Field(default=4, ge=1)
    # Deliveries settled by one transaction at most, and how long a batch may wait to fill
    # while other batches are in flight: until none is, at most this long (never when the
    # worker is idle or its window is full). See worker/batching.py.
    batch_max: int = Field(default=64, ge=1)
    batch_wait_ms: float = Field(default=50.0, ge=0)
    # Confirming channels a worker publishes outcomes on, in turn. A batch's answers leave
    # together on one (worker/frames.py), and one channel's confirms come back coalesced.
    publish_channels: int = Field(default=1, ge=1)
    max_message_bytes: int = Field(default=256 * 1024, ge=1024)
    db_pool_size: int = Field(default=10, ge=1)
    retry_attempts: int = Field(default=5, ge=1)
    retry_max_wait_s: float = Field(default=2.0, gt=0)
    retention_days: float = Field(default=7.0, gt=0)
    lock_timeout_s: float = Field(default=10.0, gt=0)
    # SIGTERM: how long to let in-flight proposals finish (the broker may be unreachable).
    shutdown_timeout_s: float = Field(default=30.0, gt=0)

    flow_policy: str | None = None
    task_policy: str | None = None
    max_cache_key_length: int = Field(default=2000, ge=1)
    tag_concurrency_slot_wait_s: int = Field(default=10, ge=0)
    # A global-limit slot's lease: renewed by the holder's accepted transitions.
    slot_lease_ttl_s: float = Field(default=3600.0, gt=0, allow_inf_nan=False)
    # Deployment concurrency (Prefect's defaults): an ENQUEUEd run's wait, and the lease of
    # a deployment slot whose deployment sets no grace period.
    deployment_concurrency_slot_wait_s: int = Field(default=30, ge=0)
    deployment_lease_duration_s: float = Field(default=300.0, ge=30, le=3600)

    # Background sweeps (worker/sweepers.py): late runs, expired pauses, task runs of
    # cancelled flow runs, retention. Safe on every worker at once.
    sweepers: bool = True
    late_after_s: float = Field(default=15.0, ge=0)
    sweep_interval_s: float = Field(default=5.0, gt=0)
    # Proposals parked after a WAIT (follow_waits): the longest total wait before the last
    # WAIT is the answer, and the longest pause between looks for newly parked ones.
    max_wait_s: float = Field(default=600.0, gt=0)
    parked_poll_s: float = Field(default=1.0, gt=0)

    # The worker's event loop: uvloop (libuv) spends less CPU per wake-up, which a batch of
    # one proposal is mostly made of; auto: uvloop when installed, else asyncio's own.
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # text: readable lines; json: one object per line with run, proposal and trace ids.
    log_format: Literal["text", "json"] = "text"
    # OpenTelemetry spans per proposal, when opentelemetry-api is installed (the otel extra).
    tracing: bool = True
    # Prometheus /metrics on this port when set (0: any free port, logged at start-up).
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
