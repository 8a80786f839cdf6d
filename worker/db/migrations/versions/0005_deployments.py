"""Deployments and their concurrency settings (the limit is the global limit
``deployment:<id>``).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOW = sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "deployment",
        sa.Column("id", UUID(as_uuid=True), nullable=False),
        sa.Column("name", sa.Text(), nullable=False, server_default=""),
        sa.Column("concurrency_limit", sa.Integer(), nullable=True),
        sa.Column("collision_strategy", sa.Text(), nullable=False, server_default="ENQUEUE"),
        sa.Column("grace_period_seconds", sa.Integer(), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.Column("updated", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deployment")),
        sa.CheckConstraint("concurrency_limit >= 0", name=op.f("ck_deployment_limit_not_negative")),
        sa.CheckConstraint(
            "collision_strategy IN ('ENQUEUE', 'CANCEL_NEW')",
            name=op.f("ck_deployment_known_collision_strategy"),
        ),
    )


def downgrade() -> None:
    op.drop_table("deployment")
