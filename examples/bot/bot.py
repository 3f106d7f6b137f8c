#!/usr/bin/env python3
"""A small asyncio trading bot that reads its market data through nearcache.

It does what a real bot's hot loop does, with redis-py's `redis.asyncio`:

- readers (``--readers``, concurrent tasks) read, symbol after symbol, the
  ticker (``GET ticker:<SYM>``, a string), the top of the order book
  (``HMGET orderbook:<SYM> bid ask bid_size ask_size``, a hash), the
  still-forming one-minute candles (``LRANGE candles:<SYM>:1m``) and the
  five-minute ones (``LRANGE candles:<SYM>:5m``), both lists — the rules of
  examples/trading.toml: tickers 2 s with refresh-ahead, order books 500 ms,
  ``candles:*:1m`` 1 s, other candles 60 s;
- from them each reader now and then writes a signal (``SET signal:<SYM>``,
  30 s in L1) and reads the latest one back;
- a feeder (``--feed-rate`` writes a second, 0 for none) moves tickers and
  order books and appends one-minute candles, so the cache is invalidated
  all the time — here and, over NATS, on every other sidecar;
- ``--seed`` writes a starting data set first (what a market-data service
  would have written).

Every second it prints one line::

    bot t=3 reads/s=5234 p50_ms=0.18 p99_ms=0.61 hit_ratio=0.982 writes/s=21 signals/s=9

``hit_ratio`` is nearcache's L1 hit ratio over that second, from the
``nearcache_l1_hits`` / ``nearcache_l1_misses`` counters of ``INFO nearcache``
(answered by the sidecar itself); ``n/a`` when the server is a plain Redis.
At the end (``--seconds N``, or SIGINT/SIGTERM) it prints a ``bot total`` line
and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

DEFAULT_SYMBOLS = "BTCUSDT,ETHUSDT,SOLUSDT,BNBUSDT,XRPUSDT"
BASE_PRICE = {"BTCUSDT": 97000.0, "ETHUSDT": 3600.0, "SOLUSDT": 210.0, "BNBUSDT": 690.0, "XRPUSDT": 2.3}
CANDLES_KEPT = 60


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="asyncio trading bot reading through a nearcache sidecar")
    p.add_argument("--url", default="redis://127.0.0.1:6380",
                   help="the sidecar (default redis://127.0.0.1:6380)")
    p.add_argument("--seconds", type=float, default=0,
                   help="run this long, then exit 0 (default 0: until SIGINT/SIGTERM)")
    p.add_argument("--symbols", default=DEFAULT_SYMBOLS,
                   help=f"comma-separated symbols (default {DEFAULT_SYMBOLS})")
    p.add_argument("--seed", action="store_true",
                   help="write tickers, order books and candles for every symbol first")
    p.add_argument("--feed-rate", type=float, default=20,
                   help="market-data writes a second by the feeder task (default 20; 0: no feeder)")
    p.add_argument("--readers", type=int, default=4, help="concurrent reader tasks (default 4)")
    p.add_argument("--name", default="bot", help="CLIENT SETNAME (the per-bot write limit keys on it)")
    p.add_argument("--connect-timeout", type=float, default=30,
                   help="how long to wait for the sidecar at start (default 30 s)")
    args = p.parse_args(argv)
    args.symbols = [s.strip().upper() for s in args.symbols.split(",") if s.strip()]
    if not args.symbols:
        p.error("--symbols: at least one symbol")
    if args.readers < 1:
        p.error("--readers: at least 1")
    return args


def price_of(sym: str) -> float:
    return BASE_PRICE.get(sym, 100.0)


def candle(price: float, rng: random.Random) -> str:
    """One OHLCV candle as the JSON string a list element holds."""
    o = price * (1 + rng.uniform(-0.002, 0.002))
    c = price
    return json.dumps({"t": int(time.time()), "o": round(o, 4), "h": round(max(o, c) * 1.001, 4),
                       "l": round(min(o, c) * 0.999, 4), "c": round(c, 4),
                       "v": round(rng.uniform(1, 50), 3)})


def book(price: float, rng: random.Random) -> dict[str, str]:
    spread = price * 0.0001
    return {"bid": f"{price - spread:.4f}", "ask": f"{price + spread:.4f}",
            "bid_size": f"{rng.uniform(0.1, 5):.3f}", "ask_size": f"{rng.uniform(0.1, 5):.3f}"}


class Stats:
    """Counters and latency samples of the current second (reset by the printer)."""

    def __init__(self) -> None:
        self.latencies_us: list[float] = []
        self.writes = 0
        self.signals = 0
        self.errors = 0
        self.total_reads = 0
        self.total_writes = 0
        self.total_errors = 0

    def take(self) -> tuple[list[float], int, int, int]:
        lat, w, s, e = self.latencies_us, self.writes, self.signals, self.errors
        self.latencies_us, self.writes, self.signals, self.errors = [], 0, 0, 0
        return lat, w, s, e


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


async def l1_counters(r: aioredis.Redis) -> tuple[int, int] | None:
    """(hits, misses) from nearcache's INFO section; None from a plain Redis."""
    info = await r.info("nearcache")
    if "nearcache_l1_hits" not in info:
        return None
    return int(info["nearcache_l1_hits"]), int(info["nearcache_l1_misses"])


