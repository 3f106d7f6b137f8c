#!/usr/bin/env bash
# The coherence staleness checker, long: one redis-server, one nats-server and
# three nearcache binaries (release build) under concurrent writers and
# readers, in three phases of SECONDS each (default 30): healthy, NATS killed
# and restarted mid-run, one proxy paused (SIGSTOP ~1 s) and resumed. Prints
# each phase's report (reads, writes, read-your-writes violations, stale reads
# beyond the 100 ms bound, propagation delay p50/p99/max) and fails if an
# invariant is broken. See tests/integration/checker.rs.
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

echo "== building (release) and running the checker: ${seconds} s per phase, 3 phases"
COHERENCE_SECONDS="$seconds" cargo test --release --test integration \
  -- --ignored --exact checker::coherence_check_long --nocapture
