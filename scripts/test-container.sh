#!/usr/bin/env bash
# Builds the image's runtime stage with podman and runs it: redis-cli through
# the container (SET/GET, an L1 hit in PROXY STATS), the HEALTHCHECK turning
# healthy, SIGTERM with a graceful drain and exit 0.
#
# This machine cannot pull registry images and the Rust builder stage needs
# one, so the runtime stage (`runtime-prebuilt`) gets a binary built on the
# host (NEARCACHE_BIN, else target/release/nearcache if built, else a debug
# `cargo build --bin nearcache`, which scripts/test.sh has already made), on
# a bookworm base made once with debootstrap and cached as $BASE_IMAGE.
# Podman needs, on this VM: runc (crun refuses hybrid cgroups), no default
# ulimits (containers.conf), host networking, loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/deps.sh
ensure_commands podman:podman runc:runc debootstrap:debootstrap \
    redis-server:redis-server redis-cli:redis-tools
BASE_IMAGE=${BASE_IMAGE:-localhost/nearcache-base:bookworm}
IMAGE=localhost/nearcache:test
t0=$SECONDS
work=$(mktemp -d)
name=nearcache-test-$$
redis_pid=
cleanup() {
  podman "${PODMAN_ARGS[@]}" rm -f -t 0 "$name" >/dev/null 2>&1 || true
  [[ -n $redis_pid ]] && kill "$redis_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
printf '[containers]\ndefault_ulimits = []\n' >"$work/containers.conf"
export CONTAINERS_CONF=$work/containers.conf
PODMAN_ARGS=(--runtime runc)
pm() { podman "${PODMAN_ARGS[@]}" "$@"; }
fail() { echo "test-container: FAIL: $*" >&2; pm logs "$name" 2>&1 | tail -20 >&2 || true; exit 1; }

# 1. The base image, once.
if pm image exists "$BASE_IMAGE"; then
  echo "== base image $BASE_IMAGE (cached)"
else
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [[ -n $mirror ]] || mirror=$(awk '$1=="deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  echo "== debootstrap --variant=minbase bookworm ($mirror), then podman import as $BASE_IMAGE"
  t=$SECONDS
  debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; fail "debootstrap"; }
  tar -C "$work/rootfs" -c . | pm import - "$BASE_IMAGE" >/dev/null
  rm -rf "$work/rootfs"
  echo "   base image made in $((SECONDS - t)) s"
fi

# 2. The binary and the image (runtime-prebuilt: no builder stage).
bin=${NEARCACHE_BIN:-}
if [[ -z $bin ]]; then
  if [[ -x target/release/nearcache ]]; then bin=target/release/nearcache
  else cargo build --bin nearcache; bin=target/debug/nearcache; fi
fi
mkdir -p target/container
strip -o target/container/nearcache "$bin"   # the debug info stays out of the image
echo "== podman build --target runtime-prebuilt (binary: $bin)"
t=$SECONDS
pm build --isolation chroot --format docker --target runtime-prebuilt \
  --build-arg BASE="$BASE_IMAGE" --build-arg BINARY=target/container/nearcache \
  -t "$IMAGE" . >"$work/build.log" 2>&1 || { tail -30 "$work/build.log" >&2; fail "podman build"; }
echo "   built in $((SECONDS - t)) s"
[[ $(pm image inspect --format '{{.Config.StopSignal}}' "$IMAGE") == SIGTERM ]] || fail "STOPSIGNAL is not SIGTERM"
[[ $(pm image inspect --format '{{.Config.User}}' "$IMAGE") == nearcache:nearcache ]] || fail "image does not run as nearcache"
pm image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE" | grep -q nearcache-healthcheck || fail "no HEALTHCHECK"

# 3. A Redis of our own and the container, on free loopback ports.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rport=$(free_port); port=$(free_port); aport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" >"$work/redis.log" 2>&1 &
redis_pid=$!
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "timed out waiting for $what"
    sleep 0.1
  done
}
wait_for 10 "redis-server" redis-cli -p "$rport" PING
echo "== podman run --network host (nearcache 127.0.0.1:$port, admin :$aport, Redis :$rport)"
pm run -d --name "$name" --network host \
  -e NEARCACHE_LISTEN="127.0.0.1:$port" -e NEARCACHE_ADMIN="127.0.0.1:$aport" \
  -e NEARCACHE_UPSTREAM="redis://127.0.0.1:$rport" -e NEARCACHE_HEALTH_ADDR="127.0.0.1:$aport" \
  "$IMAGE" >/dev/null 2>"$work/run.err" # (its complaint: no systemd for health timers)
wait_for 20 "nearcache in the container" redis-cli -p "$port" PING
cli() { redis-cli -p "$port" "$@"; }
[[ $(cli SET ticker:BTCUSDT 97123.5) == OK ]] || fail "SET"
[[ $(cli GET ticker:BTCUSDT) == 97123.5 ]] || fail "GET (miss)"
[[ $(cli GET ticker:BTCUSDT) == 97123.5 ]] || fail "GET (hit)"
hits=$(cli INFO nearcache | tr -d '\r' | awk -F: '$1=="nearcache_l1_hits" {print $2}')
((hits >= 1)) || fail "no L1 hit (nearcache_l1_hits=$hits)"
cli PROXY STATS | grep -qx hits || fail "PROXY STATS has no hits"
echo "   SET/GET through the container; L1 hits: $hits"

# 4. Health: no systemd timers here, so run the check ourselves until healthy.
healthy() { pm healthcheck run "$name" && [[ $(pm inspect --format '{{.State.Health.Status}}' "$name") == healthy ]]; }
wait_for 30 "health status healthy" healthy
echo "   health: $(pm inspect --format '{{.State.Health.Status}}' "$name")"

# 5. SIGTERM (the image's STOPSIGNAL): graceful drain, exit 0 well before the kill.
t=$SECONDS
pm stop -t 20 "$name" >/dev/null 2>"$work/stop.err"
code=$(pm inspect --format '{{.State.ExitCode}}' "$name")
[[ $code == 0 ]] || fail "exit status $code after SIGTERM"
logs=$(pm logs "$name" 2>&1)
grep -q 'shutting down: finishing in-flight requests' <<<"$logs" || fail "no drain line in the log"
grep -q 'nearcache: bye' <<<"$logs" || fail "no 'bye' in the log"
echo "   stopped by SIGTERM in $((SECONDS - t)) s, exit 0, drained"
echo "test-container: ok ($((SECONDS - t0)) s)"
