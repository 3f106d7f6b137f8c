#!/usr/bin/env bash
# Coherence bus benchmark: invalidation delay across three nearcache
# instances, invalidation throughput, and write throughput with and without
# the bus, in one run on loopback. Prints Markdown tables for
# benches/RESULTS.md. Details and phases: scripts/bench-bus.py.
#
# Usage: scripts/bench-bus.sh
# Env:   ROUNDS=3  N_LIGHT=20000  N_P1=200000  N_P16=1000000
#        BATCH_DELAY=1ms   [coherence] batch_delay for every instance (default:
#                          the config default)
#        BATCH_MAX_KEYS=N  [coherence] batch_max_keys likewise
#        PHASES="sparse light all load"   PIPELINES="1 16" (load phase)
#        NATS_GOMAXPROCS=1 GOMAXPROCS for nats-server (default: Go's, all cores)
#
# Needs: cargo, python3, redis-server, redis-benchmark and nats-server
# (installed with apt-get if missing); redis-py goes into the project's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/lib/deps.sh
ensure_commands redis-server:redis-server redis-benchmark:redis-tools nats-server:nats-server
source scripts/lib/venv.sh
ensure_venv

echo "bench-bus.sh: building: cargo build --release" >&2
cargo build --release --quiet
target_dir=$(cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
NEARCACHE=$target_dir/release/nearcache exec "$VENV_PYTHON" scripts/bench-bus.py
