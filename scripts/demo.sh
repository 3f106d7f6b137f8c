#!/usr/bin/env bash
# A guided tour of nearcache: its own redis-server and nats-server on free
# loopback ports, nearcache in front of them with the trading-bot rules
# (examples/trading.toml) and its admin listener, then redis-cli showing a
# read served from L1 — Redis never sees it — and a write invalidating it.
#
#   scripts/demo.sh                          # the tour, then Ctrl-C to stop
#   DEMO_NONINTERACTIVE=1 scripts/demo.sh    # the tour, then exit 0
#
# Env: NEARCACHE_BIN=path   use this binary, skip the build
#      REDIS_URL=redis://127.0.0.1:PORT or REDIS_PORT=PORT
#                           use that Redis instead of starting one (the demo
#                           writes ticker:BTCUSDT in it and resets its
#                           INFO commandstats); by default it never touches a
#                           Redis already running, e.g. on 6379
#      NEARCACHE_PORT, ADMIN_PORT   where nearcache listens (default: free ports)
# Needs: Rust >= 1.85 (cargo) unless NEARCACHE_BIN is set; redis-server,
# redis-cli and nats-server (installed with apt-get when missing, as root).
set -euo pipefail
cd "$(dirname "$0")/.."

HOST=127.0.0.1
MIN_RUST=1.85
if [[ -t 1 ]]; then
    say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
else
    say() { printf '\n== %s\n' "$*"; }
fi
die() { echo "demo.sh: $*" >&2; exit 1; }

# --- tools -------------------------------------------------------------------
source scripts/lib/deps.sh
ensure_commands redis-server:redis-server redis-cli:redis-tools nats-server:nats-server \
    python3:python3

if [[ -z ${NEARCACHE_BIN:-} ]]; then
    if ! command -v cargo >/dev/null; then
        die "cargo not found. nearcache needs Rust >= $MIN_RUST; install it with
    curl https://sh.rustup.rs -sSf | sh
