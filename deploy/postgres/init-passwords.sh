#!/usr/bin/env bash
# Set the passwords of Arbiter's roles (deploy/postgres/roles.sql) from the environment.
# The postgres image runs it once, after roles.sql, when it initialises an empty data
# directory (both are mounted into /docker-entrypoint-initdb.d by deploy/compose.yaml).
# By hand: ARBITER_PG_OWNER_PASSWORD=... ARBITER_PG_WORKER_PASSWORD=... \
#     ARBITER_PG_READER_PASSWORD=... deploy/postgres/init-passwords.sh  (psql's PG* variables apply)
set -euo pipefail
: "${ARBITER_PG_OWNER_PASSWORD:?set ARBITER_PG_OWNER_PASSWORD}"
: "${ARBITER_PG_WORKER_PASSWORD:?set ARBITER_PG_WORKER_PASSWORD}"
: "${ARBITER_PG_READER_PASSWORD:?set ARBITER_PG_READER_PASSWORD}"
# psql quotes the :'variables' itself, so a password may hold any character.
psql -X -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-${PGUSER:-postgres}}" \
    --dbname "${POSTGRES_DB:-${PGDATABASE:-postgres}}" \
    -v owner="$ARBITER_PG_OWNER_PASSWORD" \
    -v worker="$ARBITER_PG_WORKER_PASSWORD" \
    -v reader="$ARBITER_PG_READER_PASSWORD" <<'SQL'
ALTER ROLE arbiter_owner PASSWORD :'owner';
ALTER ROLE arbiter_worker PASSWORD :'worker';
ALTER ROLE arbiter_reader PASSWORD :'reader';
SQL
