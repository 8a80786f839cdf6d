#!/usr/bin/env bash
# Start a private, throw-away PostgreSQL 15 cluster (no systemd, no Docker) for tests, demos and
# benchmarks.
#
#   eval "$(deploy/start-postgres.sh)"   # -> DATABASE_URL, PG_DIR, PG_STOP, ...
#   ...
#   eval "$PG_STOP"                      # pg_ctl stop -m fast + rm -rf of the temp dir
#
# initdb into a fresh temp dir, listen on 127.0.0.1 only, create one login role + database. The
# role is a superuser, like the postgres image's POSTGRES_USER: the tests of deploy/postgres/roles.sql
# create roles and databases with it.
# Stdout carries only `export ...` lines (safe to eval); all logging goes to stderr.
#
# Knobs: PG_PORT (default 5544; if unset and busy, the next free port is used),
#   PG_MODE=test (default: fsync/synchronous_commit/full_page_writes off - fast, not crash-safe)
#   or durable (server defaults, fsync on - use for benchmarks), PG_USER/PG_PASS/PG_DB (default
#   arbiter/arbiter/arbiter), PG_RUN_AS (default postgres when root, else the current user),
#   PG_SHARED_BUFFERS (default 256MB), PG_BIN (default /usr/lib/postgresql/15/bin), TMPDIR.
set -euo pipefail

exec 3>&1 1>&2 # fd 3 = the caller's stdout (export lines only); everything else goes to stderr

log() { printf '[start-postgres] %s\n' "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
PG_MODE=${PG_MODE:-test}
PG_USER=${PG_USER:-arbiter}
PG_PASS=${PG_PASS:-arbiter}
PG_DB=${PG_DB:-arbiter}
PG_SHARED_BUFFERS=${PG_SHARED_BUFFERS:-256MB}
TMP_BASE=${TMPDIR:-/tmp}
HOST=127.0.0.1
case $PG_MODE in test | durable) ;; *) die "PG_MODE must be test or durable, not '$PG_MODE'" ;; esac

# --- install on demand (root only) -------------------------------------------------------------
if [ ! -x "$PG_BIN/postgres" ]; then
    [ "$(id -u)" = 0 ] || die "no $PG_BIN/postgres; install postgresql-15 or set PG_BIN"
    command -v apt-get >/dev/null || die "no $PG_BIN/postgres and no apt-get to install it"
    log "PostgreSQL 15 is missing: installing postgresql-15 with apt-get"
    if [ ! -e /usr/sbin/policy-rc.d ]; then # keep the package from starting a system cluster
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
    fi
    (
        flock 8 # start-rabbitmq.sh may be installing concurrently
        if [ ! -x "$PG_BIN/postgres" ]; then
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -q
            apt-get install -y -q -o DPkg::Lock::Timeout=300 postgresql-15
        fi
    ) 8>"$TMP_BASE/.arbiter-apt.lock" || die "apt-get install postgresql-15 failed"
    [ -x "$PG_BIN/postgres" ] || die "postgresql-15 installed, but $PG_BIN/postgres is missing"
fi

# --- server user: postgres refuses to run as root ----------------------------------------------
if [ "$(id -u)" = 0 ]; then
    PG_RUN_AS=${PG_RUN_AS:-postgres}
    if ! id -u "$PG_RUN_AS" >/dev/null 2>&1; then
        log "creating system user $PG_RUN_AS"
        useradd --system --user-group --no-create-home --shell /usr/sbin/nologin "$PG_RUN_AS"
    fi
else
    PG_RUN_AS=$(id -un)
fi
as_pg() {
    if [ "$(id -un)" = "$PG_RUN_AS" ]; then "$@"; else runuser -u "$PG_RUN_AS" -- "$@"; fi
}

