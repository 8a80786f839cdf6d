"""deploy/postgres/roles.sql on a real PostgreSQL: the owner migrated the schema (the fixture
did); the worker role reads and writes rows and can change nothing else; the reader reads;
tables a later migration creates get the same grants by themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from arbiter.worker.db.tables import metadata
from tests.integration.deploy.conftest import Roles, plain

pytestmark = pytest.mark.integration

TABLES = sorted(metadata.tables)


@pytest.fixture
async def as_worker(roles: Roles) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(plain(roles.worker))
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def as_reader(roles: Roles) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(plain(roles.reader))
    try:
        yield conn
    finally:
        await conn.close()


def cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``arbiter ARGS`` in a process of its own, on ``database_url``."""
    env = {**os.environ, "ARBITER_DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "arbiter", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_the_owner_owns_the_database_and_every_table(roles: Roles) -> None:
    conn = await asyncpg.connect(plain(roles.owner))
    try:
        assert (
            await conn.fetchval(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
            )
            == "arbiter_owner"
        )
        owners = await conn.fetch(
            "SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'"
        )
    finally:
        await conn.close()
    assert {row["tablename"] for row in owners} == {*TABLES, "alembic_version"}
    assert {row["tableowner"] for row in owners} == {"arbiter_owner"}


@pytest.mark.parametrize("table", TABLES)
async def test_the_worker_may_read_and_write_every_table(
    as_worker: asyncpg.Connection, table: str
) -> None:
    """SELECT, INSERT, UPDATE and DELETE, checked by PostgreSQL's own privilege functions;
    the round trip in test_broker_rights.py uses them for real."""
    for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE"):
        assert await as_worker.fetchval("SELECT has_table_privilege($1, $2)", table, privilege)
    for privilege in ("TRUNCATE", "REFERENCES", "TRIGGER"):
        assert not await as_worker.fetchval("SELECT has_table_privilege($1, $2)", table, privilege)


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE TABLE intruder (id int)",
        "DROP TABLE concurrency_limit",
        "TRUNCATE processed_proposal",
        "ALTER TABLE flow_run ADD COLUMN intruder int",
        "CREATE INDEX intruder ON flow_run (name)",
        "CREATE TEMPORARY TABLE intruder (id int)",
        "CREATE SCHEMA intruder",
        "CREATE FUNCTION intruder() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    ],
)
async def test_the_worker_may_change_no_schema(
    as_worker: asyncpg.Connection, statement: str
) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await as_worker.execute(statement)


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO concurrency_limit (tag, concurrency_limit) VALUES ('x', 1)",
        "UPDATE flow_run SET name = 'x'",
        "DELETE FROM processed_proposal",
        "TRUNCATE processed_proposal",
        "CREATE TABLE intruder (id int)",
    ],
)
async def test_the_reader_may_change_nothing(as_reader: asyncpg.Connection, statement: str) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await as_reader.execute(statement)


async def test_a_table_a_later_migration_creates_gets_the_same_grants(roles: Roles) -> None:
    """The default privileges: nobody has to run roles.sql again after a migration."""
    owner = await asyncpg.connect(plain(roles.owner))
    name = f"later_{uuid.uuid4().hex[:8]}"
    try:
        await owner.execute(f"CREATE TABLE {name} (id bigint GENERATED ALWAYS AS IDENTITY, v int)")
        worker = await asyncpg.connect(plain(roles.worker))
        reader = await asyncpg.connect(plain(roles.reader))
        try:
            await worker.execute(f"INSERT INTO {name} (v) VALUES (1)")  # the sequence, too
            assert await reader.fetchval(f"SELECT v FROM {name}") == 1
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await reader.execute(f"DELETE FROM {name}")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await worker.execute(f"DROP TABLE {name}")
        finally:
            await worker.close()
            await reader.close()
    finally:
        await owner.execute(f"DROP TABLE IF EXISTS {name}")
        await owner.close()


async def test_only_the_two_roles_and_the_owner_may_connect(roles: Roles) -> None:
    owner = await asyncpg.connect(plain(roles.owner))
    try:
        rows = await owner.fetch(
            "SELECT r.rolname FROM pg_roles r WHERE has_database_privilege("
            " r.oid, current_database(), 'CONNECT') AND NOT r.rolsuper"
        )
    finally:
        await owner.close()
    assert {row["rolname"] for row in rows} == {"arbiter_owner", "arbiter_worker", "arbiter_reader"}


def test_the_reader_runs_the_read_only_commands(roles: Roles) -> None:
    """``limits ls`` and ``runs show`` as arbiter_reader; ``limits set`` needs the worker role."""
    assert cli(roles.worker, "limits", "set", "warehouse", "3").returncode == 0
    listed = cli(roles.reader, "limits", "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {"tag": "warehouse", "limit": 3, "active_slots": [], "slot_expires": {}} in json.loads(
        listed.stdout
    )
    unknown = cli(roles.reader, "runs", "show", str(uuid.uuid4()))
    assert unknown.returncode == 1, unknown.stderr
    assert "no flow run or task run" in unknown.stderr
    refused = cli(roles.reader, "limits", "set", "warehouse", "4")
    assert refused.returncode != 0
    assert "permission denied" in refused.stderr
