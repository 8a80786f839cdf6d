"""Proposals the pool follows through WAITs, and an index for the background sweeps.

``parked_proposal`` holds a proposal parked after a WAIT until it is due again; the
partial index lets the sweeps find scheduled, paused and cancelled flow runs without
reading the whole table.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "parked_proposal",
        sa.Column("proposal_id", UUID(as_uuid=True), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("body_sha256", sa.Text(), nullable=False),
        sa.Column("reply_to", sa.Text(), nullable=True),
        sa.Column("correlation_id", sa.Text(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("parked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("answer", JSONB(none_as_null=True), nullable=True),
        sa.Column("answer_outbox", JSONB(none_as_null=True), nullable=True),
        sa.PrimaryKeyConstraint("proposal_id", name="pk_parked_proposal"),
    )
    op.create_index("ix_parked_proposal_due_at", "parked_proposal", ["due_at"])
    op.create_index(
        "ix_flow_run_sweepable",
        "flow_run",
        ["state_type", "next_scheduled_start_time"],
        postgresql_where=sa.text("state_type IN ('SCHEDULED', 'PAUSED', 'CANCELLED')"),
    )


def downgrade() -> None:
    op.drop_index("ix_flow_run_sweepable", table_name="flow_run")
    op.drop_table("parked_proposal")
