"""Writes the JSON Schema of the proposal and the outcome for executors in other languages.

Run ``python -m arbiter.schemas.export`` after changing a model; ``tests/unit/test_jsonschema.py``
fails while the committed files differ from what the models generate.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from arbiter.schemas.messages import Outcome, Proposal

SCHEMA_DIR = Path(__file__).parent / "jsonschema"
DOCUMENTS: dict[str, type[BaseModel]] = {
    "proposal.schema.json": Proposal,
    "outcome.schema.json": Outcome,
}


def render(model: type[BaseModel]) -> str:
    schema = model.model_json_schema(mode="validation" if model is Proposal else "serialization")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://arbiter.invalid/schemas/{model.__name__.lower()}.schema.json"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main() -> int:
    SCHEMA_DIR.mkdir(exist_ok=True)
    for filename, model in DOCUMENTS.items():
        (SCHEMA_DIR / filename).write_text(render(model), encoding="utf-8")
        print(f"wrote {SCHEMA_DIR / filename}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
