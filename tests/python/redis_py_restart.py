"""redis-py with its standard Retry, through nearcache, across a Redis restart.

Usage: redis_py_restart.py PROXY_PORT. Writes and reads keys; prints
"ready" once warm, then the test restarts Redis. Every command must succeed
(redis-py retries what nearcache closes, as it would for Redis itself)
and every read returns what was written, except that the one write
acknowledged by the old server just before it went is lost with it (Redis
restarts empty), which is allowed only once INFO shows another run_id; the
run ends 200 commands after that, or fails after 20 s. Exit status 0 on success, 1 with the reason otherwise.
"""

import sys
import time

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

port = int(sys.argv[1])
r = redis.Redis(
    host="127.0.0.1",
    port=port,
    retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), 8),
    socket_timeout=5,
)


def run_id():
    return r.info("server")["run_id"]


def op(i):
    global lost
    key = f"rp:{i % 50}"
    r.set(key, str(i))
    got = r.get(key)
    if got == str(i).encode():
        return
    if got is None and not lost and run_id() != first:
        lost = True  # written to the old server, read from the new one
        return
    raise AssertionError(f"{key}: read {got!r} after writing {i}")


lost = False
first = run_id()
for i in range(200):
    op(i)
print("ready", flush=True)
deadline = time.monotonic() + 20
i, after = 200, None
while after is None or i < after + 200:
    if time.monotonic() > deadline:
        sys.exit(f"no restart seen within 20 s ({i} commands)")
    op(i)
    i += 1
    if after is None and i % 10 == 0 and run_id() != first:
        after = i
print(f"ok: {i} commands, the restart seen after {after - 200}", flush=True)
