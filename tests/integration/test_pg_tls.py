"""PostgreSQL over TLS, libpq's way: ``sslmode``, ``sslrootcert``, ``sslcert`` and ``sslkey``
on the database URL, against a private server given a CA and certificates made here.

The server (deploy/start-postgres.sh, then ``ssl = on`` and a ``hostssl ... cert`` line for
one role) is this module's own, so no other test talks TLS by surprise.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import sqlalchemy as sa

from arbiter.worker.db.engine import connect_options, create_engine
from arbiter.worker.db.migrate import upgrade
from tests.fixtures.certs import make_certificates

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CERT_USER = "arbiter_cert"  # may log in only over TLS with a client certificate


@dataclass(frozen=True)
class TlsServer:
    url: str  # postgresql://arbiter:arbiter@127.0.0.1:port/arbiter, no TLS options
    certs: Path

    def with_options(self, host: str = "127.0.0.1", user: str = "", **options: str) -> str:
        parts = urlsplit(self.url)
        netloc = parts.netloc.replace("127.0.0.1", host)
        if user:
            netloc = f"{user}@{netloc.split('@', 1)[1]}"
        query = "&".join(f"{name}={value}" for name, value in options.items())
        return urlunsplit(parts._replace(netloc=netloc, query=query))


@pytest.fixture(scope="module")
def tls_server() -> Iterator[TlsServer]:
    started = subprocess.run(
        ["bash", str(ROOT / "deploy" / "start-postgres.sh")],
        capture_output=True, text=True, check=True, timeout=180,
        env={**os.environ, "PG_PORT": ""},
    )  # fmt: skip
    exports = dict(
        part.split("=", 1)
        for line in started.stdout.splitlines()
        for part in shlex.split(line.removeprefix("export "))
    )
    try:
        data = Path(exports["PG_DIR"]) / "data"
        # Inside the cluster's own directory: the server's user can reach it (pytest's
        # temporary directories are private to the user running the tests).
        certs = Path(exports["PG_DIR"]) / "certs"
        certs.mkdir()
        make_certificates(certs, client=CERT_USER)
        # The server reads its key as the user it runs as, with nobody else able to.
        owner = data.stat()
        for file in ("server.key", "server.pem", "ca.pem"):
            os.chown(certs / file, owner.st_uid, owner.st_gid)
        certs.chmod(0o755)
        hba = data / "pg_hba.conf"
        hba.write_text(f"hostssl all {CERT_USER} 127.0.0.1/32 cert\n" + hba.read_text())
        psql = shlex.split(exports["PG_PSQL"])
        statements = [
            f"ALTER SYSTEM SET ssl_cert_file = '{certs / 'server.pem'}'",
            f"ALTER SYSTEM SET ssl_key_file = '{certs / 'server.key'}'",
            f"ALTER SYSTEM SET ssl_ca_file = '{certs / 'ca.pem'}'",
            "ALTER SYSTEM SET ssl = on",
            "SELECT pg_reload_conf()",
            f"CREATE ROLE {CERT_USER} LOGIN SUPERUSER",
        ]
        for statement in statements:
            subprocess.run([*psql, "-d", "postgres", "-Xqc", statement], check=True, timeout=30)
        yield TlsServer(url=exports["DATABASE_URL"], certs=certs)
    finally:
        subprocess.run(["bash", "-c", exports["PG_STOP"]], check=False, timeout=60)


async def session_uses_tls(url: str) -> bool:
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as conn:
            found = await conn.scalar(
                sa.text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            )
            return bool(found)
    finally:
        await engine.dispose()


async def test_verify_full_with_the_servers_ca_talks_tls(tls_server: TlsServer) -> None:
    ca = tls_server.certs / "ca.pem"
    assert await session_uses_tls(
        tls_server.with_options(sslmode="verify-full", sslrootcert=str(ca))
    )


async def test_a_server_certificate_from_another_ca_is_refused(tls_server: TlsServer) -> None:
    other = tls_server.certs / "other-ca.pem"
    url = tls_server.with_options(sslmode="verify-full", sslrootcert=str(other))
    with pytest.raises(Exception, match="certificate verify failed"):
        await session_uses_tls(url)


async def test_verify_full_checks_the_host_name_and_verify_ca_does_not(
    tls_server: TlsServer,
) -> None:
    """The certificate names 127.0.0.1 only: through "localhost" only verify-ca passes."""
    ca = str(tls_server.certs / "ca.pem")
    with pytest.raises(Exception, match=r"(?i)hostname|match"):
        await session_uses_tls(
            tls_server.with_options("localhost", sslmode="verify-full", sslrootcert=ca)
        )
    assert await session_uses_tls(
        tls_server.with_options("localhost", sslmode="verify-ca", sslrootcert=ca)
    )


async def test_a_client_certificate_logs_in_a_role_that_has_no_password(
    tls_server: TlsServer,
) -> None:
    certs = tls_server.certs
    with_cert = tls_server.with_options(
        user=CERT_USER,
        sslmode="verify-full",
        sslrootcert=str(certs / "ca.pem"),
        sslcert=str(certs / "client.pem"),
        sslkey=str(certs / "client.key"),
    )
    assert await session_uses_tls(with_cert)
    without = tls_server.with_options(
        user=CERT_USER, sslmode="verify-full", sslrootcert=str(certs / "ca.pem")
    )
    with pytest.raises(Exception, match=r"(?i)certificate|authentication"):
        await session_uses_tls(without)


def test_migrate_and_the_command_line_use_the_same_options(tls_server: TlsServer) -> None:
    url = tls_server.with_options(
        sslmode="verify-full", sslrootcert=str(tls_server.certs / "ca.pem")
    )
    upgrade(url)
    done = subprocess.run(
        [sys.executable, "-m", "arbiter", "limits", "ls", "--json"],
        env={**os.environ, "ARBITER_DATABASE_URL": url},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_an_unreadable_key_or_ca_is_a_clear_error_that_shows_no_key(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pem"
    with pytest.raises(ValueError, match="sslrootcert"):
        connect_options(f"postgresql://u:p@h/d?sslmode=verify-full&sslrootcert={missing}")
    key = tmp_path / "client.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nnot-a-key-SECRET\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="sslcert/sslkey") as caught:
        connect_options(f"postgresql://u:p@h/d?sslmode=require&sslcert={key}&sslkey={key}")
    assert "SECRET" not in str(caught.value)


def test_plain_modes_pass_through_and_no_options_mean_none() -> None:
    assert connect_options("postgresql://u:p@h/d")[1] == {}
    url, options = connect_options("postgresql://u:p@h/d?sslmode=require&application_name=x")
    assert options == {"ssl": "require"}
    assert dict(url.query) == {"application_name": "x"}
