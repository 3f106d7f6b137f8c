#!/usr/bin/env bash
# A/B of nearcache builds (or configs): one redis-server, one nearcache per
# argument, all up at once; each round runs redis-benchmark against Redis
# directly and through every nearcache, rotating which goes first, and prints
# requests/s per run plus the share of the machine left idle during it. For
# telling a regression from this VM's noise: the builds see the same machine
# at the same time. Each run also reports the CPU time the served process
# spent per request (all its threads, from schedstat), and the end prints
# medians per target against the first nearcache target.
#
# Usage: scripts/bench-ab.sh BINARY[@CONFIG] BINARY[@CONFIG] ...
#   e.g. scripts/bench-ab.sh /tmp/nearcache-before target/release/nearcache
# Env:   T=get  P=16  N=1000000  ROUNDS=4  (redis-benchmark -t, -P, -n; rounds)
#        CMD='EVAL "return 1" 0'  (instead of -t: one command, as words)
#        CLIENTS=50 DATA_SIZE=64 KEYSPACE=100000
#        TLS_CA=ca.crt  (a target whose CONFIG has [server.tls] is spoken to
#                        over TLS, trusting this CA)
#
# Needs redis-server and redis-benchmark; everything on 127.0.0.1, free ports;
# every process started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

(($# > 0)) || { echo "usage: $0 BINARY[@CONFIG] ..." >&2; exit 2; }
T=${T:-get} P=${P:-16} N=${N:-1000000} ROUNDS=${ROUNDS:-4}
CLIENTS=${CLIENTS:-50} DATA_SIZE=${DATA_SIZE:-64} KEYSPACE=${KEYSPACE:-100000}
HOST=127.0.0.1
source scripts/lib/deps.sh
ensure_commands redis-server:redis-server redis-benchmark:redis-tools redis-cli:redis-tools

work=$(mktemp -d "${TMPDIR:-/tmp}/nearcache-ab.XXXXXX")
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_ping() { # port [redis-cli options]
    local i port=$1
    shift
    for ((i = 0; i < 100; i++)); do
        [[ $(redis-cli -h "$HOST" -p "$port" "$@" ping 2>/dev/null) == PONG ]] && return 0
        sleep 0.1
    done
    echo "nothing answers PING on $HOST:$1" >&2
    exit 1
}

redis_port=$(free_port)
redis-server --bind "$HOST" --port "$redis_port" --save '' --appendonly no \
    --dir "$work" --logfile "$work/redis.log" &
pids+=("$!")
wait_ping "$redis_port"
# The keyspace exists, so GETs read values.
redis-benchmark -h "$HOST" -p "$redis_port" -c "$CLIENTS" -n $((KEYSPACE * 20)) -P 16 \
    -d "$DATA_SIZE" -r "$KEYSPACE" -t set -q >/dev/null 2>&1

ports=("$redis_port") names=(direct) tls=("") procs=("${pids[0]}")
for arg in "$@"; do
    bin=${arg%@*} cfg= tls_args=""
    [[ $arg == *@* ]] && cfg=${arg#*@}
    if [[ -n $cfg ]] && grep -q '^\[server.tls\]' "$cfg"; then
        tls_args="--tls --cacert ${TLS_CA:?a TLS target needs TLS_CA}"
    fi
    port=$(free_port)
    args=(--listen "$HOST:$port" --upstream "redis://$HOST:$redis_port")
    [[ -n $cfg ]] && args+=(--config "$cfg")
    NEARCACHE_LOG=warn "$bin" "${args[@]}" >"$work/nc-$port.log" 2>&1 &
    pids+=("$!")
    # shellcheck disable=SC2086 # (options, split on purpose)
    wait_ping "$port" $tls_args
    ports+=("$port") names+=("$arg") tls+=("$tls_args") procs+=("${pids[-1]}")
done

# Busy and idle jiffies of the whole machine.
cpu() { awk '/^cpu /{print $2+$3+$4+$7+$8, $5+$6}' /proc/stat; }
# Nanoseconds a process's threads have spent on a CPU: the served target's
# own cost, which this VM's noise moves far less than requests/s.
# (%.0f, not %d: mawk clamps %d at 2^31, about 2 s of CPU.)
oncpu() { cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{s += $1} END {printf "%.0f\n", s}'; }
n=${#ports[@]}
printf 'round\t%-40s\trps\tidle%%\tcpu_ns/req\n' target
for ((round = 0; round < ROUNDS; round++)); do
    for ((k = 0; k < n; k++)); do
        j=$(((k + round) % n))
        read -r b0 i0 < <(cpu)
        t0=$(oncpu "${procs[$j]}")
        if [[ -n ${CMD:-} ]]; then
            eval "what=($CMD)"
        else
            what=(-t "$T")
        fi
        # shellcheck disable=SC2086
        rps=$(redis-benchmark -h "$HOST" -p "${ports[$j]}" ${tls[$j]} -c "$CLIENTS" -n "$N" -P "$P" \
            -r "$KEYSPACE" -d "$DATA_SIZE" -q "${what[@]}" 2>/dev/null | tr '\r' '\n' \
            | grep -a 'requests per second' | tail -1 | sed -E 's/.*: ([0-9]+)[.0-9]* requests per second.*/\1/')
        t1=$(oncpu "${procs[$j]}")
        read -r b1 i1 < <(cpu)
        printf '%d\t%-40s\t%s\t%d\t%d\n' "$round" "${names[$j]}" "$rps" \
            $((100 * (i1 - i0) / (b1 - b0 + i1 - i0 + 1))) $(((t1 - t0) / N)) | tee -a "$work/rows"
    done
done
# Medians per target, and each against the first nearcache target.
python3 - "$work/rows" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    _, name, rps, _, ns = line.split("\t")
    rows.setdefault(name.strip(), []).append((float(rps or 0), float(ns)))
names = list(rows)
med = {n: (statistics.median(r for r, _ in v), statistics.median(c for _, c in v)) for n, v in rows.items()}
base = names[1] if len(names) > 1 else names[0]
print(f"\nmedians of {len(rows[base])} rounds; ratios against {base} (rps: higher is better; cpu: lower is better)")
print(f"{'target':40}\t{'rps':>9}\t{'cpu_ns/req':>10}\trps/base\tcpu/base")
for n in names:
    r, c = med[n]
    ratio = lambda a, b: f"{a / b:.3f}" if b else "-"
    print(f"{n:40}\t{r:9.0f}\t{c:10.0f}\t{ratio(r, med[base][0])}\t{ratio(c, med[base][1])}")
PY
