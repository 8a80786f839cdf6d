"""Global (V2) concurrency limits, their slots held under leases in the limit's own row.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOW = sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "concurrency_limit_v2",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("concurrency_limit", sa.Integer(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False, server_default=sa.true()),
        sa.Column("holders", JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("denied_slots", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("slot_decay_per_second", sa.Float(), nullable=False, server_default=sa.text("0")),
        sa.Column(
            "avg_slot_occupancy_seconds", sa.Float(), nullable=False, server_default=sa.text("2")
        ),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.Column("updated", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_concurrency_limit_v2")),
        sa.CheckConstraint(
            "concurrency_limit >= 0", name=op.f("ck_concurrency_limit_v2_limit_not_negative")
        ),
        sa.CheckConstraint(
            "slot_decay_per_second >= 0", name=op.f("ck_concurrency_limit_v2_decay_not_negative")
        ),
    )


def downgrade() -> None:
    op.drop_table("concurrency_limit_v2")
