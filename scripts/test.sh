#!/usr/bin/env bash
# The one entry point for checks; developers and CI (.ci/run) both run it.
# Installs what the tests need on Debian when missing (Debian packages —
# chromium for the dashboard test, prometheus for promtool, python3-venv —
# the Python packages of scripts/requirements.txt into the project-local
# .venv (never the system Python), ioredis), then: rustfmt check, clippy and
# rustdoc with warnings as errors, and every test (unit, integration against
# real redis-server/nats-server processes, end-to-end with the built binary).
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/lib/deps.sh
ensure_commands redis-server:redis-server redis-cli:redis-tools \
    redis-benchmark:redis-tools nats-server:nats-server openssl:openssl \
    node:nodejs npm:npm promtool:prometheus chromium:chromium
need cargo || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
need python3 || { echo "python3 not found: apt-get install -y python3 python3-venv" >&2; exit 1; }

# Python packages (redis-py for the client compatibility test, PyYAML and the
# validators for scripts/test-examples.sh, matplotlib for the bench plots):
# a project-local .venv, installed again whenever scripts/requirements.txt
# differs from what was installed. The tests find it through NEARCACHE_PYTHON.
source scripts/lib/venv.sh
ensure_venv
export NEARCACHE_PYTHON=$VENV_PYTHON

# ioredis, pinned by tests/node/package-lock.json; installed again whenever
# the lock file is newer than what is installed.
if [[ ! -d tests/node/node_modules/ioredis \
      || tests/node/package-lock.json -nt tests/node/node_modules/.package-lock.json ]]; then
  echo "== installing ioredis (npm ci in tests/node), for the client compatibility test"
  npm ci --prefix tests/node --no-audit --no-fund --loglevel=error \
    || { echo "could not install ioredis: cd tests/node && npm ci" >&2; exit 1; }
fi

echo "== promtool check rules / test rules (deploy/prometheus)"
promtool check rules deploy/prometheus/alerts.yml
(cd deploy/prometheus && promtool test rules alerts_test.yml)
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings
echo "== cargo doc (broken links are errors; private items included: the layout table links every module)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --document-private-items --quiet
echo "== cargo test"
cargo test --quiet
