#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a fixed time and fails if any of
# them finds a crash (a panic, a failed assertion, a timeout or an OOM).
#
# Usage: scripts/fuzz.sh [SECONDS]        (default 60 seconds per target)
# Env:   TARGETS="parse_commands config"  only these targets
#        FUZZ_ARGS="-max_len=65536"       extra libFuzzer flags
#
# Needs: Rust (stable is enough: `-s none` builds without a sanitizer, see
# shared/PITFALLS.md) and cargo-fuzz, which this script installs if missing.
# New corpus entries land in fuzz/corpus/<target>/ (git ignores all but the
# seed-* files); a crashing input lands in fuzz/artifacts/<target>/, and the
# target's log in fuzz/artifacts/<target>.log. Reproduce a crash with
#   cargo fuzz run -s none <target> fuzz/artifacts/<target>/crash-…
set -euo pipefail
cd "$(dirname "$0")/.."

duration=${1:-60}
if ! [[ $duration =~ ^[0-9]+$ ]] || ((duration == 0)); then
    echo "usage: $0 [SECONDS]   (seconds per target, a positive integer)" >&2
    exit 2
fi

if ! command -v cargo >/dev/null; then
    echo "fuzz.sh: cargo not found; install Rust from https://rustup.rs" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz missing; installing it (cargo install cargo-fuzz)" >&2
    cargo install --locked cargo-fuzz
fi

targets=${TARGETS:-$(cargo fuzz list)}
# Build before the clock starts, so the time budget is spent fuzzing.
for target in $targets; do
    cargo fuzz build -s none "$target"
done

mkdir -p fuzz/artifacts
failed=()
for target in $targets; do
    log=fuzz/artifacts/$target.log
    echo "== $target: ${duration}s (log: $log)"
    # shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags
    if cargo fuzz run -s none "$target" -- \
        -max_total_time="$duration" -print_final_stats=1 ${FUZZ_ARGS:-} >"$log" 2>&1; then
        grep -E '^#[0-9]+ +DONE' "$log" | tail -n 1 || true
        grep -E '^stat::number_of_executed_units' "$log" || true
    else
        failed+=("$target")
        echo "!! $target FAILED:"
        grep -E -A1 -m2 'panicked at|==[0-9]+== ERROR|^SUMMARY' "$log" || tail -n 40 "$log"
        grep -E 'Test unit written to' "$log" || true
    fi
done

if ((${#failed[@]})); then
    echo "fuzz.sh: crashes found in: ${failed[*]} (inputs in fuzz/artifacts/<target>/)" >&2
    exit 1
fi
echo "fuzz.sh: no crashes in $(wc -w <<<"$targets") targets, ${duration}s each"
