#!/usr/bin/env bash
# Start a private, throw-away RabbitMQ node (no systemd, no Docker) for tests, demos, benchmarks.
#
#   eval "$(deploy/start-rabbitmq.sh)"   # -> RABBITMQ_URL, RABBITMQ_DIR, RABBITMQ_STOP, ...
#   ...
#   eval "$RABBITMQ_STOP"                # graceful stop + rm -rf of the temp dir
#
# Everything the node touches lives in one fresh temp dir; it has its own node name, ports,
# epmd, cookie and config files, listens on 127.0.0.1 only and never touches a system node.
# Stdout carries only `export ...` lines (safe to eval); all logging goes to stderr.
#
# Knobs: RMQ_PORT (default 5673; if unset and busy, the next free port is used),
#   RMQ_USER/RMQ_PASS (default arbiter/arbiter), RMQ_WAIT (boot timeout in s, default 90),
#   RMQ_PLUGINS (comma/space separated, default none; rabbitmq_management listens on
#   RMQ_MGMT_PORT, default port+10000), RMQ_EPMD_PORT (default port-1303, i.e. 4370 for 5673),
#   RMQ_BIN (default /usr/lib/rabbitmq/bin), TMPDIR, RMQ_CONF_EXTRA (lines appended to the
#   node's rabbitmq.conf, e.g. a TLS listener and its ssl_options).
# Ports: AMQP = port, Erlang distribution = port+20000, epmd = one private epmd per node.
set -euo pipefail

exec 3>&1 1>&2 # fd 3 = the caller's stdout (export lines only); everything else goes to stderr

