#!/usr/bin/env bash
# What TLS and ACL checks cost, each against the same build without them in
# the same run (scripts/bench-ab.sh): L1-hit GET and forwarded SET at
# pipeline 1 and 16, plain against TLS on the client side; and GET with a
# user of a dozen key patterns (the matching one last) against no users.
#
# Usage: scripts/bench-security.sh [BINARY]   (default target/release/nearcache)
# Env:   N=200000 ROUNDS=3 CLIENTS=50 (passed on to bench-ab.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/nearcache}
[[ -x $bin ]] || cargo build --release
source scripts/lib/deps.sh
ensure_commands openssl:openssl
export N=${N:-200000} ROUNDS=${ROUNDS:-3}

work=$(mktemp -d "${TMPDIR:-/tmp}/nearcache-sec.XXXXXX")
trap 'rm -rf "$work"' EXIT
(
    cd "$work"
    openssl ecparam -name prime256v1 -genkey -noout -out ca.key
    openssl req -x509 -new -key ca.key -out ca.crt -days 2 -subj /CN=bench-ca 2>/dev/null
    openssl ecparam -name prime256v1 -genkey -noout -out server.key
    openssl req -new -key server.key -out server.csr -subj /CN=127.0.0.1 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1\n' >ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
        -out server.crt -days 2 -extfile ext 2>/dev/null
)
# redis-benchmark's keys are key:__rand_int__: cached, so GETs are L1 hits
# after the first round's fills; SETs always go upstream.
rule=$'[[cache.rules]]\nprefix = "key:"\nttl = "60s"\n'
printf '%s' "$rule" >"$work/plain.toml"
printf '%s[server.tls]\ncert_file = "%s/server.crt"\nkey_file = "%s/server.key"\n' \
    "$rule" "$work" "$work" >"$work/tls.toml"
{
    printf '%s' "$rule"
    printf '[[users]]\nname = "default"\nnopass = true\ncommands = "+@all"\nkeys = "'
    for p in ticker book candles signal orders fills pos risk funding oi liq; do
        printf '%%R~%s:* ' "$p"
    done
    printf '~key:*"\n'
} >"$work/acl.toml"
"$bin" check-config "$work/acl.toml" >/dev/null

export TLS_CA=$work/ca.crt
for t in get set; do
    for p in 1 16; do
        echo "== T=$t P=$p: plain against TLS"
        T=$t P=$p scripts/bench-ab.sh "$bin@$work/plain.toml" "$bin@$work/tls.toml"
    done
done
for p in 1 16; do
    echo "== T=get P=$p: no users against a user with 12 key patterns"
    T=get P=$p scripts/bench-ab.sh "$bin@$work/plain.toml" "$bin@$work/acl.toml"
done
