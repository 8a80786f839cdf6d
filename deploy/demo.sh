#!/usr/bin/env bash
# Set everything up and run the main job: private RabbitMQ and PostgreSQL, migrations, two
# workers, and a demo executor driving a few hundred flow and task runs; a summary at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh
exec .venv/bin/python deploy/demo.py "$@"
