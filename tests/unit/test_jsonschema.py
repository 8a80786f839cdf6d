"""The committed JSON Schema files are exactly what the pydantic models generate."""

from __future__ import annotations

import pytest

from arbiter.schemas.export import DOCUMENTS, SCHEMA_DIR, render


@pytest.mark.parametrize("filename", sorted(DOCUMENTS))
def test_committed_schema_matches_the_model(filename: str) -> None:
    """Regenerate with `python -m arbiter.schemas.export` when this fails."""
    committed = (SCHEMA_DIR / filename).read_text(encoding="utf-8")
    assert committed == render(DOCUMENTS[filename])
