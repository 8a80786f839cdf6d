"""The trace context of a parked proposal, for its final outcome and events.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("parked_proposal", sa.Column("traceparent", sa.Text, nullable=True))
    op.add_column("parked_proposal", sa.Column("tracestate", sa.Text, nullable=True))


def downgrade() -> None:
    op.drop_column("parked_proposal", "tracestate")
    op.drop_column("parked_proposal", "traceparent")
