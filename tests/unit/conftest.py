"""Unit-tier fixtures: rules run against the in-memory store, and the same scenarios again
against PostgreSQL through the real store (marked ``integration``).

The PostgreSQL variant runs each test inside a transaction that is rolled back, so
scenarios never see each other's rows. In every module under the packages of
``_PACKAGES_ON_BOTH_STORES`` (``tests/unit/core/``, ``tests/unit/instrumentation/``) and in
the files of ``_ALSO_ON_BOTH_STORES``, every test that takes ``store`` runs on both, so it
arranges and inspects the store only through the ``rules.store`` protocols (helpers in
``tests/unit/core/helpers.py``), never through ``InMemoryStore``'s fields.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.rules.memory import InMemoryStore
from arbiter.rules.store import AdminStore

# The rule scenarios of Prefect's core, global and instrumentation suites run on both stores:
# every module under these packages (core/ has one per rule family, so new ones join
# without being listed), and these files. A listed package or file that is renamed or
# removed fails collection instead of silently dropping its PostgreSQL variants.
_UNIT = Path(__file__).resolve().parent
_PACKAGES_ON_BOTH_STORES = {_UNIT / name for name in ("core", "instrumentation")}
_ALSO_ON_BOTH_STORES = {_UNIT / name for name in ("test_global_policy.py",)}
_missing = sorted(
    [path.name for path in _PACKAGES_ON_BOTH_STORES if not path.is_dir()]
    + [path.name for path in _ALSO_ON_BOTH_STORES if not path.is_file()]
)
if _missing:
    raise pytest.UsageError(f"tests/unit/conftest.py lists missing paths: {_missing}")


def _on_both_stores(module: Path) -> bool:
    module = module.resolve()
    return module in _ALSO_ON_BOTH_STORES or any(
        module.is_relative_to(directory) for directory in _PACKAGES_ON_BOTH_STORES
    )


_ENGINES: dict[str, AsyncEngine] = {}


def _engine(database_url: str) -> AsyncEngine:
    # One engine for the session (its loop is the session's); a sync fixture cannot be
    # requested lazily from this async one, so it is cached here instead.
    from arbiter.worker.db.engine import create_engine

    if database_url not in _ENGINES:
        _ENGINES[database_url] = create_engine(database_url, pool_size=2)
    return _ENGINES[database_url]


@pytest.fixture
def memory_store() -> InMemoryStore:
    return InMemoryStore()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store" not in metafunc.fixturenames:
        return
    backends: list[object] = ["memory"]
    if _on_both_stores(metafunc.definition.path):
        backends.append(pytest.param("postgres", marks=pytest.mark.integration))
    metafunc.parametrize("store", backends, indirect=True)


@pytest.fixture
async def store(request: pytest.FixtureRequest) -> AsyncIterator[AdminStore]:
    """A fresh store per test: in memory, or a rolled-back PostgreSQL transaction."""
    if request.param == "memory":
        yield InMemoryStore()
        return
    from arbiter.worker.db.store import PgStore
    from tests.fixtures.batch_store import BatchAdminStore

    engine = _engine(request.getfixturevalue("database_url"))
    async with engine.connect() as connection:
        transaction = await connection.begin()
        try:
            # As the worker runs the rules: on a batch's overlay, written at the end, so
            # every scenario also checks that the overlay answers as the tables would.
            yield BatchAdminStore(PgStore(connection))
        finally:
            await transaction.rollback()
