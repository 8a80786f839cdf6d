"""A local pool of ``arbiter worker`` processes, for the demo, benchmarks and system tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from arbiter.worker.settings import Settings

# How long ``stop`` lets a worker that is still starting reach its consumer.
STARTING_GRACE_S = 10.0


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process read exactly these settings."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        key = f"ARBITER_{name.upper()}"
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


class WorkerPool:
    """Starts, kills and gracefully stops worker processes; logs go to ``log_dir``."""

    def __init__(
        self, settings: Settings, log_dir: Path, *, concurrency: int | None = None
    ) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.concurrency = concurrency
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int | None] = []  # each worker's metrics port, if it serves one

    def start(self) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "arbiter", "worker"]
        if self.concurrency is not None:
            command += ["--concurrency", str(self.concurrency)]
        env = settings_env(self.settings)
        port = self.metrics_port(len(self.procs))
        if port is not None:
            env["ARBITER_METRICS_PORT"] = str(port)
        self.ports.append(port)
        with open(self.log_dir / f"worker-{len(self.procs)}.log", "wb") as log:
            proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def _until_started(self, index: int, proc: subprocess.Popen[bytes]) -> None:
        log = self.log_dir / f"worker-{index}.log"
        deadline = time.monotonic() + STARTING_GRACE_S
        while proc.poll() is None and time.monotonic() < deadline:
            if b"consuming " in log.read_bytes():
                return
            time.sleep(0.05)

    def metrics_port(self, index: int) -> int | None:
        """Worker ``index`` serves metrics on ``ARBITER_METRICS_PORT`` + ``index``; with 0,
        on a port free now (so the caller knows where to scrape)."""
        base = self.settings.metrics_port
        if base is None:
            return None
        if base == 0:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                return int(probe.getsockname()[1])
        return base + index

    def stop(self, timeout_s: float = 30) -> list[int]:
        """SIGTERM every live worker and collect exit codes (killing stragglers).

        A worker still importing its modules (about a second here) has no SIGTERM handler
        yet and would die of the signal: each is given until it consumes (at most
        ``STARTING_GRACE_S``), so that a pool stopped right after it started still drains.
        """
        for index, proc in enumerate(self.procs):
            self._until_started(index, proc)
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=timeout_s))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        return codes

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
