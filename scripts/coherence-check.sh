#!/usr/bin/env bash
# The coherence staleness checker, long: one redis-server (AOF, appendfsync
# always), one nats-server and three nearcache binaries (release build) under
# concurrent writers and readers, in six phases of SECONDS each (default 30):
#   1 healthy                 4 Redis SIGKILLed and restarted with its AOF
#   2 NATS killed, restarted  5 Redis paused (SIGSTOP ~1 s), resumed
#   3 one proxy paused ~1 s   6 Redis killed, AOF/RDB wiped, restarted empty
# Prints each phase's report: writes, reads, failures (in the Redis phases,
# the expected ones while Redis was away are counted apart), requests with no
# reply, read-your-writes violations, stale reads beyond the bound (100 ms;
# 300 ms while a proxy is paused), reads of values never sent or (phase 6)
# only the old server held, Redis's final state against the last acked
# versions (lost acknowledged writes), recovery time after Redis is back,
# propagation delay p50/p99/max. Fails if an invariant is broken. The rules
# and bounds of each phase: tests/integration/checker.rs.
#
#   scripts/coherence-check.sh [SECONDS_PER_PHASE]
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-30}"
case "$seconds" in
  '' | *[!0-9]*) echo "usage: $0 [SECONDS_PER_PHASE] (a whole number, default 30)" >&2; exit 2 ;;
esac
if [ "$seconds" -lt 2 ]; then
  echo "SECONDS_PER_PHASE must be at least 2" >&2
  exit 2
fi

source scripts/lib/deps.sh
ensure_commands redis-server:redis-server nats-server:nats-server
need cargo || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }

echo "== building (release) and running the checker: ${seconds} s per phase, 6 phases"
COHERENCE_SECONDS="$seconds" cargo test --release --test integration \
  -- --ignored --exact checker::coherence_check_long --nocapture
