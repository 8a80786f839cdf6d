"""Unit-tier fixtures: rules run against the in-memory store."""

from __future__ import annotations

import pytest

from rules.memory import InMemoryStore


@pytest.fixture
def store() -> InMemoryStore:
    """A fresh in-memory store per test."""
    return InMemoryStore()
