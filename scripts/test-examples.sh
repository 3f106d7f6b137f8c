#!/usr/bin/env bash
# Checks the deployment examples offline, then runs the example bot.
#
#   1. deploy/compose.yaml: the compose-spec schema (check-jsonschema's
#      vendored copy), `podman-compose --dry-run config` (parses and resolves
#      it the way podman-compose up would; needs no podman), the Prometheus
#      config it mounts (`promtool check config`, with the alert rules beside
#      it as in the container);
#   2. deploy/k8s: every manifest against the Kubernetes 1.30 schemas,
#      strictly (kubernetes-validate; the schemas ship in the package);
#   3. scripts/check-examples.py: what schemas cannot see — files that
#      volumes mount exist, every sidecar config (compose's and the
#      ConfigMap's config.toml) passes `nearcache check-config` and agrees
#      with the ports, URLs, probes and scrape targets around it;
#   4. examples/bot for ~3 s against a real redis-server, nats-server and
#      nearcache with the trading rules (examples/trading.toml), on free
#      loopback ports: it must report reads and a non-zero L1 hit ratio.
#
# Python runs in the project's .venv (scripts/lib/venv.sh; made here if
# scripts/test.sh has not). The binary: NEARCACHE_BIN, else a debug
# `cargo build --bin nearcache`. .ci/run runs this after scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/deps.sh
ensure_commands redis-server:redis-server redis-cli:redis-tools \
    nats-server:nats-server promtool:prometheus
source scripts/lib/venv.sh
ensure_venv
py=$VENV_PYTHON
t0=$SECONDS
work=$(mktemp -d)
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
fail() { # the logs' tails, then the reason (last, where a reader looks)
  local log
  for log in "$work"/*.log; do
    [[ -s $log ]] && { echo "--- ${log##*/}" >&2; tail -20 "$log" >&2; }
  done
  echo "test-examples: FAIL: $*" >&2
  exit 1
}

bin=${NEARCACHE_BIN:-}
if [[ -z $bin ]]; then
  need cargo || fail "cargo not found: set NEARCACHE_BIN or install Rust"
  cargo build --quiet --bin nearcache
  bin=$(cargo metadata --format-version 1 --no-deps \
    | "$py" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/nearcache
fi
[[ -x $bin ]] || fail "no nearcache binary at $bin"

echo "== deploy/compose.yaml: compose-spec schema, podman-compose config, promtool check config"
.venv/bin/check-jsonschema --builtin-schema vendor.compose-spec deploy/compose.yaml >"$work/schema.log" 2>&1 \
  || fail "compose.yaml does not match the compose-spec schema"
.venv/bin/podman-compose --dry-run -f deploy/compose.yaml config >"$work/compose-config.log" 2>&1 \
  || fail "podman-compose config"
grep -q '^  nearcache-a:' "$work/compose-config.log" || fail "podman-compose config lists no nearcache-a"
mkdir "$work/prometheus"   # the container's /etc/prometheus: the config, alerts.yml beside it
cp deploy/compose/prometheus.yml deploy/prometheus/alerts.yml "$work/prometheus/"
promtool check config "$work/prometheus/prometheus.yml" >"$work/promtool.log" 2>&1 \
  || fail "promtool check config deploy/compose/prometheus.yml"

echo "== deploy/k8s: Kubernetes 1.30 schemas (strict)"
manifests=()
for f in deploy/k8s/*.yaml; do
  [[ $f == */kustomization.yaml ]] || manifests+=("$f")   # not a cluster resource
done
.venv/bin/kubernetes-validate --strict --quiet -k 1.30.0 "${manifests[@]}" >"$work/k8s.log" 2>&1 \
  || fail "kubernetes-validate"

echo "== compose and k8s: mounts, sidecar configs (nearcache check-config), ports, probes"
"$py" scripts/check-examples.py "$bin" || fail "scripts/check-examples.py"

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "timed out waiting for $what"
    sleep 0.1
  done
}

echo "== examples/bot through nearcache (trading rules) for 3 s"
# Four distinct free ports (held open together while they are picked).
read -r rport nport port aport < <("$py" -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" >"$work/redis.log" 2>&1 &
pids+=($!)
nats-server -a 127.0.0.1 -p "$nport" >"$work/nats.log" 2>&1 &
pids+=($!)
wait_for 10 "redis-server" redis-cli -p "$rport" PING
wait_for 10 "nats-server" grep -q 'Server is ready' "$work/nats.log"
# Both are up before nearcache starts: it logs no "connect failed" warning.
sed -e "s#redis://redis.internal:6379#redis://127.0.0.1:$rport#" \
    -e "s#nats://nats.internal:4222#nats://127.0.0.1:$nport#" examples/trading.toml >"$work/trading.toml"
grep -q "127.0.0.1:$rport" "$work/trading.toml" && grep -q "127.0.0.1:$nport" "$work/trading.toml" \
  || fail "examples/trading.toml no longer names redis.internal:6379 and nats.internal:4222"
"$bin" --config "$work/trading.toml" --listen "127.0.0.1:$port" --admin "127.0.0.1:$aport" \
  >"$work/nearcache.log" 2>&1 &
pids+=($!)
# /readyz (the image's own probe): Redis connected and the bus up.
wait_for 30 "nearcache /readyz" env NEARCACHE_HEALTH_ADDR="127.0.0.1:$aport" bash deploy/container/healthcheck.sh
timeout 60 "$py" examples/bot/bot.py --url "redis://127.0.0.1:$port" --seed --seconds 3 \
  --feed-rate 50 --name test-examples >"$work/bot.log" 2>&1 || fail "the bot exited with status $?"
cat "$work/bot.log"
"$py" - "$work/bot.log" <<'PY' || fail "the bot's report"
import re, sys
lines = open(sys.argv[1]).read().splitlines()
ticks = [dict(re.findall(r"(\S+)=(\S+)", l)) for l in lines if l.startswith("bot t=")]
total = next((dict(re.findall(r"(\S+)=(\S+)", l)) for l in lines if l.startswith("bot total")), None)
assert len(ticks) >= 2, f"expected a line a second, got {len(ticks)}"
assert total is not None, "no 'bot total' line"
assert float(total["reads/s"]) > 0 and int(total["reads"]) > 0, f"no reads: {total}"
assert total["hit_ratio"] != "n/a" and float(total["hit_ratio"]) > 0, f"hit ratio: {total['hit_ratio']}"
assert int(total["writes"]) > 0, "the feeder wrote nothing"
assert int(total["errors"]) == 0, f"errors: {total['errors']}"
full = [t for t in ticks if t["hit_ratio"] != "n/a" and float(t["hit_ratio"]) > 0 and float(t["reads/s"]) > 0]
assert full, f"no second with reads and a non-zero hit ratio: {ticks}"
for t in ticks:
    float(t["p50_ms"]), float(t["p99_ms"])
PY
# The feeder's writes invalidated L1 entries (else the hit ratio says nothing).
inval=$(redis-cli -p "$port" PROXY STATS | tr -d '\r' \
  | awk 'p {n += $1; p = 0} $0 == "invalidations" {p = 1} END {print n + 0}')   # over the rules
((inval > 0)) || fail "no L1 invalidations (PROXY STATS invalidations=$inval)"
# The bot's traffic made nearcache log no warning or error.
if grep -E ' (WARN|ERROR) ' "$work/nearcache.log" >&2; then fail "nearcache logged the lines above"; fi
echo "test-examples: ok ($((SECONDS - t0)) s)"
