#!/usr/bin/env bash
# CI smoke test of examples/loadgen (< 15 s once built): 2 s of
# get=80,set=10,hgetall=10 against its own redis-server directly and through
# nearcache; fails on any error reply or when nearcache served no L1 hits.
#
#   scripts/test-loadgen.sh
#   NEARCACHE_BIN=target/debug/nearcache scripts/test-loadgen.sh   # skip the build
#
# Creates .venv (python3 -m venv) and installs scripts/requirements.txt into
# it when missing. Without NEARCACHE_BIN it builds with cargo build --release.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "test-loadgen.sh: $*" >&2; }
die() { log "$*"; exit 1; }

command -v python3 >/dev/null || die "python3 not found: apt-get install -y python3 python3-venv"
source scripts/lib/deps.sh
ensure_commands redis-server:redis-server

if [[ ! -x .venv/bin/python ]] || ! .venv/bin/python -c 'import matplotlib, redis, yaml' 2>/dev/null; then
    log "setting up .venv from scripts/requirements.txt"
    python3 -m venv .venv || die "python3 -m venv failed: apt-get install -y python3-venv"
    .venv/bin/pip install -q -r scripts/requirements.txt
fi

if [[ -z ${NEARCACHE_BIN:-} ]]; then
    command -v cargo >/dev/null || die "cargo not found: curl https://sh.rustup.rs -sSf | sh (or set NEARCACHE_BIN)"
    log "building: cargo build --release"
    cargo build --release
    target_dir=$(cargo metadata --format-version 1 --no-deps \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
    export NEARCACHE_BIN=$target_dir/release/nearcache
fi
[[ -x $NEARCACHE_BIN ]] || die "NEARCACHE_BIN=$NEARCACHE_BIN is not an executable"

start=$SECONDS
.venv/bin/python examples/loadgen/loadgen.py --smoke
log "ok in $((SECONDS - start)) s"
