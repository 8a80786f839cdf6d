#!/usr/bin/env bash
# Prepare a checkout: a virtual environment in .venv with Arbiter and its dev tools.
# Servers are not started here: devtools.devservices starts them on demand (local processes,
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

# The Node.js executor example (examples/node-executor) and its system test need its npm
# packages. Not fatal here: without them that test fails and says why.
NODE_EXECUTOR=examples/node-executor
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing Node.js and npm (Debian packages)" >&2
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; } >&2 \
            || echo "setup: apt-get could not install nodejs and npm" >&2
    fi
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "setup: node or npm is not installed, so $NODE_EXECUTOR has no packages;" \
        "tests/system/test_node_executor.py will fail (install nodejs and npm, then rerun)" >&2
elif cmp -s "$NODE_EXECUTOR/package-lock.json" "$NODE_EXECUTOR/node_modules/.arbiter-installed-lock"; then
    : # installed from this very lock file already
elif (cd "$NODE_EXECUTOR" && npm ci --prefer-offline --fetch-retries=1 --no-audit --no-fund --loglevel=error >&2); then
    cp "$NODE_EXECUTOR/package-lock.json" "$NODE_EXECUTOR/node_modules/.arbiter-installed-lock"
else
    echo "setup: npm ci failed in $NODE_EXECUTOR (offline?);" \
        "tests/system/test_node_executor.py will fail until it succeeds" >&2
fi
