"""Initial schema: runs, state histories, the task cache, tag limits, processed proposals.

Revision ID: 0001
Revises:
Create Date: 2025-11-27
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOW = sa.text("now()")
EMPTY_LIST = sa.text("'[]'::jsonb")
EMPTY_OBJECT = sa.text("'{}'::jsonb")


def _run_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("id", UUID(as_uuid=True), nullable=False),
        sa.Column("name", sa.Text(), nullable=False, server_default=""),
        sa.Column("tags", JSONB(), nullable=False, server_default=EMPTY_LIST),
        sa.Column("state_id", UUID(as_uuid=True), nullable=True),
        sa.Column("state_type", sa.Text(), nullable=True),
        sa.Column("state_name", sa.Text(), nullable=True),
        sa.Column("state_timestamp", sa.DateTime(timezone=True), nullable=True),
        sa.Column("run_count", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("expected_start_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_scheduled_start_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("start_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("total_run_time", sa.Interval(), nullable=False, server_default=sa.text("'0'")),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
    ]


def _create_state_table(name: str, run_table: str) -> None:
    run_id = f"{run_table}_id"
    op.create_table(
        name,
        sa.Column("id", UUID(as_uuid=True), nullable=False),
        sa.Column(run_id, UUID(as_uuid=True), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("state_details", JSONB(), nullable=False, server_default=EMPTY_OBJECT),
        sa.Column("data", JSONB(none_as_null=True), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.Column("seq", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{name}")),
        sa.ForeignKeyConstraint(
            [run_id],
            [f"{run_table}.id"],
            name=op.f(f"fk_{name}_{run_id}_{run_table}"),
            ondelete="CASCADE",
        ),
    )
    op.create_index(op.f(f"ix_{name}_{run_id}_timestamp"), name, [run_id, "timestamp"])


def upgrade() -> None:
    op.create_table(
        "flow_run",
        *_run_columns(),
        sa.Column("flow_name", sa.Text(), nullable=False, server_default=""),
        sa.Column("parameters", JSONB(), nullable=False, server_default=EMPTY_OBJECT),
        sa.Column("deployment_id", UUID(as_uuid=True), nullable=True),
        sa.Column("parent_task_run_id", UUID(as_uuid=True), nullable=True),
        sa.Column("idempotency_key", sa.Text(), nullable=True),
        sa.Column("infrastructure_pid", sa.Text(), nullable=True),
        sa.Column("empirical_policy", JSONB(), nullable=False, server_default=EMPTY_OBJECT),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_flow_run")),
    )
    op.create_table(
        "task_run",
        *_run_columns(),
        sa.Column("flow_run_id", UUID(as_uuid=True), nullable=True),
        sa.Column("task_key", sa.Text(), nullable=False, server_default=""),
        sa.Column("dynamic_key", sa.Text(), nullable=False, server_default=""),
        sa.Column("cache_key", sa.Text(), nullable=True),
        sa.Column("cache_expiration", sa.DateTime(timezone=True), nullable=True),
        sa.Column("task_inputs", JSONB(), nullable=False, server_default=EMPTY_OBJECT),
        sa.Column("flow_run_run_count", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("empirical_policy", JSONB(), nullable=False, server_default=EMPTY_OBJECT),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_run")),
    )
    op.create_index(op.f("ix_task_run_flow_run_id"), "task_run", ["flow_run_id"])

    _create_state_table("flow_run_state", "flow_run")
    _create_state_table("task_run_state", "task_run")

    op.create_table(
        "task_run_state_cache",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("cache_key", sa.Text(), nullable=False),
        sa.Column("cache_expiration", sa.DateTime(timezone=True), nullable=True),
        sa.Column("task_run_state_id", UUID(as_uuid=True), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_run_state_cache")),
    )
    op.create_index(
        op.f("ix_task_run_state_cache_cache_key"),
        "task_run_state_cache",
        ["cache_key"],
        postgresql_using="hash",
    )

    op.create_table(
        "concurrency_limit",
        sa.Column("tag", sa.Text(), nullable=False),
        sa.Column("concurrency_limit", sa.Integer(), nullable=False),
        sa.Column("active_slots", JSONB(), nullable=False, server_default=EMPTY_LIST),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.Column("updated", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("tag", name=op.f("pk_concurrency_limit")),
        sa.CheckConstraint(
            "concurrency_limit >= 0", name=op.f("ck_concurrency_limit_limit_not_negative")
        ),
    )

    op.create_table(
        "processed_proposal",
        sa.Column("proposal_id", UUID(as_uuid=True), nullable=False),
        sa.Column("body_sha256", sa.Text(), nullable=False),
        sa.Column("run_kind", sa.Text(), nullable=False),
        sa.Column("run_id", UUID(as_uuid=True), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("outcome", JSONB(), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("proposal_id", name=op.f("pk_processed_proposal")),
    )
    op.create_index(
        op.f("ix_processed_proposal_processed_at"), "processed_proposal", ["processed_at"]
    )


def downgrade() -> None:
    op.drop_table("processed_proposal")
    op.drop_table("concurrency_limit")
    op.drop_table("task_run_state_cache")
    op.drop_table("task_run_state")
    op.drop_table("flow_run_state")
    op.drop_table("task_run")
    op.drop_table("flow_run")
