"""deploy/'s RabbitMQ definitions and PostgreSQL roles, applied to the session's servers.

Each test that needs the broker's rights gets the definitions loaded into a vhost of its own
(``rabbitmqctl import_definitions``, the file with only its vhost renamed), so tests never
share a queue. The PostgreSQL roles are cluster-wide: one database per module gets
deploy/postgres/roles.sql (run twice: it must be idempotent) and the owner's migration.
"""

from __future__ import annotations

import asyncio
import copy
import json
import secrets
import shlex
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import asyncpg
import pytest

from arbiter.worker.db.migrate import upgrade
from devtools.devservices import Services

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
DEFINITIONS = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
ROLES_SQL = (DEPLOY / "postgres" / "roles.sql").read_text()
# The development passwords definitions.json holds the hashes of (README).
PASSWORDS = {user["name"]: f"{user['name']}-dev" for user in DEFINITIONS["users"]}


def with_credentials(url: str, user: str, password: str, *, vhost: str | None = None) -> str:
    """``url`` for another user (and vhost, for AMQP) on the same server."""
    parts = urlsplit(url)
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.hostname}:{parts.port}"
    path = "/" + quote(vhost, safe="") if vhost is not None else parts.path
    return urlunsplit(parts._replace(netloc=netloc, path=path))


def in_vhost(definitions: dict[str, Any], vhost: str) -> dict[str, Any]:
    """The definitions with every vhost reference renamed: nothing else changes."""
    renamed = copy.deepcopy(definitions)
    renamed["vhosts"] = [{"name": vhost}]
    for section in renamed.values():
        if isinstance(section, list):
            for item in section:
                if isinstance(item, dict) and "vhost" in item:
                    item["vhost"] = vhost
    return renamed


@dataclass(frozen=True)
class Broker:
    """A vhost holding deploy/rabbitmq/definitions.json; ``url(user)`` logs in as ``user``."""

    amqp_url: str
    vhost: str
    rabbitmqctl: list[str]

    def url(self, user: str) -> str:
        return with_credentials(self.amqp_url, user, PASSWORDS[user], vhost=self.vhost)

    def ctl(self, *args: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            [*self.rabbitmqctl, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {done.stderr}"
        return done.stdout

    def load_definitions(self) -> None:
        """Import the file into this vhost (the import finishes asynchronously)."""
        self.ctl("import_definitions", stdin=json.dumps(in_vhost(DEFINITIONS, self.vhost)))


async def wait_for_topology(broker: Broker, timeout_s: float = 60.0) -> None:
    """Until the admin can log in to the vhost and see the proposals queue."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            connection = await aio_pika.connect(broker.url("arbiter-admin"))
            async with connection:
                channel = await connection.channel()
                await channel.declare_queue("arbiter.proposals", passive=True)
                return
        except Exception:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


@pytest.fixture
async def broker(services: Services) -> AsyncIterator[Broker]:
    """A fresh vhost with the definitions loaded; deleted afterwards."""
    if services.rabbitmqctl is None:
        pytest.skip(
            "RabbitMQ named by ARBITER_TEST_AMQP_URL: no rabbitmqctl to load the definitions"
        )
    loaded = Broker(
        services.amqp_url, f"arbiter-{uuid.uuid4().hex[:10]}", shlex.split(services.rabbitmqctl)
    )
    await asyncio.to_thread(loaded.load_definitions)
    await wait_for_topology(loaded)
    try:
        yield loaded
    finally:
        await asyncio.to_thread(loaded.ctl, "delete_vhost", loaded.vhost)


@dataclass(frozen=True)
class Roles:
    """A database set up by roles.sql and migrated by its owner; a URL per role."""

    owner: str
    worker: str
    reader: str


def plain(url: str) -> str:
    """A URL asyncpg itself takes (no SQLAlchemy driver suffix)."""
    return "postgresql://" + url.partition("://")[2]


@pytest.fixture(scope="module")
def roles(services: Services) -> Iterator[Roles]:
    """roles.sql (twice) on a new database, random passwords, then `migrate` as the owner."""
    name = f"arbiter_roles_{uuid.uuid4().hex[:10]}"
    database = urlunsplit(urlsplit(services.database_url)._replace(path=f"/{name}"))

    async def set_up() -> dict[str, str]:
        admin = await asyncpg.connect(plain(services.database_url))
        try:
            if not await admin.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = user"):
                pytest.skip(
                    "ARBITER_TEST_DATABASE_URL's role is no superuser: it cannot run roles.sql"
                )
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        conn = await asyncpg.connect(plain(database))
        try:
            await conn.execute(ROLES_SQL)
            await conn.execute(ROLES_SQL)
            passwords = {role: secrets.token_urlsafe(16) for role in ("owner", "worker", "reader")}
            for role, password in passwords.items():
                await conn.execute(f"ALTER ROLE arbiter_{role} PASSWORD '{password}'")
        finally:
            await conn.close()
        return passwords

    async def tear_down() -> None:
        admin = await asyncpg.connect(plain(services.database_url))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    passwords = asyncio.run(set_up())
    urls = {
        role: with_credentials(database, f"arbiter_{role}", pw) for role, pw in passwords.items()
    }
    try:
        upgrade(urls["owner"])
        yield Roles(**urls)
    finally:
        asyncio.run(tear_down())
