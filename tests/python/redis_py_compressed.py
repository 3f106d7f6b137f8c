"""redis-py through nearcache with `store_compressed` on `cz:` (threshold
256 bytes): what the application writes it reads back, in pipelines and
transactions, while Redis holds the values compressed.

Run by tests/integration/clients.rs as
`python3 redis_py_compressed.py PROXY_PORT REDIS_PORT`; exits non-zero with
the failing check's message.
"""
import json
import sys

import redis

MAGIC = b"\x00NZ\x01"


def book(i: int) -> bytes:
    levels = [[f"{64250 + i - k * 0.1:.2f}", f"{0.013 * ((k * 37 + i) % 101 + 1):.4f}"] for k in range(25)]
    return json.dumps({"symbol": "BTCUSDT", "seq": i, "bids": levels, "asks": levels[::-1]}).encode()


def main(proxy_port: int, redis_port: int) -> None:
    p = redis.Redis(host="127.0.0.1", port=proxy_port)
    d = redis.Redis(host="127.0.0.1", port=redis_port)

    with p.pipeline(transaction=False) as pipe:
        for i in range(200):
            pipe.set(f"cz:{i}", book(i))
        pipe.get("cz:199")
        out = pipe.execute()
    assert out[-1] == book(199), "GET pipelined behind the SETs"
    stored = d.get("cz:7")
    assert stored.startswith(MAGIC) and len(stored) < len(book(7)) // 2, len(stored)

    assert p.mget([f"cz:{i}" for i in range(200)]) == [book(i) for i in range(200)]
    for _ in range(2):  # a miss, then L1 hits
        assert p.get("cz:3") == book(3)
    assert p.getset("cz:3", book(300)) == book(3)
    assert p.getex("cz:3", ex=60) == book(300)
    assert p.getdel("cz:3") == book(300) and d.exists("cz:3") == 0

    with p.pipeline(transaction=True) as pipe:
        pipe.set("cz:tx", book(5)).get("cz:tx").mget(["cz:1", "cz:2"])
        assert pipe.execute() == [True, book(5), [book(1), book(2)]]

    try:
        p.append("cz:1", "x")
        raise AssertionError("APPEND on a compressed value was not refused")
    except redis.ResponseError as e:
        assert "store_compressed" in str(e), e
    assert p.get("cz:1") == book(1)
    print("ok: 200 order books written and read back; Redis holds them compressed")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
