"""redis-py through nearcache: the client a Python trading bot would use.

Run by tests/integration/python.rs as `python3 redis_py_compat.py PROXY_PORT REDIS_PORT`;
exits non-zero with the failing check's message. Each check compares what the
proxy answers with what Redis holds or answers directly.
"""
import sys
import threading
import time

import redis


def main(proxy_port: int, redis_port: int) -> None:
    p = redis.Redis(host="127.0.0.1", port=proxy_port)
    d = redis.Redis(host="127.0.0.1", port=redis_port)

    # Strings, binary-safe values, expiry.
    blob = bytes(range(256)) * 4
    assert p.set("py:blob", blob) is True
    assert p.get("py:blob") == blob == d.get("py:blob")
    p.set("py:ttl", "v", px=60_000)
    assert 0 < d.pttl("py:ttl") <= 60_000

    # Pipelines, with and without MULTI.
    with p.pipeline(transaction=False) as pipe:
        for i in range(1000):
            pipe.set(f"py:k{i}", i)
        pipe.get("py:k999")
        out = pipe.execute()
    assert out[-1] == b"999" and all(r is True for r in out[:-1])
    with p.pipeline(transaction=True) as pipe:
        pipe.incr("py:counter").incr("py:counter")
        assert pipe.execute() == [1, 2]

    # WATCH conflict: another client's write aborts the transaction.
    with p.pipeline() as pipe:
        pipe.watch("py:watched")
        d.set("py:watched", "changed")
        pipe.multi()
        pipe.set("py:watched", "mine")
        try:
            pipe.execute()
            raise AssertionError("WATCH conflict did not abort EXEC")
        except redis.WatchError:
            pass
    assert d.get("py:watched") == b"changed"

    # Lua scripts (EVALSHA with fallback to EVAL, as redis-py does).
    incr_by = p.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert incr_by(keys=["py:lua"], args=[5]) == 5
    assert incr_by(keys=["py:lua"], args=[5]) == 10

    # Pub/sub: a message published by another client arrives.
    sub = p.pubsub()
    sub.subscribe("py:chan")
    assert sub.get_message(timeout=5)["type"] == "subscribe"
    p.publish("py:chan", "tick")
    msg = sub.get_message(timeout=5)
    assert msg and msg["type"] == "message" and msg["data"] == b"tick", msg
    sub.close()

    # Blocking pop released by another client.
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("v", p.blpop("py:queue", timeout=10)))
    t.start()
    deadline = time.monotonic() + 10
    while d.info("clients")["blocked_clients"] == 0:
        assert t.is_alive() and time.monotonic() < deadline, "BLPOP never blocked in Redis"
        time.sleep(0.01)  # polling Redis's state, bounded by the deadline
    d.rpush("py:queue", "job")
    t.join(timeout=10)
    assert got.get("v") == (b"py:queue", b"job"), got

    # RESP3 (HELLO 3): maps and sets arrive as Python dicts and sets.
    p3 = redis.Redis(host="127.0.0.1", port=proxy_port, protocol=3)
    p3.hset("py:hash", mapping={"bid": "1", "ask": "2"})
    assert p3.hgetall("py:hash") == {b"bid": b"1", b"ask": b"2"}
    p3.sadd("py:set", "a", "b")
    assert p3.smembers("py:set") == {b"a", b"b"}
    assert p3.zadd("py:z", {"m": 1.5}) == 1 and p3.zscore("py:z", "m") == 1.5

    # SELECT through a connection pool bound to db 2.
    p2 = redis.Redis(host="127.0.0.1", port=proxy_port, db=2)
    p2.set("py:db2", "x")
    assert redis.Redis(host="127.0.0.1", port=redis_port, db=2).get("py:db2") == b"x"
    assert d.get("py:db2") is None

    print("redis-py checks passed")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
