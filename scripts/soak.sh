#!/usr/bin/env bash
# Soak run: three nearcache instances (release build), one nats-server and
# one redis-server, all on free 127.0.0.1 ports, under mixed load for MINUTES
# minutes (scripts/soak.py): per instance GET/SET and MGET on the cached
# prefix soak: (rule ttl 5s), pipelines of 20, MULTI/EXEC, a SUBSCRIBEd
# client receiving PUBLISHes, BLPOP (1 s timeout) fed by LPUSH. Each minute:
#   +15 s  a burst of 300 short connections per instance (PING+GET read back;
#          GET and gone before the reply; SUBSCRIBE and gone; BLPOP and gone)
#   +30 s  one fault, in turn: Redis SIGKILLed and restarted on its port,
#          nats-server killed and restarted, one proxy SIGSTOPped for 1 s
#   +57 s  a sample of every instance's /metrics: RSS, open fds, tokio alive
#          tasks (nearcache_runtime_alive_tasks), client connections
# printed as one table row per minute (with ops, errors, pub/sub messages
# received, BLPOP pops, deaf subscribers).
#
# Accepted growth, per instance, from the end of the warm-up (the first
# minute's sample; for a one-minute run, a sample after 12 s, before the
# burst and the fault) to the last sample: both last-minus-first and, with 3
# samples or more, the least-squares slope times the span must stay within
#   tasks +100   fds +50   clients +10   RSS +64 MiB.
# Each minute's burst opens 300 connections per instance, so a leak of one
# task or one fd per connection grows by 300 a minute and fails even a
# one-minute run, while the noise of in-flight requests, fills and
# reconnects after a fault (tens) does not. It also fails if a kind of load
# made no progress in a whole minute (a hang), if a nearcache exits, or if a
# subscriber is left deaf (silent for 3 s while publishes succeed: its
# subscription ended without its connection closing).
#
#   scripts/soak.sh MINUTES
#   NEARCACHE_BIN=target/debug/nearcache scripts/soak.sh 1   # skip the build (CI)
set -euo pipefail
cd "$(dirname "$0")/.."

minutes="${1:-}"
case "$minutes" in
  '' | *[!0-9]*) echo "usage: $0 MINUTES (a whole number, at least 1)" >&2; exit 2 ;;
esac
if [ "$minutes" -lt 1 ]; then
  echo "MINUTES must be at least 1" >&2
  exit 2
fi

source scripts/lib/deps.sh
ensure_commands redis-server:redis-server nats-server:nats-server
need python3 || { echo "python3 not found: apt-get install -y python3 python3-venv" >&2; exit 1; }
source scripts/lib/venv.sh
ensure_venv

if [[ -z ${NEARCACHE_BIN:-} ]]; then
  need cargo || { echo "cargo not found: install Rust (https://rustup.rs), or set NEARCACHE_BIN" >&2; exit 1; }
  echo "== building (release)"
  cargo build --release --quiet
  target_dir=$(cargo metadata --format-version 1 --no-deps \
      | "$VENV_PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
  NEARCACHE_BIN=$target_dir/release/nearcache
fi
[[ -x $NEARCACHE_BIN ]] || { echo "NEARCACHE_BIN=$NEARCACHE_BIN is not an executable" >&2; exit 1; }

echo "== soak: $minutes minute(s), $NEARCACHE_BIN"
exec "$VENV_PYTHON" scripts/soak.py --minutes "$minutes" --bin "$NEARCACHE_BIN"