async def wait_for_server(r: aioredis.Redis, timeout: float) -> None:
    """Retries PING until the sidecar answers (it may start after the bot)."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            await r.ping()
            return
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            if time.monotonic() >= deadline:
                raise SystemExit(f"bot: no answer from the server within {timeout:g} s: {e}") from e
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


async def seed(r: aioredis.Redis, symbols: list[str]) -> None:
    rng = random.Random(1)
    async with r.pipeline(transaction=False) as p:
        for sym in symbols:
            price = price_of(sym)
            p.set(f"ticker:{sym}", f"{price:.4f}")
            p.hset(f"orderbook:{sym}", mapping=book(price, rng))
            for tf in ("1m", "5m"):
                key = f"candles:{sym}:{tf}"
                p.delete(key)
                p.rpush(key, *[candle(price, rng) for _ in range(CANDLES_KEPT)])
        await p.execute()
    print(f"bot seeded {len(symbols)} symbols: ticker:, orderbook:, candles:<SYM>:1m/5m", flush=True)


async def feeder(r: aioredis.Redis, symbols: list[str], rate: float, stats: Stats,
                 stop: asyncio.Event) -> None:
    """Market data at `rate` writes a second: mostly tickers, some order books
    and candles. Paced by the clock, so a slow server lowers, never bursts, it."""
    rng = random.Random(2)
    prices = {sym: price_of(sym) for sym in symbols}
    interval = 1.0 / rate
    next_at = time.monotonic()
    n = 0
    while not stop.is_set():
        sym = symbols[n % len(symbols)]
        prices[sym] *= 1 + rng.gauss(0, 0.0005)
        price = prices[sym]
        kind = n // len(symbols)  # each round of the symbols writes one kind
        try:
            if kind % 10 == 9:
                async with r.pipeline(transaction=False) as p:
                    p.rpush(f"candles:{sym}:1m", candle(price, rng))
                    p.ltrim(f"candles:{sym}:1m", -CANDLES_KEPT, -1)
                    await p.execute()
            elif kind % 4 == 3:
                await r.hset(f"orderbook:{sym}", mapping=book(price, rng))
            else:
                await r.set(f"ticker:{sym}", f"{price:.4f}")
            stats.writes += 1
            stats.total_writes += 1
        except RedisError as e:  # a lost connection, a limit's -ERR: counted, not fatal
            stats.errors += 1
            stats.total_errors += 1
            print(f"bot feeder: {e}", file=sys.stderr, flush=True)
            next_at = time.monotonic() + 0.5  # back off: one complaint per half second
        n += 1
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                pass
        else:
            next_at = time.monotonic()  # behind: don't catch up in a burst


async def reader(r: aioredis.Redis, symbols: list[str], stats: Stats, stop: asyncio.Event,
                 index: int) -> None:
    rng = random.Random(100 + index)
    clock = time.perf_counter
    last_signal: dict[str, float] = {}
    while not stop.is_set():
        sym = symbols[rng.randrange(len(symbols))]
        try:
            t = clock()
            ticker = await r.get(f"ticker:{sym}")
            t2 = clock()
            top = await r.hmget(f"orderbook:{sym}", "bid", "ask", "bid_size", "ask_size")
            t3 = clock()
            one_min = await r.lrange(f"candles:{sym}:1m", -5, -1)
            t4 = clock()
            five_min = await r.lrange(f"candles:{sym}:5m", -12, -1)
            t5 = clock()
            stats.latencies_us.extend(((t2 - t) * 1e6, (t3 - t2) * 1e6, (t4 - t3) * 1e6, (t5 - t4) * 1e6))
            stats.total_reads += 4
            # A toy strategy: price against the mean close of recent candles,
            # filtered by the book's imbalance. One signal per symbol and
            # reader a second at most.
            now = time.monotonic()
            if ticker is not None and one_min and now - last_signal.get(sym, 0.0) >= 1.0:
                last_signal[sym] = now
                closes = [json.loads(c)["c"] for c in (*five_min, *one_min)]
                mean = sum(closes) / len(closes)
                bid_size, ask_size = (float(top[2] or 0), float(top[3] or 0))
                side = "buy" if float(ticker) > mean and bid_size >= ask_size else (
                    "sell" if float(ticker) < mean and ask_size >= bid_size else "hold")
                await r.set(f"signal:{sym}", json.dumps({"side": side, "price": ticker, "mean": round(mean, 4),
                                                         "at": time.time()}))
                t = clock()
                await r.get(f"signal:{sym}")
                stats.latencies_us.append((clock() - t) * 1e6)
                stats.total_reads += 1
                stats.signals += 1
        except RedisError as e:
            stats.errors += 1
            stats.total_errors += 1
            print(f"bot reader {index}: {e}", file=sys.stderr, flush=True)
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass


async def printer(r: aioredis.Redis, stats: Stats, stop: asyncio.Event, totals: dict) -> None:
    """Once a second: reads/s, p50/p99 and the L1 hit ratio of that second."""
    try:
        prev = await l1_counters(r)
    except RedisError:
        prev = None
    if prev is not None:
        totals["first"] = prev
    prev_t = time.monotonic()
    tick = 0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            pass
        now = time.monotonic()
        lat, writes, signals, errors = stats.take()
        try:
            cur = await l1_counters(r)
        except RedisError:
            cur = None
        elapsed = max(now - prev_t, 1e-6)
        prev_t = now
        tick += 1
        lat.sort()
        ratio = "n/a"
        if cur is not None and prev is not None:
            hits, misses = cur[0] - prev[0], cur[1] - prev[1]
            if hits + misses > 0:
                ratio = f"{hits / (hits + misses):.3f}"
        if cur is not None:
            prev = cur
            totals.setdefault("first", cur)
            totals["last"] = cur
        print(f"bot t={tick} reads/s={len(lat) / elapsed:.0f} p50_ms={percentile(lat, 0.50) / 1000:.3f} "
              f"p99_ms={percentile(lat, 0.99) / 1000:.3f} hit_ratio={ratio} "
              f"writes/s={writes / elapsed:.0f} signals/s={signals / elapsed:.0f}"
              + (f" errors={errors}" if errors else ""), flush=True)


async def main(argv: list[str]) -> int:
    args = parse_args(argv)
    r = aioredis.Redis.from_url(args.url, decode_responses=True, client_name=args.name,
                                max_connections=args.readers + 4, socket_timeout=5,
                                socket_connect_timeout=2)
    try:
        await wait_for_server(r, args.connect_timeout)
        if args.seed:
            await seed(r, args.symbols)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        stats = Stats()
        totals: dict = {}
        started = time.monotonic()
        tasks = [asyncio.create_task(reader(r, args.symbols, stats, stop, i)) for i in range(args.readers)]
        if args.feed_rate > 0:
            tasks.append(asyncio.create_task(feeder(r, args.symbols, args.feed_rate, stats, stop)))
        tasks.append(asyncio.create_task(printer(r, stats, stop, totals)))
        if args.seconds > 0:
            try:
                await asyncio.wait_for(stop.wait(), args.seconds)
            except asyncio.TimeoutError:
                pass
        else:
            await stop.wait()
        stop.set()
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
        first, last = totals.get("first"), totals.get("last")
        ratio = "n/a"
        if first and last and (last[0] - first[0]) + (last[1] - first[1]) > 0:
            hits, misses = last[0] - first[0], last[1] - first[1]
            ratio = f"{hits / (hits + misses):.3f}"
        print(f"bot total seconds={elapsed:.1f} reads={stats.total_reads} "
              f"reads/s={stats.total_reads / elapsed:.0f} writes={stats.total_writes} "
              f"hit_ratio={ratio} errors={stats.total_errors}", flush=True)
        return 0
    finally:
        await r.aclose()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
