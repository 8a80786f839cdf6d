"""Throw-away RabbitMQ and PostgreSQL containers (testcontainers), for ``devtools.devservices``
when a Docker engine answers."""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from devtools.devservices import _CREDENTIAL, _RMQ_WAIT_S, DevServicesError, _quietly

__all__ = ["POSTGRES_IMAGE", "RABBITMQ_IMAGE", "docker_available", "start_containers"]

RABBITMQ_IMAGE = "rabbitmq:3.13"  # 3.x like the Debian 3.10 package: no default delivery limit
POSTGRES_IMAGE = "postgres:15"


def docker_available(timeout: float = 5.0) -> bool:
    """Tell whether a Docker engine answers (fails in ~30 ms when only the client is installed)."""
    docker = shutil.which("docker")
    if docker is not None:
        try:
            result = subprocess.run(
                [docker, "info", "--format", "{{.ServerVersion}}"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return result.returncode == 0
    try:  # no CLI: ask the SDK that testcontainers itself uses
        docker_sdk: Any = importlib.import_module("docker")
        client = docker_sdk.from_env(timeout=int(timeout))
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def start_containers(
    stack: contextlib.ExitStack, *, rabbitmq: bool, postgres: bool, durable: bool
) -> dict[str, str]:
    """Start the containers concurrently; register their removal on ``stack``."""
    with warnings.catch_warnings():  # 4.15 deprecates this path; pytest turns warnings into errors
        warnings.simplefilter("ignore", DeprecationWarning)
        from testcontainers.core.container import DockerContainer
        from testcontainers.postgres import PostgresContainer

    urls: dict[str, str] = {}
    starts: list[Callable[[], None]] = []
    if rabbitmq:
        # A generic container, not testcontainers.rabbitmq.RabbitMqContainer: that one needs
        # pika (not a dependency here) and warns on import; we probe the AMQP port ourselves.
        rmq = (
            DockerContainer(RABBITMQ_IMAGE)
            .with_env("RABBITMQ_DEFAULT_USER", _CREDENTIAL)
            .with_env("RABBITMQ_DEFAULT_PASS", _CREDENTIAL)
            .with_exposed_ports(5672)
        )
        stack.callback(_quietly, rmq.stop)  # stop() is a no-op for a container never created

        def start_rabbitmq() -> None:
            rmq.start()
            host, port = rmq.get_container_host_ip(), rmq.get_exposed_port(5672)
            _wait_for_amqp(host, port, float(os.environ.get("RMQ_WAIT") or _RMQ_WAIT_S))
            urls["amqp"] = f"amqp://{_CREDENTIAL}:{_CREDENTIAL}@{host}:{port}/"
            urls["rabbitmqctl"] = f"docker exec -i {rmq.get_wrapped_container().id} rabbitmqctl"

        starts.append(start_rabbitmq)
    if postgres:
        settings = ["max_connections=200"]
        if not durable:
            settings += ["fsync=off", "synchronous_commit=off", "full_page_writes=off"]
        pg = PostgresContainer(
            POSTGRES_IMAGE,
            username=_CREDENTIAL,
            password=_CREDENTIAL,
            dbname=_CREDENTIAL,
            driver="asyncpg",
        ).with_command(["postgres", *(arg for s in settings for arg in ("-c", s))])
        stack.callback(_quietly, pg.stop)

        def start_postgres() -> None:
            pg.start()
            urls["database"] = pg.get_connection_url()

        starts.append(start_postgres)
    with ThreadPoolExecutor(max_workers=2) as pool:
        for future in [pool.submit(start) for start in starts]:
            future.result()
    return urls


def _wait_for_amqp(host: str, port: int, timeout: float) -> None:
    """Wait until the broker answers the AMQP protocol header (docker-proxy accepts earlier)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host, port), 2) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            if sock.recv(1):
                return
        if time.monotonic() > deadline:
            raise DevServicesError(f"RabbitMQ on {host}:{port} not ready after {timeout:.0f} s")
        time.sleep(0.1)
