"""Real RabbitMQ and PostgreSQL servers for the integration tests, the demo and the benchmarks.

Each server comes from the first source that works:

1. a URL in an environment variable (CI services, or servers you already run);
2. throw-away Docker containers via testcontainers, when a Docker engine answers;
3. private local processes started by ``deploy/start-rabbitmq.sh`` and
   ``deploy/start-postgres.sh`` (no Docker or systemd needed; as root they even apt-get install
   the servers). ``ARBITER_DEVSERVICES=docker|local`` forces one of the last two; the Docker
   path lives in ``devtools.devcontainers``.

    with provide_services() as services:
        ...  # services.amqp_url, services.database_url

For working by hand, ``eval "$(python -m devtools.devservices up)"`` starts both locally, leaves
them running and exports ``ARBITER_AMQP_URL``, ``ARBITER_DATABASE_URL`` and
``ARBITER_DEVSERVICES_STOP`` (``eval "$ARBITER_DEVSERVICES_STOP"`` stops them again).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = ["DevServicesError", "Services", "docker_available", "main", "provide_services"]

_log = logging.getLogger(__name__)

DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy"
_CREDENTIAL = "arbiter"  # user, password and database name of every server started here
_RMQ_WAIT_S = "90"  # boot timeout handed to start-rabbitmq.sh unless RMQ_WAIT is set
_RMQ_ATTEMPTS = 2  # a slow or starved first boot gets one more try
_INSTALL_MARGIN_S = 600.0  # on top of the boot timeout: the script may apt-get install first
_STOP_TIMEOUT_S = 60.0


class DevServicesError(RuntimeError):
    """A server could not be provided; the message carries the reason (and the script's log)."""


@dataclass(frozen=True)
class Services:
    """Where the servers listen. ``database_url`` is in SQLAlchemy asyncpg form.
    ``rabbitmqctl`` runs that tool against a node started here (a shell command prefix);
    None for a server named by URL."""

    amqp_url: str
    database_url: str
    rabbitmqctl: str | None = None


@contextlib.contextmanager
def provide_services(
    *,
    durable: bool = False,
    amqp_env: str = "ARBITER_TEST_AMQP_URL",
    database_env: str = "ARBITER_TEST_DATABASE_URL",
) -> Iterator[Services]:
    """Yield RabbitMQ + PostgreSQL URLs; whatever was started here is stopped on exit.

    ``durable=True`` keeps PostgreSQL crash-safe (fsync on) so benchmark numbers mean something;
    the default trades that for speed. Servers named by ``amqp_env``/``database_env`` are used
    as they are and never stopped.
    """
    amqp_url = os.environ.get(amqp_env) or None
    database_url = os.environ.get(database_env) or None
    rabbitmqctl = None
    with contextlib.ExitStack() as stack:
        if amqp_url is None or database_url is None:
            started = time.monotonic()
            backend = _backend()
            if backend == "docker":
                from devtools.devcontainers import start_containers as start
            else:
                start = _start_local
            urls = start(
                stack, rabbitmq=amqp_url is None, postgres=database_url is None, durable=durable
            )
            _log.info("%s servers ready in %.1f s", backend, time.monotonic() - started)
            amqp_url = amqp_url or urls["amqp"]
            database_url = database_url or urls["database"]
            rabbitmqctl = urls.get("rabbitmqctl")
        yield Services(
            amqp_url=amqp_url, database_url=_asyncpg_url(database_url), rabbitmqctl=rabbitmqctl
        )


def docker_available(timeout: float = 5.0) -> bool:
    """Tell whether a Docker engine answers (``devtools.devcontainers`` holds the Docker path)."""
    from devtools.devcontainers import docker_available as answers

    return answers(timeout)


def _backend() -> str:
    """Pick Docker when it answers, else local processes; ARBITER_DEVSERVICES overrides."""
    forced = os.environ.get("ARBITER_DEVSERVICES", "").strip().lower()
    if forced in ("docker", "local"):
        return forced
    if forced:
        raise DevServicesError(f"ARBITER_DEVSERVICES must be docker or local, not {forced!r}")
    return "docker" if docker_available() else "local"


def _asyncpg_url(url: str) -> str:
    """Turn any postgres URL (libpq or SQLAlchemy form) into the asyncpg form the worker uses."""
    scheme, sep, rest = url.partition("://")
    if sep and (scheme in ("postgres", "postgresql") or scheme.startswith("postgresql+")):
        return f"postgresql+asyncpg://{rest}"
    raise DevServicesError(f"not a PostgreSQL URL: {url!r}")


# --- local processes (deploy/start-*.sh) ------------------------------------------------------


@dataclass(frozen=True)
class _Script:
    """A start script and the names of the variables it exports."""

    name: str
    url_var: str
    stop_var: str


_RABBITMQ = _Script("start-rabbitmq.sh", "RABBITMQ_URL", "RABBITMQ_STOP")
_POSTGRES = _Script("start-postgres.sh", "DATABASE_URL", "PG_STOP")


@dataclass
class _Launch:
    """One running start script; its output goes to files so neither can block on a full pipe.

    A successful launch puts its server's stop command on ``stops`` (the caller's cleanup list),
    also when it finished while we were still waiting for the other one and got interrupted.
    """

    script: _Script
    env: dict[str, str]
    stops: list[str]
    proc: subprocess.Popen[bytes]
    stdout: IO[bytes]
    stderr: IO[bytes]
    exports: dict[str, str] = field(default_factory=dict)  # what the script printed, once done

    @classmethod
    def start(cls, script: _Script, env: Mapping[str, str], stops: list[str]) -> _Launch:
        path = DEPLOY_DIR / script.name
        if not path.is_file():
            raise DevServicesError(f"{path} is missing (it ships with the source tree only)")
        # The files live as long as the launch; _collect()/abort() close them.
        stdout = tempfile.TemporaryFile()  # noqa: SIM115
        stderr = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                ["bash", str(path)],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env={**os.environ, **env},
                start_new_session=True,  # Ctrl-C in a terminal reaches us only; we clean up
            )
        except BaseException:
            stdout.close()
            stderr.close()
            raise
        return cls(script, dict(env), stops, proc, stdout, stderr)

    def result(self, timeout: float) -> str:
        """Wait for the script and return the server's URL, or raise with its stderr's tail."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.abort()
            raise DevServicesError(
                f"{self.script.name} did not finish in {timeout:.0f} s"
            ) from None
        return self._collect()

    def abort(self) -> None:
        """Undo the launch: a running script's EXIT trap stops its half-started server (and
        removes its dir); a finished one has its stop command queued like any other."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)  # the server is in that group too
                self.proc.wait()
        with contextlib.suppress(DevServicesError):
            self._collect()

    def _collect(self) -> str:
        if self.stdout.closed:
            raise DevServicesError(f"{self.script.name}: output already collected")
        out, log = _read(self.stdout), _read(self.stderr)
        if self.proc.returncode != 0:
            tail = "\n".join(log.splitlines()[-60:])
            raise DevServicesError(
                f"{self.script.name} failed (exit {self.proc.returncode}):\n{tail}"
            )
        exports = self.exports = _parse_exports(out)
        self.stops.append(exports[self.script.stop_var])
        _log.debug("%s:\n%s", self.script.name, log)
        return exports[self.script.url_var]


