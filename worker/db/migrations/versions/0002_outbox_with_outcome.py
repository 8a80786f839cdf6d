"""Keep each proposal's outbox (events, enqueued task runs) beside its outcome.

A crash after commit but before the events were published used to lose them:
the redelivery replayed the stored outcome only. With the outbox stored in the
same transaction, a replay publishes both again.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A constant default: PostgreSQL adds the column without rewriting the table.
    op.add_column(
        "processed_proposal",
        sa.Column("outbox", JSONB(), nullable=False, server_default=sa.text("'[]'::jsonb")),
    )


def downgrade() -> None:
    op.drop_column("processed_proposal", "outbox")
