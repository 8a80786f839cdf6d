"""System-tier fixtures: real `arbiter worker` processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from arbiter.worker.settings import Settings
from devtools.pool import WorkerPool


@pytest.fixture
def worker_processes(settings: Settings, tmp_path: Path) -> Iterator[WorkerPool]:
    """Worker processes on this test's isolated settings, stopped at the end."""
    with WorkerPool(settings, tmp_path, concurrency=8) as pool:
        yield pool