def _read(file: IO[bytes]) -> str:
    with file:
        file.seek(0)
        return file.read().decode(errors="replace")


def _parse_exports(text: str) -> dict[str, str]:
    """Read the ``export NAME=value`` lines the start scripts print (shell-quoted values)."""
    exports: dict[str, str] = {}
    for line in text.splitlines():
        words = shlex.split(line)
        if len(words) >= 2 and words[0] == "export":
            for word in words[1:]:
                name, sep, value = word.partition("=")
                if sep:
                    exports[name] = value
    return exports


def _run_stop_commands(commands: list[str]) -> None:
    """Run the scripts' stop commands in parallel (RabbitMQ needs ~1 s, PostgreSQL ~0.2 s)."""
    procs = [
        subprocess.Popen(
            ["bash", "-c", command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for command in commands
    ]
    for command, proc in zip(commands, procs, strict=True):
        try:
            _, err = proc.communicate(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode != 0:
            _log.warning("%r failed (exit %s): %s", command, proc.returncode, err.decode())


def _start_local(
    stack: contextlib.ExitStack, *, rabbitmq: bool, postgres: bool, durable: bool
) -> dict[str, str]:
    """Run the start scripts concurrently; register their stop commands on ``stack``.

    Returns the ``amqp``/``database`` URLs, ``rabbitmqctl`` (a command prefix) and ``stop``,
    one shell command stopping both.
    """
    rmq_wait = os.environ.get("RMQ_WAIT") or _RMQ_WAIT_S
    timeout = float(rmq_wait) + _INSTALL_MARGIN_S
    plan: dict[str, tuple[_Script, dict[str, str], int]] = {}  # key -> script, env, attempts
    if rabbitmq:
        plan["amqp"] = (_RABBITMQ, {"RMQ_WAIT": rmq_wait}, _RMQ_ATTEMPTS)
    if postgres:
        plan["database"] = (_POSTGRES, {"PG_MODE": "durable" if durable else "test"}, 1)
    stops: list[str] = []
    stack.callback(_run_stop_commands, stops)  # filled as each server comes up
    launches: dict[str, _Launch] = {}
    urls: dict[str, str] = {}
    errors: list[str] = []
    try:
        for key, (script, env, _) in plan.items():
            launches[key] = _Launch.start(script, env, stops)
        for key, (script, env, attempts) in plan.items():
            for attempt in range(1, attempts + 1):
                try:
                    urls[key] = launches[key].result(timeout)
                    break
                except DevServicesError as exc:
                    if attempt == attempts:
                        errors.append(str(exc))
                    else:
                        _log.warning("%s\nretrying %s", exc, script.name)
                        launches[key] = _Launch.start(script, env, stops)
    except BaseException:
        for launch in launches.values():
            launch.abort()
        raise
    if errors:
        raise DevServicesError("\n\n".join(errors))
    if rabbitmq:
        urls["rabbitmqctl"] = shlex.join([launches["amqp"].exports["RABBITMQ_CTL"], "rabbitmqctl"])
    urls["stop"] = "; ".join(stops)
    return urls


def _quietly(stop: Callable[[], object]) -> None:
    """Run a cleanup step, logging instead of raising so the other steps still run."""
    try:
        stop()
    except Exception:
        _log.warning("cleanup step failed", exc_info=True)


# --- CLI ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``up [--durable]``: start both servers locally and leave them running."""
    parser = argparse.ArgumentParser(
        prog="python -m devtools.devservices",
        description='Start private RabbitMQ + PostgreSQL. Use: eval "$(%(prog)s up)"',
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start both as local processes and leave them running")
    up.add_argument("--durable", action="store_true", help="PostgreSQL with fsync on")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        try:
            urls = _start_local(stack, rabbitmq=True, postgres=True, durable=args.durable)
        except DevServicesError as exc:
            print(exc, file=sys.stderr)
            return 1
        stack.pop_all()  # success: keep the servers running after we exit
    for name, value in [
        ("ARBITER_AMQP_URL", urls["amqp"]),
        ("ARBITER_DATABASE_URL", _asyncpg_url(urls["database"])),
        ("ARBITER_DEVSERVICES_STOP", urls["stop"]),
    ]:
        print(f"export {name}={shlex.quote(value)}")
    print(
        f"# up in {time.monotonic() - started:.1f} s;"
        ' stop both with: eval "$ARBITER_DEVSERVICES_STOP"',
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
