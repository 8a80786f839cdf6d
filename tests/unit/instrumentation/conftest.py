"""The flow run most instrumentation scenarios move, in the scenario's store."""

from __future__ import annotations

import pytest

from arbiter.rules.memory import InMemoryStore
from arbiter.schemas.runs import FlowRun
from tests.factories import create_flow_run


@pytest.fixture
async def flow_run(store: InMemoryStore) -> FlowRun:
    return await create_flow_run(store)
