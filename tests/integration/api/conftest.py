"""One worker and one client for the whole package: every test uses its own run ids."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from arbiter.worker.client import ArbiterClient
from arbiter.worker.settings import Settings
from devtools.devservices import Services
from tests.fixtures.services import isolated_settings, running_worker


@pytest.fixture(scope="package")
def settings(services: Services, database_url: str) -> Settings:
    return isolated_settings(services, database_url)


@pytest.fixture(scope="package")
async def worker(settings: Settings) -> AsyncIterator[asyncio.Event]:
    async with running_worker(settings) as stop:
        yield stop


@pytest.fixture(scope="package")
async def client(settings: Settings, worker: asyncio.Event) -> AsyncIterator[ArbiterClient]:
    async with ArbiterClient.connect(settings=settings) as connected:
        yield connected
