"""The PostgreSQL schema, as SQLAlchemy Core tables.

``versions/0001_initial.py`` creates exactly these tables with explicit
``op.create_table`` calls (a test compares the two). Datetimes are ``timestamptz``
(aware UTC in Python); pydantic sub-models are stored as JSONB in their JSON form.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, UUID

# Stable constraint names, so later migrations can address them by name.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

_NOW = sa.text("now()")
_EMPTY_LIST = sa.text("'[]'::jsonb")
_EMPTY_OBJECT = sa.text("'{}'::jsonb")


def _created() -> sa.Column[Any]:
    return sa.Column("created", sa.DateTime(timezone=True), nullable=False, server_default=_NOW)


def _run_columns() -> list[sa.Column[Any]]:
    """Columns every run has: Prefect's ``Run`` bookkeeping plus the current state's summary.

    ``state_id`` has no foreign key: the run and its state tables reference each
    other, and the store always writes both in one transaction.
    """
    return [
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column("name", sa.Text, nullable=False, server_default=""),
        sa.Column("tags", JSONB, nullable=False, server_default=_EMPTY_LIST),
        sa.Column("state_id", UUID(as_uuid=True), nullable=True),
        sa.Column("state_type", sa.Text, nullable=True),
        sa.Column("state_name", sa.Text, nullable=True),
        sa.Column("state_timestamp", sa.DateTime(timezone=True), nullable=True),
        sa.Column("run_count", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("expected_start_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_scheduled_start_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("start_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("total_run_time", sa.Interval, nullable=False, server_default=sa.text("'0'")),
        _created(),
    ]


def _state_table(name: str, run_table: str) -> sa.Table:
    """A run kind's state history; ``seq`` keeps insertion order when timestamps tie."""
    run_id = f"{run_table}_id"
    return sa.Table(
        name,
        metadata,
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column(
            run_id,
            UUID(as_uuid=True),
            sa.ForeignKey(f"{run_table}.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("message", sa.Text, nullable=True),
        sa.Column("state_details", JSONB, nullable=False, server_default=_EMPTY_OBJECT),
        # SQL NULL, not JSON null, for "no data": reads back as None either way.
        sa.Column("data", JSONB(none_as_null=True), nullable=True),
        _created(),
        sa.Column("seq", sa.BigInteger, sa.Identity(), nullable=False),
        # Not unique: clients may send equal task timestamps (flows are bumped by a rule).
        sa.Index(None, run_id, "timestamp"),
    )


flow_run = sa.Table(
    "flow_run",
    metadata,
    *_run_columns(),
    sa.Column("flow_name", sa.Text, nullable=False, server_default=""),
    sa.Column("parameters", JSONB, nullable=False, server_default=_EMPTY_OBJECT),
    sa.Column("deployment_id", UUID(as_uuid=True), nullable=True),
    sa.Column("parent_task_run_id", UUID(as_uuid=True), nullable=True),
    sa.Column("idempotency_key", sa.Text, nullable=True),
    sa.Column("infrastructure_pid", sa.Text, nullable=True),
    sa.Column("empirical_policy", JSONB, nullable=False, server_default=_EMPTY_OBJECT),
)

task_run = sa.Table(
    "task_run",
    metadata,
    *_run_columns(),
    # No foreign key: a task proposal may arrive before its flow run exists on this broker.
    sa.Column("flow_run_id", UUID(as_uuid=True), nullable=True, index=True),
    sa.Column("task_key", sa.Text, nullable=False, server_default=""),
    sa.Column("dynamic_key", sa.Text, nullable=False, server_default=""),
    sa.Column("cache_key", sa.Text, nullable=True),
    sa.Column("cache_expiration", sa.DateTime(timezone=True), nullable=True),
    sa.Column("task_inputs", JSONB, nullable=False, server_default=_EMPTY_OBJECT),
    sa.Column("flow_run_run_count", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("empirical_policy", JSONB, nullable=False, server_default=_EMPTY_OBJECT),
)

flow_run_state = _state_table("flow_run_state", "flow_run")
task_run_state = _state_table("task_run_state", "task_run")

# No foreign key to task_run_state: a lookup joins, so an entry whose state is gone
# is skipped, as in the in-memory store.
task_run_state_cache = sa.Table(
    "task_run_state_cache",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("cache_key", sa.Text, nullable=False),
    sa.Column("cache_expiration", sa.DateTime(timezone=True), nullable=True),
    sa.Column("task_run_state_id", UUID(as_uuid=True), nullable=False),
    _created(),
    # A hash index: keys may exceed a B-tree entry's ~2.7 kB (Prefect caches over-long keys
    # after rejecting them), and the lookup is by equality only.
    sa.Index("ix_task_run_state_cache_cache_key", "cache_key", postgresql_using="hash"),
)

# The sweeps (worker/sweepers.py) look for flow runs in these states only: a small index.
SWEPT_FLOW_STATES = ("SCHEDULED", "PAUSED", "CANCELLED")
sa.Index(
    "ix_flow_run_sweepable",
    flow_run.c.state_type,
    flow_run.c.next_scheduled_start_time,
    postgresql_where=flow_run.c.state_type.in_(SWEPT_FLOW_STATES),
)

# V1 tag limits (Prefect's ``concurrency_limit``). Global (V2) limits have their own table.
concurrency_limit = sa.Table(
    "concurrency_limit",
    metadata,
    sa.Column("tag", sa.Text, primary_key=True),
    sa.Column("concurrency_limit", sa.Integer, nullable=False),
    sa.Column("active_slots", JSONB, nullable=False, server_default=_EMPTY_LIST),
    _created(),
    sa.Column("updated", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
    # The slots' leases: holder → expiry (ISO 8601), see rules.store.TagLimit.
    sa.Column("slot_expires", JSONB, nullable=False, server_default=_EMPTY_OBJECT),
    sa.CheckConstraint("concurrency_limit >= 0", name="limit_not_negative"),
)

# Global (V2) limits (Prefect's ``concurrency_limit_v2``): ``holders`` maps each holder (a
# run id) to its lease, ``{"acquired": …, "expires": …}``; the active slots are the holders.
concurrency_limit_v2 = sa.Table(
    "concurrency_limit_v2",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("concurrency_limit", sa.Integer, nullable=False),
    sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("holders", JSONB, nullable=False, server_default=_EMPTY_OBJECT),
    sa.Column("denied_slots", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("slot_decay_per_second", sa.Float, nullable=False, server_default=sa.text("0")),
    sa.Column("avg_slot_occupancy_seconds", sa.Float, nullable=False, server_default=sa.text("2")),
    _created(),
    sa.Column("updated", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
    sa.CheckConstraint("concurrency_limit >= 0", name="limit_not_negative"),
    sa.CheckConstraint("slot_decay_per_second >= 0", name="decay_not_negative"),
)

# Deployments, as far as orchestration needs them: their concurrency settings. The limit
# itself is the global limit ``deployment:<id>``, kept in step by the store.
deployment = sa.Table(
    "deployment",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("name", sa.Text, nullable=False, server_default=""),
    sa.Column("concurrency_limit", sa.Integer, nullable=True),
    sa.Column("collision_strategy", sa.Text, nullable=False, server_default="ENQUEUE"),
    sa.Column("grace_period_seconds", sa.Integer, nullable=True),
    _created(),
    sa.Column("updated", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
    sa.CheckConstraint("concurrency_limit >= 0", name="limit_not_negative"),
    sa.CheckConstraint(
        "collision_strategy IN ('ENQUEUE', 'CANCEL_NEW')", name="known_collision_strategy"
    ),
)

# Proposal ids already answered: the exactly-once guarantee, purged after the retention window.
processed_proposal = sa.Table(
    "processed_proposal",
    metadata,
    sa.Column("proposal_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("body_sha256", sa.Text, nullable=False),
    sa.Column("run_kind", sa.Text, nullable=False),
    sa.Column("run_id", UUID(as_uuid=True), nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("outcome", JSONB, nullable=False),
    # What the transaction asked to publish after commit; a replay publishes it again.
    sa.Column("outbox", JSONB, nullable=False, server_default=_EMPTY_LIST),
    sa.Column(
        "processed_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW, index=True
    ),
)

# Proposals the pool follows through WAITs (worker/parking.py): parked in the WAIT's own
# transaction, re-evaluated once due under a derived id; ``answer`` holds the final
# outcome from its commit until it is published, then the row goes.
parked_proposal = sa.Table(
    "parked_proposal",
    metadata,
    sa.Column("proposal_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("body_sha256", sa.Text, nullable=False),
    sa.Column("reply_to", sa.Text, nullable=True),
    sa.Column("correlation_id", sa.Text, nullable=True),
    sa.Column("attempt", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("parked_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("due_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("answer", JSONB(none_as_null=True), nullable=True),
    sa.Column("answer_outbox", JSONB(none_as_null=True), nullable=True),
    # The proposal's W3C trace context (worker/tracing.py), for what its final answer causes.
    sa.Column("traceparent", sa.Text, nullable=True),
    sa.Column("tracestate", sa.Text, nullable=True),
)