# --- helpers -----------------------------------------------------------------------------------
listening() { (exec 5<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# Shell-quote a value (left bare when that is already safe, for readable output).
squote() {
    if [[ $1 =~ ^[A-Za-z0-9_./:@%+=,-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}
emit() { printf 'export %s=%s\n' "$1" "$(squote "$2")" >&3; }

urlencode() {
    local LC_ALL=C s=$1 out='' c i
    for ((i = 0; i < ${#s}; i++)); do
        c=${s:i:1}
        case $c in
            [A-Za-z0-9._~-]) out+=$c ;;
            *) printf -v c '%%%02X' "'$c" && out+=$c ;;
        esac
    done
    printf '%s' "$out"
}

# --- pick a port -------------------------------------------------------------------------------
# A per-port flock (held until this script exits, i.e. until the server listens) keeps
# concurrent starts from picking the same port while initdb is still running.
try_port() {
    local lock="$TMP_BASE/.arbiter-pg-$1.lock"
    [ -e "$lock" ] || (umask 0 && : >>"$lock") 2>/dev/null || true
    { exec 9<"$lock"; } 2>/dev/null || return 1
    if ! flock -n 9; then
        log "port $1 is being claimed by another starting cluster"
    elif listening "$1"; then
        log "port $1 is busy"
    else
        return 0
    fi
    exec 9<&-
    return 1
}

if [ -n "${PG_PORT:-}" ]; then
    try_port "$PG_PORT" || die "PG_PORT=$PG_PORT is not free"
    PORT=$PG_PORT
else
    PORT=
    for p in $(seq 5544 5643); do
        if try_port "$p"; then
            PORT=$p
            break
        fi
    done
    [ -n "$PORT" ] || die "no free port in 5544-5643"
fi

# --- temp dir, initdb, config ------------------------------------------------------------------
t0=$EPOCHREALTIME
DIR=$(mktemp -d "$TMP_BASE/pg-$PORT.XXXXXX")
mkdir -p "$DIR/sock" "$DIR/log"
chmod 755 "$DIR" "$DIR/sock" # clients (root's psql too) connect over $DIR/sock
chown -R "$PG_RUN_AS" "$DIR"
cd "$DIR" # initdb/psql run as $PG_RUN_AS, which may not be able to read the caller's cwd
ok=0
cleanup() {
    [ "$ok" = 1 ] && return
    log "startup failed; tail of $DIR/log/postgres.log:"
    tail -n 30 "$DIR/log/postgres.log" >&2 2>/dev/null || true
    "$DIR/stop.sh" --rm >&2 || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cat >"$DIR/stop.sh" <<EOF
#!/usr/bin/env bash
# Stop the private PostgreSQL cluster on port $PORT (fast shutdown); --rm deletes the dir.
{
DIR=$(squote "$DIR")
if [ -f "\$DIR/data/postmaster.pid" ]; then
    if [ "\$(id -un)" = $(squote "$PG_RUN_AS") ]; then
        $(squote "$PG_BIN/pg_ctl") -D "\$DIR/data" -m fast -w -t 60 -s stop >&2
    else
        runuser -u $(squote "$PG_RUN_AS") -- $(squote "$PG_BIN/pg_ctl") -D "\$DIR/data" -m fast -w -t 60 -s stop >&2
    fi
fi
if [ "\${1:-}" = --rm ]; then rm -rf "\$DIR"; fi
exit 0
}
EOF
chmod 755 "$DIR/stop.sh"

log "initdb in $DIR (port $PORT, PG_MODE=$PG_MODE)"
as_pg "$PG_BIN/initdb" -D "$DIR/data" -U postgres -E UTF8 --locale=C --auth-local=trust \
    --auth-host=scram-sha-256 --no-sync --no-instructions >"$DIR/log/initdb.log" 2>&1 ||
    {
        cat "$DIR/log/initdb.log" >&2
        die "initdb failed"
    }
{
    echo
    echo "# --- start-postgres.sh (PG_MODE=$PG_MODE) ---"
    echo "listen_addresses = '$HOST'"
    echo "port = $PORT"
    echo "unix_socket_directories = '$DIR/sock'"
    echo "max_connections = 200"
    echo "shared_buffers = $PG_SHARED_BUFFERS"
    if [ "$PG_MODE" = test ]; then # throw-away data: trade crash safety for speed
        echo "fsync = off"
        echo "synchronous_commit = off"
        echo "full_page_writes = off"
    else # benchmarks: production durability
        echo "fsync = on"
        echo "synchronous_commit = on"
        echo "full_page_writes = on"
    fi
} >>"$DIR/data/postgresql.conf"

# --- start, create role + database -------------------------------------------------------------
# fds 3/9 closed: the postmaster must not hold the caller's $(...) pipe or our port lock.
as_pg "$PG_BIN/pg_ctl" -D "$DIR/data" -l "$DIR/log/postgres.log" -w -t 60 start \
    >"$DIR/log/pg_ctl.log" 2>&1 </dev/null 3>&- 9<&- || die "pg_ctl start failed"

as_pg "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$DIR/sock" -p "$PORT" -U postgres -d postgres \
    -v user="$PG_USER" -v pass="$PG_PASS" -v db="$PG_DB" >/dev/null <<'SQL' || die "creating role/database failed"
CREATE ROLE :"user" LOGIN SUPERUSER PASSWORD :'pass';
CREATE DATABASE :"db" OWNER :"user";
SQL
log "ready after $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }') s"

emit DATABASE_URL "postgresql://$(urlencode "$PG_USER"):$(urlencode "$PG_PASS")@$HOST:$PORT/$(urlencode "$PG_DB")"
emit PG_DIR "$DIR"
emit PG_PORT_USED "$PORT"
emit PG_PID "$(head -n 1 "$DIR/data/postmaster.pid")"
emit PG_PSQL "$PG_BIN/psql -h $DIR/sock -p $PORT -U postgres"
emit PG_STOP "$(squote "$DIR/stop.sh") --rm"
ok=1
