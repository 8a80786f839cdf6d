"""No password shows in what the command line prints, at DEBUG, however it fails.

Each scenario gives a URL with a password no other string contains, makes the command
fail on it (refused credentials, a server that is not there), and greps everything the
process wrote to stdout and stderr.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from urllib.parse import urlsplit, urlunsplit

import pytest

from arbiter.worker.settings import Settings
from devtools.pool import settings_env

pytestmark = pytest.mark.integration


def with_password(url: str, password: str, *, port: int | None = None) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username}:{password}@{parts.hostname}:{port or parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def output_of(settings: Settings, *args: str, timeout: float = 60) -> str:
    """Everything the command printed; a command still running at ``timeout`` is stopped."""
    env = {**settings_env(settings), "ARBITER_LOG_LEVEL": "DEBUG"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "arbiter", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as expired:
        return _text(expired.stdout) + _text(expired.stderr)
    return done.stdout + done.stderr


def _text(value: str | bytes | None) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value or ""


@pytest.fixture
def password() -> str:
    return "pw-" + secrets.token_hex(12)


def test_a_refused_database_password_is_not_printed(settings: Settings, password: str) -> None:
    bad = settings.model_copy(
        update={"database_url": with_password(settings.database_url, password)}
    )
    printed = output_of(bad, "migrate")
    assert "password authentication failed" in printed or "error" in printed.lower()
    assert password not in printed


def test_an_unreachable_database_is_reported_without_its_password(
    settings: Settings, password: str
) -> None:
    url = with_password(settings.database_url, password, port=1)
    printed = output_of(settings.model_copy(update={"database_url": url}), "worker", timeout=30)
    assert "cannot reach PostgreSQL at ARBITER_DATABASE_URL=" in printed
    assert ":***@" in printed
    assert password not in printed


def test_a_refused_broker_password_is_not_printed(settings: Settings, password: str) -> None:
    bad = settings.model_copy(update={"amqp_url": with_password(settings.amqp_url, password)})
    printed = output_of(bad, "worker", timeout=30)
    assert "ACCESS_REFUSED" in printed
    assert "cannot reach RabbitMQ at ARBITER_AMQP_URL=" in printed
    assert password not in printed


def test_an_unreachable_broker_is_reported_without_its_password(
    settings: Settings, password: str
) -> None:
    url = with_password(settings.amqp_url, password, port=1)
    printed = output_of(settings.model_copy(update={"amqp_url": url}), "worker", timeout=30)
    assert "cannot reach RabbitMQ at ARBITER_AMQP_URL=" in printed
    assert password not in printed
