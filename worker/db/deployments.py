"""Deployments in PostgreSQL: the read orchestration makes, and the administration that
keeps each deployment's ``deployment:<id>`` global limit in step. Mixed into ``PgStore``."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, Protocol

from arbiter.rules.store import Deployment, deployment_limit_name
from arbiter.worker.db import global_limits, tables

__all__ = ["DeploymentRows"]

_T = tables.deployment.name
_COLUMNS = "id, name, concurrency_limit, collision_strategy, grace_period_seconds"

READ = f"SELECT {_COLUMNS} FROM {_T} WHERE id = $1"
UPSERT = f"""
INSERT INTO {_T} ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (id) DO UPDATE SET name = excluded.name,
    concurrency_limit = excluded.concurrency_limit,
    collision_strategy = excluded.collision_strategy,
    grace_period_seconds = excluded.grace_period_seconds, updated = now()
RETURNING id
"""
DELETE = f"DELETE FROM {_T} WHERE id = $1 RETURNING id"
LIST = f'SELECT {_COLUMNS} FROM {_T} ORDER BY name COLLATE "C", id::text'


def deployment_from(record: Any) -> Deployment:
    row = getattr(record, "_mapping", record)
    return Deployment(
        id=row["id"],
        name=row["name"],
        concurrency_limit=row["concurrency_limit"],
        collision_strategy=row["collision_strategy"],
        grace_period_seconds=row["grace_period_seconds"],
    )


class _Fetcher(Protocol):
    async def fetch_rows(self, query: str, *args: Any) -> Sequence[Any]: ...


class DeploymentRows:
    """``PgStore``'s deployment methods (the ``rules.store`` protocols)."""

    async def read_deployment(self: _Fetcher, deployment_id: uuid.UUID) -> Deployment | None:
        rows = await self.fetch_rows(READ, deployment_id)
        return deployment_from(rows[0]) if rows else None

    async def upsert_deployment(self: _Fetcher, deployment: Deployment) -> None:
        await self.fetch_rows(
            UPSERT,
            deployment.id,
            deployment.name,
            deployment.concurrency_limit,
            deployment.collision_strategy,
            deployment.grace_period_seconds,
        )
        name = deployment_limit_name(deployment.id)
        if deployment.concurrency_limit is None:
            await self.fetch_rows(global_limits.DELETE, name)
        else:
            await self.fetch_rows(
                global_limits.UPSERT, name, deployment.concurrency_limit, True, 0.0
            )

    async def delete_deployment(self: _Fetcher, deployment_id: uuid.UUID) -> bool:
        await self.fetch_rows(global_limits.DELETE, deployment_limit_name(deployment_id))
        return bool(await self.fetch_rows(DELETE, deployment_id))

    async def list_deployments(self: _Fetcher) -> list[Deployment]:
        return [deployment_from(row) for row in await self.fetch_rows(LIST)]
