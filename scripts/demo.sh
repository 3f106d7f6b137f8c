#!/usr/bin/env bash
# Runs nearcache in front of a local Redis and shows redis-cli talking through it.
#   scripts/demo.sh            # then Ctrl-C to stop
#   DEMO_EXIT=1 scripts/demo.sh  # show the demo and exit
# Uses the Redis on REDIS_PORT (default 6379) if one answers there; otherwise
# installs (Debian) and starts a throwaway one. nearcache listens on
# NEARCACHE_PORT (default 6380).
set -euo pipefail
cd "$(dirname "$0")/.."
REDIS_PORT=${REDIS_PORT:-6379}
NEARCACHE_PORT=${NEARCACHE_PORT:-6380}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  echo "== installing redis-server and redis-tools"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
fi
if redis-cli -p "$REDIS_PORT" PING 2>/dev/null | grep -q PONG; then
  echo "== using the Redis already on 127.0.0.1:$REDIS_PORT"
else
  echo "== starting redis-server on 127.0.0.1:$REDIS_PORT"
  dir=$(mktemp -d)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" >"$dir/redis.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" PING 2>/dev/null | grep -q PONG && break; sleep 0.05; done
fi

echo "== building nearcache (release)"
cargo build --release --quiet
./target/release/nearcache --listen "127.0.0.1:$NEARCACHE_PORT" --upstream "redis://127.0.0.1:$REDIS_PORT" &
pids+=($!)
for _ in $(seq 100); do redis-cli -p "$NEARCACHE_PORT" PING 2>/dev/null | grep -q PONG && break; sleep 0.05; done

show() { echo "\$ redis-cli -p $NEARCACHE_PORT $*"; redis-cli -p "$NEARCACHE_PORT" "$@"; }
show SET ticker:BTCUSDT 97123.5
show GET ticker:BTCUSDT
show HSET orderbook:BTCUSDT bid 97120 ask 97125
show -3 HGETALL orderbook:BTCUSDT
echo "\$ redis-cli -p $NEARCACHE_PORT  (MULTI / INCR / INCR / EXEC)"
printf 'MULTI\nINCR fills\nINCR fills\nEXEC\n' | redis-cli -p "$NEARCACHE_PORT"
echo "== the same key, read from Redis directly:"
echo "\$ redis-cli -p $REDIS_PORT GET ticker:BTCUSDT"; redis-cli -p "$REDIS_PORT" GET ticker:BTCUSDT

if [ -n "${DEMO_EXIT:-}" ]; then exit 0; fi
echo "== nearcache is listening on 127.0.0.1:$NEARCACHE_PORT; try: redis-cli -p $NEARCACHE_PORT   (Ctrl-C to stop)"
wait "${pids[-1]}"