then open a new shell (or: source \"\$HOME/.cargo/env\") and run scripts/demo.sh again."
    fi
    rust=$(cargo --version | sed -n 's/^cargo \([0-9]*\.[0-9]*\).*/\1/p')
    if [[ -z $rust ]] || [[ $(printf '%s\n%s\n' "$MIN_RUST" "$rust" | sort -V | head -n 1) != "$MIN_RUST" ]]; then
        die "cargo ${rust:-?} is too old: nearcache needs Rust >= $MIN_RUST (edition 2024). Update with
    rustup update stable
(Debian's packaged rustc is too old; without rustup: curl https://sh.rustup.rs -sSf | sh)"
    fi
    say "building nearcache: cargo build --release (a few minutes the first time)"
    cargo build --release
    target_dir=$(cargo metadata --format-version 1 --no-deps \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
    NEARCACHE_BIN=$target_dir/release/nearcache
fi
[[ -x $NEARCACHE_BIN ]] || die "no nearcache binary at $NEARCACHE_BIN"

# --- processes ---------------------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/nearcache-demo.XXXXXX")
pids=()
cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    if ((rc != 0 && rc != 130 && rc != 143)); then
        echo "demo.sh: failed (exit $rc); last log lines:" >&2
        tail -n 15 "$work"/*.log >&2 2>/dev/null || true
    fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_ping() { # port pid name — polls: a listener binding is not an event we can await
    local i
    for ((i = 0; i < 200; i++)); do
        [[ -z $2 ]] || kill -0 "$2" 2>/dev/null || die "$3 exited at start"
        [[ $(redis-cli -h "$HOST" -p "$1" PING 2>/dev/null) == PONG ]] && return 0
        sleep 0.05
    done
    die "$3 did not answer PING on $HOST:$1"
}

if [[ -n ${REDIS_URL:-} ]]; then
    hp=${REDIS_URL#*://}; hp=${hp%%/*}
    [[ $hp != *@* ]] || die "REDIS_URL with credentials is not supported by the demo"
    REDIS_HOST=${hp%:*}; REDIS_PORT=${hp##*:}
    [[ $REDIS_HOST != "$hp" ]] || REDIS_PORT=6379
    wait_ping "$REDIS_PORT" "" "the Redis at REDIS_URL"
    say "using the Redis you named: $REDIS_URL"
elif [[ -n ${REDIS_PORT:-} ]]; then
    REDIS_HOST=$HOST
    wait_ping "$REDIS_PORT" "" "the Redis on REDIS_PORT=$REDIS_PORT"
    say "using the Redis you named on $HOST:$REDIS_PORT"
else
    REDIS_HOST=$HOST
    REDIS_PORT=$(free_port)
    say "starting a throwaway redis-server on $HOST:$REDIS_PORT (nothing else is touched)"
    redis-server --bind "$HOST" --port "$REDIS_PORT" --save '' --appendonly no \
        --dir "$work" --logfile "$work/redis.log" &
    pids+=("$!")
    wait_ping "$REDIS_PORT" "$!" redis-server
fi

# trading.toml broadcasts invalidations over NATS and shares a fleet-wide
# rate limit there; L1 serves only while the bus is up, so give it one.
NATS_PORT=$(free_port)
nats-server -a "$HOST" -p "$NATS_PORT" >"$work/nats.log" 2>&1 &
pids+=("$!")
NATS_PID=$!

NEARCACHE_PORT=${NEARCACHE_PORT:-$(free_port)}
ADMIN_PORT=${ADMIN_PORT:-$(free_port)}
say "starting nearcache on $HOST:$NEARCACHE_PORT with examples/trading.toml"
echo "   $NEARCACHE_BIN --config examples/trading.toml \\"
echo "       --upstream redis://$REDIS_HOST:$REDIS_PORT --listen $HOST:$NEARCACHE_PORT \\"
echo "       --admin $HOST:$ADMIN_PORT --nats nats://$HOST:$NATS_PORT"
"$NEARCACHE_BIN" --config examples/trading.toml --upstream "redis://$REDIS_HOST:$REDIS_PORT" \
    --listen "$HOST:$NEARCACHE_PORT" --admin "$HOST:$ADMIN_PORT" \
    --nats "nats://$HOST:$NATS_PORT" >"$work/nearcache.log" 2>&1 &
pids+=("$!")
NEARCACHE_PID=$!
wait_ping "$NEARCACHE_PORT" "$NEARCACHE_PID" nearcache
kill -0 "$NATS_PID" 2>/dev/null || die "nats-server exited at start"
# L1 is used once the bus is connected (loss_policy = bypass until then):
# wait for nearcache to say so, rather than for a fixed time.
for ((i = 0; i < 200; i++)); do
    [[ $(redis-cli -p "$NEARCACHE_PORT" INFO nearcache | tr -d '\r' | sed -n 's/^nearcache_bus://p') == connected ]] && break
    sleep 0.05
done
((i < 200)) || die "nearcache did not connect to nats-server"

# --- the tour ----------------------------------------------------------------
through() { echo "\$ redis-cli -p $NEARCACHE_PORT $*"; redis-cli -p "$NEARCACHE_PORT" "$@"; }
redis_direct() { redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" "$@"; }
# Redis's own count of GETs it has executed.
redis_gets() {
    local n
    n=$(redis_direct INFO commandstats | tr -d '\r' | sed -n 's/^cmdstat_get:calls=\([0-9]*\).*/\1/p')
    echo "${n:-0}"
}
# The ticker: rule's counters from PROXY STATS (flat name/value lines in RESP2).
ticker_stats() {
    redis-cli -p "$NEARCACHE_PORT" PROXY STATS | awk '
        prev == "prefix" && $0 == "ticker:" { in_rule = 1 }
        in_rule && (prev == "hits" || prev == "misses" || prev == "invalidations") { v[prev] = $0 }
        in_rule && prev == "hit_ratio" { exit }
        { prev = $0 }
        END { printf "hits=%s misses=%s invalidations=%s", v["hits"], v["misses"], v["invalidations"] }'
}
counters() {
    echo "   nearcache PROXY STATS, rule ticker:  $(ticker_stats)"
    echo "   Redis INFO commandstats              cmdstat_get calls=$(redis_gets)   (asked of Redis directly, port $REDIS_PORT)"
}

redis_direct CONFIG RESETSTAT >/dev/null
say "1. write a ticker through nearcache (writes go to Redis; reads of ticker:* are cached up to 2 s)"
through SET ticker:BTCUSDT 97123.5
counters

say "2. the first GET is a miss: nearcache asks Redis (cmdstat_get goes up by 1)"
through GET ticker:BTCUSDT
counters

say "3. the second GET is served from L1: hits goes up, Redis's cmdstat_get does not move"
through GET ticker:BTCUSDT
counters

say "4. a write through nearcache drops the key from L1 (here and on every peer over NATS)"
through SET ticker:BTCUSDT 97130.0
counters

say "5. so the next GET goes to Redis again (cmdstat_get moves) and sees the new price"
through GET ticker:BTCUSDT
counters

say "6. INFO nearcache: nearcache's own section, answered without asking Redis"
through INFO nearcache

say "7. the live dashboard (hit ratio, ops/s, latency by path, hot keys)"
echo "   http://$HOST:$ADMIN_PORT/      (also /stats, /metrics, /healthz, /readyz)"
echo "   everything else: redis-cli -p $NEARCACHE_PORT PROXY HELP"

if [[ -n ${DEMO_NONINTERACTIVE:-} && ${DEMO_NONINTERACTIVE} != 0 ]]; then
    say "done (DEMO_NONINTERACTIVE): stopping nearcache and what the demo started"
    exit 0
fi
say "nearcache is running: try  redis-cli -p $NEARCACHE_PORT   (Ctrl-C stops everything the demo started)"
wait "$NEARCACHE_PID"
