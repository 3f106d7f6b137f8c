#!/bin/bash
# The image's HEALTHCHECK: GET /readyz on the admin listener, healthy on 200.
# bash's /dev/tcp, so the image needs no curl. NEARCACHE_HEALTH_ADDR (host:port,
# default 127.0.0.1:9180) must match admin.listen; with admin.token set, put the
# token in NEARCACHE_ADMIN_TOKEN (or NEARCACHE_ADMIN_TOKEN_FILE).
set -u
addr=${NEARCACHE_HEALTH_ADDR:-127.0.0.1:9180}
path=${NEARCACHE_HEALTH_PATH:-/readyz}
token=${NEARCACHE_ADMIN_TOKEN:-}
if [[ -z $token && -n ${NEARCACHE_ADMIN_TOKEN_FILE:-} ]]; then
  IFS= read -r token <"$NEARCACHE_ADMIN_TOKEN_FILE" || true
fi
exec 3<>"/dev/tcp/${addr%:*}/${addr##*:}" 2>/dev/null || { echo "cannot connect to $addr"; exit 1; }
auth=""
[[ -n $token ]] && auth="Authorization: Bearer $token"$'\r\n'
printf 'GET %s HTTP/1.1\r\nHost: %s\r\n%sConnection: close\r\n\r\n' "$path" "$addr" "$auth" >&3
IFS= read -r -t 2 status <&3 || { echo "no answer from $addr$path"; exit 1; }
# Show the body (readiness and why) in `podman/docker inspect`'s health log.
body=$(timeout 1 cat <&3 | tail -n 1)
echo "${status%$'\r'} ${body:0:300}"
[[ $status == "HTTP/1."?" 200"* ]]
