#!/usr/bin/env bash
# Set everything up and run the whole suite: lint, types, the import contract, and pytest
# (unit, then integration and system tests on real RabbitMQ and PostgreSQL).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

echo "== ruff" && ruff check . && ruff format --check .
echo "== mypy --strict" && mypy
echo "== import contract (rules/ and schemas/ do no I/O)" && lint-imports
echo "== pytest" && python -m pytest "$@"