log() { printf '[start-rabbitmq] %s\n' "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

RMQ_BIN=${RMQ_BIN:-/usr/lib/rabbitmq/bin} # not /usr/sbin: those wrappers su to the system node
RMQ_USER=${RMQ_USER:-arbiter}
RMQ_PASS=${RMQ_PASS:-arbiter}
RMQ_WAIT=${RMQ_WAIT:-90}
RMQ_PLUGINS=${RMQ_PLUGINS:-}
TMP_BASE=${TMPDIR:-/tmp}
HOST=127.0.0.1

# --- install on demand (root only) -------------------------------------------------------------
if [ ! -x "$RMQ_BIN/rabbitmq-server" ]; then
    [ "$(id -u)" = 0 ] || die "no $RMQ_BIN/rabbitmq-server; install rabbitmq-server or set RMQ_BIN"
    command -v apt-get >/dev/null || die "no $RMQ_BIN/rabbitmq-server and no apt-get to install it"
    log "rabbitmq-server is missing: installing it with apt-get (~20 s)"
    if [ ! -e /usr/sbin/policy-rc.d ]; then # keep the package from starting a system node
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
    fi
    (
        flock 8 # start-postgres.sh may be installing concurrently
        if [ ! -x "$RMQ_BIN/rabbitmq-server" ]; then
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -q
            apt-get install -y -q -o DPkg::Lock::Timeout=300 rabbitmq-server
        fi
    ) 8>"$TMP_BASE/.arbiter-apt.lock" || die "apt-get install rabbitmq-server failed"
    [ -x "$RMQ_BIN/rabbitmq-server" ] || die "rabbitmq-server installed, but $RMQ_BIN/rabbitmq-server is missing"
fi

# --- helpers -----------------------------------------------------------------------------------
listening() { (exec 5<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# True while the process exists and is not a zombie (PID 1 here may never reap orphans).
alive() {
    local stat
    stat=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [ -n "$stat" ] && [ "${stat#Z}" = "$stat" ]
}

# The broker answers the AMQP 0-9-1 protocol header with a Connection.Start frame once it is up.
amqp_ready() {
    (
        exec 5<>"/dev/tcp/$HOST/$1" || exit 1
        printf 'AMQP\000\000\011\001' >&5
        IFS= read -r -t 2 -N 1 reply <&5 && [ -n "$reply" ]
    ) 2>/dev/null
}

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

# --- pick ports --------------------------------------------------------------------------------
# A per-port flock (held until this script exits, i.e. until the node listens) keeps concurrent
# starts from picking the same port while a node is still booting and not yet listening.
MGMT=0
case " ${RMQ_PLUGINS//,/ } " in *" rabbitmq_management "*) MGMT=1 ;; esac

try_port() {
    local p=$1 q lock="$TMP_BASE/.arbiter-rmq-$1.lock"
    EPMD_PORT=${RMQ_EPMD_PORT:-$((p - 1303))}
    DIST_PORT=$((p + 20000))
    MGMT_PORT=${RMQ_MGMT_PORT:-$((p + 10000))}
    [ -e "$lock" ] || (umask 0 && : >>"$lock") 2>/dev/null || true
    { exec 9<"$lock"; } 2>/dev/null || return 1
    if flock -n 9; then
        local ports="$p $DIST_PORT $EPMD_PORT"
        [ "$MGMT" = 1 ] && ports+=" $MGMT_PORT"
        for q in $ports; do
            if listening "$q"; then
                log "port $q is busy"
                exec 9<&-
                return 1
            fi
        done
        return 0
    fi
    log "port $p is being claimed by another starting node"
    exec 9<&-
    return 1
}

if [ -n "${RMQ_PORT:-}" ]; then
    try_port "$RMQ_PORT" || die "RMQ_PORT=$RMQ_PORT (or its dist/epmd port) is not free"
    PORT=$RMQ_PORT
else
    PORT=
    for p in $(seq 5673 5772); do
        if try_port "$p"; then
            PORT=$p
            break
        fi
    done
    [ -n "$PORT" ] || die "no free port in 5673-5772"
fi
NODENAME="rmq$PORT@localhost"

# --- temp dir, config, helper scripts ----------------------------------------------------------
DIR=$(mktemp -d "$TMP_BASE/rmq-$PORT.XXXXXX")
mkdir -p "$DIR/log" "$DIR/mnesia"
ok=0
cleanup() {
    [ "$ok" = 1 ] && return
    log "startup failed; tail of $DIR/log:"
    tail -n 30 "$DIR/log/stdout.log" "$DIR/log/$NODENAME.log" >&2 2>/dev/null || true
    "$DIR/stop.sh" --rm >&2 || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

{
    echo '# sourced by the server and by ./ctl: same HOME (=> same cookie) and same node'
    cat <<'EOF'
for v in $(env | sed -n 's/^\(RABBITMQ_[A-Za-z0-9_]*\)=.*/\1/p'); do unset "$v"; done
EOF
    echo "export HOME=$(squote "$DIR")"
    echo "export RABBITMQ_NODENAME=$NODENAME RABBITMQ_USE_LONGNAME=false"
    echo "export RABBITMQ_NODE_IP_ADDRESS=$HOST RABBITMQ_NODE_PORT=$PORT RABBITMQ_DIST_PORT=$DIST_PORT"
    echo "export ERL_EPMD_PORT=$EPMD_PORT ERL_EPMD_ADDRESS=$HOST"
    echo "export RABBITMQ_CONF_ENV_FILE=$(squote "$DIR/rabbitmq-env.conf")"
    echo "export RABBITMQ_CONFIG_FILE=$(squote "$DIR/rabbitmq.conf")"
    echo "export RABBITMQ_ADVANCED_CONFIG_FILE=$(squote "$DIR/advanced.config")"
    echo "export RABBITMQ_ENABLED_PLUGINS_FILE=$(squote "$DIR/enabled_plugins")"
    echo "export RABBITMQ_MNESIA_BASE=$(squote "$DIR/mnesia") RABBITMQ_LOG_BASE=$(squote "$DIR/log")"
    echo "export RABBITMQ_PID_FILE=$(squote "$DIR/beam.pid")"
    echo "export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}'"
    echo "export RABBITMQ_CTL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}'"
} >"$DIR/env"
: >"$DIR/rabbitmq-env.conf" # empty: ignore /etc/rabbitmq/rabbitmq-env.conf
echo '[].' >"$DIR/advanced.config"
read -ra plugins <<<"${RMQ_PLUGINS//,/ }"
(IFS=, && echo "[${plugins[*]}].") >"$DIR/enabled_plugins"
{
    echo "listeners.tcp.default = $HOST:$PORT"
    echo "default_user = $RMQ_USER"
    echo "default_pass = $RMQ_PASS"
    echo "default_user_tags.administrator = true"
    echo "loopback_users = none"
    echo "log.console = false"
    echo "log.file.level = info"
    echo "disk_free_limit.absolute = 50MB"
    if [ "$MGMT" = 1 ]; then
        echo "management.tcp.port = $MGMT_PORT"
        echo "management.tcp.ip = $HOST"
    fi
    if [ -n "${RMQ_CONF_EXTRA:-}" ]; then printf '%s\n' "$RMQ_CONF_EXTRA"; fi
} >"$DIR/rabbitmq.conf"
chmod 600 "$DIR/rabbitmq.conf"

cat >"$DIR/ctl" <<EOF
#!/bin/sh
# Run a RabbitMQ CLI tool against this node: ./ctl rabbitmqctl list_queues
. $(squote "$DIR/env")
cmd=\$1; shift
exec $(squote "$RMQ_BIN")/"\$cmd" "\$@"
EOF

cat >"$DIR/stop.sh" <<EOF
#!/usr/bin/env bash
# Stop the private RabbitMQ node $NODENAME gracefully (SIGTERM to beam.smp); --rm deletes the dir.
{
DIR=$(squote "$DIR")
EPMD_PORT=$EPMD_PORT
alive() {
    local stat
    stat=\$(ps -o stat= -p "\$1" 2>/dev/null) || return 1
    [ -n "\$stat" ] && [ "\${stat#Z}" = "\$stat" ]
}
# Only signal a pid that still belongs to this node (pids get reused).
ours() { alive "\$1" && { tr '\0' '\n' <"/proc/\$1/environ"; } 2>/dev/null | grep -qxF "RABBITMQ_MNESIA_BASE=\$DIR/mnesia"; }
launcher=\$(cat "\$DIR/launcher.pid" 2>/dev/null || true)
beam=\$(cat "\$DIR/beam.pid" 2>/dev/null || true)
if [ -z "\$beam" ] && [ -n "\$launcher" ]; then
    beam=\$(ps -o pid= --ppid "\$launcher" 2>/dev/null | head -n 1 | tr -d ' ')
fi
for pid in \$beam \$launcher; do
    if ours "\$pid"; then
        kill -TERM "\$pid" 2>/dev/null || true
        for _ in \$(seq 600); do alive "\$pid" || break; sleep 0.05; done
        if alive "\$pid"; then
            echo "[stop-rabbitmq] pid \$pid ignored SIGTERM for 30 s: SIGKILL" >&2
            kill -KILL "\$pid" 2>/dev/null || true
        fi
    fi
done
# The private epmd outlives the node; -kill refuses while any node is still registered.
ERL_EPMD_PORT=\$EPMD_PORT ERL_EPMD_ADDRESS=127.0.0.1 epmd -kill >/dev/null 2>&1 || true
if [ "\${1:-}" = --rm ]; then rm -rf "\$DIR"; fi
exit 0
}
EOF
chmod 755 "$DIR/ctl" "$DIR/stop.sh"

# --- launch and wait ---------------------------------------------------------------------------
log "starting $NODENAME on $HOST:$PORT (dist $DIST_PORT, epmd $EPMD_PORT) in $DIR"
t0=$EPOCHREALTIME
# Output to a file and fds 3/9 closed: the VM must not hold the caller's $(...) pipe or our lock.
(cd "$DIR" && exec sh -c '. "$1" && exec "$2/rabbitmq-server"' sh "$DIR/env" "$RMQ_BIN") \
    >"$DIR/log/stdout.log" 2>&1 </dev/null 3>&- 9<&- &
launcher=$!
echo "$launcher" >"$DIR/launcher.pid"

deadline=$((SECONDS + RMQ_WAIT))
until amqp_ready "$PORT"; do
    alive "$launcher" || die "rabbitmq-server exited during boot"
    [ "$SECONDS" -lt "$deadline" ] || die "no AMQP answer on $HOST:$PORT after ${RMQ_WAIT}s (RMQ_WAIT)"
    sleep 0.05
done
for _ in $(seq 100); do [ -s "$DIR/beam.pid" ] && break; sleep 0.05; done
log "ready after $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }') s"

emit RABBITMQ_URL "amqp://$(urlencode "$RMQ_USER"):$(urlencode "$RMQ_PASS")@$HOST:$PORT/"
emit RABBITMQ_DIR "$DIR"
emit RABBITMQ_PORT_USED "$PORT"
emit RABBITMQ_PID "$(cat "$DIR/beam.pid" 2>/dev/null || echo "$launcher")"
emit RABBITMQ_CTL "$DIR/ctl"
emit RABBITMQ_STOP "$(squote "$DIR/stop.sh") --rm"
[ "$MGMT" = 1 ] && emit RABBITMQ_MGMT_URL "http://$HOST:$MGMT_PORT/"
ok=1
