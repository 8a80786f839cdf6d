#!/usr/bin/env bash
# Prepare a checkout: a virtual environment in .venv with Arbiter and its dev tools.
# Servers are not started here: worker.devservices starts them on demand (local processes,
# or testcontainers when a Docker engine answers) and installs RabbitMQ/PostgreSQL when root.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    echo "setup: Arbiter needs Python >= 3.11 ($PYTHON is $("$PYTHON" --version 2>&1))" >&2
    exit 1
fi
if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing python3-venv" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
    else
        echo "setup: the venv module is missing; install python3-venv" >&2
        exit 1
    fi
fi
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "$PYTHON" -m venv .venv
fi
echo "setup: installing Arbiter and its dev tools into .venv" >&2
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' >&2
