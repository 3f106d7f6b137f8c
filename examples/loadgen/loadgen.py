#!/usr/bin/env python3
"""Load generator: a configurable command mix against Redis directly and
through nearcache, side by side, optionally with Redis "at a distance"
behind examples/slow_link.

    examples/loadgen/loadgen.py --mix get=80,set=10,hgetall=10 --keys 1000 \\
        --clients 16 --seconds 10 --delay 0,1ms,5ms --plot benches/loadgen-latency.png

Unless given --redis-url / --nearcache-url it starts its own redis-server,
nearcache (with trading-like cache rules covering its keys) and, per delay,
a slow_link relay, all on free 127.0.0.1 ports, and stops them on exit.

The load path is plain asyncio (an asyncio.Protocol with a minimal RESP2
reply scanner), not redis-py: a client library's own per-command cost would
be measured as latency. Each client is closed-loop: it sends --pipeline
commands, waits for every reply, then sends the next batch; a command's
latency is from the write of its batch to the read that completed its reply.
All clients share one event loop, so latency includes waiting for the loop:
the same for both sides, and reported beside ops/s so a saturated client
shows (see README.md).

Exit status: 0 on success; 1 if any command got an error reply, if a
connection failed, or if the through-nearcache run had no L1 hits although
the mix has cacheable reads (what scripts/test-loadgen.sh checks).
"""

import argparse
import asyncio
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]
# Which ops read what L1 caches, and which key family each uses.
OPS = {
    "get": ("ticker:", True),
    "set": ("ticker:", False),
    "hgetall": ("orderbook:", True),
    "hget": ("orderbook:", True),
    "hset": ("orderbook:", False),
}
HASH_FIELDS = ("bid", "ask", "bid_size", "ask_size")
MAX_SECONDS = 600


def log(msg):
    print(f"loadgen: {msg}", file=sys.stderr, flush=True)


# --- arguments ---------------------------------------------------------------

def parse_mix(text):
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        name = name.strip().lower()
        if name not in OPS:
            raise argparse.ArgumentTypeError(f"unknown op {name!r} (have: {', '.join(OPS)})")
        try:
            w = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"weight of {name!r} must be a number, got {weight!r}")
        if w < 0:
            raise argparse.ArgumentTypeError(f"weight of {name!r} is negative")
        mix[name] = w
    if sum(mix.values()) <= 0:
        raise argparse.ArgumentTypeError("the mix has no positive weight")
    return mix


def parse_delay(text):
    """'0', '500us', '1ms', '5ms' -> (label, seconds)."""
    t = text.strip()
    if t in ("0", "0ms", "0us", "none"):
        return ("0", 0.0)
    for suffix, scale in (("us", 1e-6), ("ms", 1e-3)):
        if t.endswith(suffix):
            try:
                v = float(t[: -len(suffix)])
            except ValueError:
                break
            if v < 0:
                break
            return (t, v * scale)
    raise argparse.ArgumentTypeError(f"delay like 0, 500us, 1ms, 5ms; got {text!r}")


def parse_delays(text):
    return [parse_delay(t) for t in text.split(",") if t.strip()]


def host_port(url):
    """redis://host:port[/db] -> (host, port). Passwords are not supported here."""
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    if "@" in rest:
        raise SystemExit("loadgen: URLs with credentials are not supported")
    host, _, port = rest.rpartition(":")
    return (host or HOST, int(port or 6379))


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Drive a command mix against Redis directly and through nearcache; "
        "print ops/s and latency percentiles side by side.")
    p.add_argument("--mix", type=parse_mix, default=parse_mix("get=80,set=10,hgetall=10"),
                   help="op=weight,... of " + ", ".join(OPS) + " (default get=80,set=10,hgetall=10)")
    p.add_argument("--keys", type=int, default=1000,
                   help="keys per family (ticker:N strings, orderbook:N hashes), uniform (default 1000)")
    p.add_argument("--clients", type=int, default=16, help="concurrent connections (default 16)")
    p.add_argument("--pipeline", type=int, default=1, help="commands in flight per client (default 1)")
    p.add_argument("--seconds", type=float, default=10.0,
                   help=f"measured seconds per run, at most {MAX_SECONDS} (default 10)")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each run (default 1)")
    p.add_argument("--value-size", type=int, default=64, help="bytes per string value / per hash (default 64)")
    p.add_argument("--delay", type=parse_delays, default=[("0", 0.0)],
                   help="comma-separated delays Redis sits behind (examples/slow_link, each way), "
                   "e.g. 0,1ms,5ms (default 0)")
    p.add_argument("--redis-url", help="use this Redis instead of starting one (its keys "
                   "ticker:* and orderbook:* up to --keys are overwritten)")
    p.add_argument("--nearcache-url", help="use this nearcache instead of starting one "
                   "(then --delay must be 0: its upstream is what it is)")
    p.add_argument("--nearcache-bin", default=os.environ.get("NEARCACHE_BIN"),
                   help="nearcache binary (default $NEARCACHE_BIN, else cargo build --release)")
    p.add_argument("--slow-link-bin", default=os.environ.get("SLOW_LINK_BIN"),
                   help="slow_link binary (default $SLOW_LINK_BIN, else cargo build --release --example slow_link)")
    p.add_argument("--plot", help="write a PNG of p50/p99/p99.9, direct vs nearcache, per delay")
    p.add_argument("--seed", type=int, default=1, help="random seed of the op and key choices (default 1)")
    p.add_argument("--smoke", action="store_true",
                   help="a quick CI check: --seconds 2 --warmup 0.3 --clients 4 --keys 100 --delay 0 "
                   "unless given; fails without L1 hits")
    a = p.parse_args(argv)
    if a.smoke:
        given = set(x.split("=")[0] for x in argv)
        if "--seconds" not in given:
            a.seconds = 2.0
        if "--warmup" not in given:
            a.warmup = 0.3
        if "--clients" not in given:
            a.clients = 4
        if "--keys" not in given:
            a.keys = 100
    if not 0 < a.seconds <= MAX_SECONDS:
        p.error(f"--seconds must be in (0, {MAX_SECONDS}]")
    if not 0 <= a.warmup <= 60:
        p.error("--warmup must be in [0, 60]")
    for name in ("keys", "clients", "pipeline", "value_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.clients > 1000 or a.pipeline > 1000:
        p.error("--clients and --pipeline are capped at 1000")
    if a.nearcache_url and any(d > 0 for _, d in a.delay):
        p.error("--nearcache-url: the delay is wherever its upstream is; use --delay 0")
    return a


# --- processes -----------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Processes:
    """Child processes, each logging to a file in one temp dir; all stopped on close."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="nearcache-loadgen."))
        self.procs = []  # (name, Popen, log path)

    def start(self, name, argv):
        path = self.dir / f"{name}.log"
        f = open(path, "wb")
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        f.close()
        self.procs.append((name, proc, path))
        return proc

    def stop(self, proc):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def show_logs(self):
        for name, _, path in self.procs:
            try:
                lines = path.read_text(errors="replace").splitlines()[-20:]
            except OSError:
                continue
            log(f"--- last lines of {name}'s log ---")
            for line in lines:
                print("  " + line, file=sys.stderr)

    def close(self, failed):
        for _, proc, _ in reversed(self.procs):
            self.stop(proc)
        if failed:
            self.show_logs()
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_ready(port, proc, name, timeout=15.0):
    """Until something on port answers PING with +PONG (polling: a listener
    binding is not an event we can await from here), or the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name} exited at start (status {proc.returncode})")
        try:
            with socket.create_connection((HOST, port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"{name} did not answer PING on {HOST}:{port} within {timeout:.0f}s")


def cargo_binary(args, rel):
    """Builds with cargo (progress visible) and returns target/<rel>."""
    if not shutil.which("cargo"):
        raise RuntimeError("cargo not found: install Rust (curl https://sh.rustup.rs -sSf | sh) "
                           "or set NEARCACHE_BIN / SLOW_LINK_BIN")
    log("building: cargo build " + " ".join(args))
    subprocess.run(["cargo", "build", *args], cwd=REPO, check=True, stdout=sys.stderr)
    out = subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps"], cwd=REPO,
                         check=True, capture_output=True, text=True).stdout
    import json
    path = Path(json.loads(out)["target_directory"]) / rel
    if not path.exists():
        raise RuntimeError(f"no binary at {path}")
    return str(path)


NEARCACHE_CONFIG = """\
# Written by examples/loadgen: the trading rules (examples/trading.toml) for
# the key families the load uses, without the bus and the rate limits (its
# heavy-reads limit would hold HGETALL to 5/s).
[cache]
max_memory = "256MiB"

[[cache.rules]]
prefix = "ticker:"
ttl = "2s"
refresh_ahead = 0.8

[[cache.rules]]
prefix = "orderbook:"
ttl = "500ms"
"""


# --- the load: RESP over asyncio -----------------------------------------------

def scan_reply(buf, pos):
    """End of the RESP2 reply starting at pos and whether it is an error, or
    None when it is not complete yet."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None
    kind = buf[pos]
    if kind in (0x2B, 0x3A):  # + :
        return end + 2, False
    if kind == 0x2D:  # -
        return end + 2, True
    if kind == 0x24:  # $
        n = int(buf[pos + 1:end])
        if n < 0:
            return end + 2, False
        stop = end + 2 + n + 2
        return (stop, False) if len(buf) >= stop else None
    if kind == 0x2A:  # *
        n = int(buf[pos + 1:end])
        p, err = end + 2, False
        for _ in range(max(n, 0)):
            r = scan_reply(buf, p)
            if r is None:
                return None
            p, e = r
            err = err or e
        return p, err
    raise ValueError(f"unexpected reply byte {bytes([kind])!r}")


class RespConn(asyncio.Protocol):
    def __init__(self):
        self.buf = bytearray()
        self.waiting = []  # futures, oldest first
        self.head = 0
        self.transport = None
        self.lost = None

    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data):
        self.buf += data
        pos = 0
        while pos < len(self.buf):
            r = scan_reply(self.buf, pos)
            if r is None:
                break
            pos, err = r
            fut = self.waiting[self.head]
            self.head += 1
            if not fut.done():
                fut.set_result((time.perf_counter_ns(), err))
        if pos:
            del self.buf[:pos]
        if self.head == len(self.waiting):
            self.waiting.clear()
            self.head = 0

    def connection_lost(self, exc):
        self.lost = exc or ConnectionError("connection closed")
        for fut in self.waiting[self.head:]:
            if not fut.done():
                fut.set_exception(self.lost)


def encode(*parts):
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(p), p))
    return b"".join(out)


class Workload:
    def __init__(self, args):
        self.keys = args.keys
        self.value = b"v" * args.value_size
        self.field_value = b"f" * max(1, args.value_size // len(HASH_FIELDS))
        self.names = list(args.mix)
        self.weights = [args.mix[n] for n in self.names]

    def populate_commands(self):
        for i in range(self.keys):
            yield encode(b"SET", b"ticker:%d" % i, self.value)
            fields = []
            for f in HASH_FIELDS:
                fields += [f.encode(), self.field_value]
            yield encode(b"HSET", b"orderbook:%d" % i, *fields)

    def command(self, rnd):
        op = rnd.choices(self.names, self.weights)[0]
        k = rnd.randrange(self.keys)
        if op == "get":
            return op, encode(b"GET", b"ticker:%d" % k)
        if op == "set":
            return op, encode(b"SET", b"ticker:%d" % k, self.value)
        if op == "hgetall":
            return op, encode(b"HGETALL", b"orderbook:%d" % k)
        field = HASH_FIELDS[rnd.randrange(len(HASH_FIELDS))].encode()
        if op == "hget":
            return op, encode(b"HGET", b"orderbook:%d" % k, field)
        return op, encode(b"HSET", b"orderbook:%d" % k, field, self.field_value)


async def connect(port):
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(RespConn, HOST, port)
    return conn


async def send_batch(conn, payloads):
    loop = asyncio.get_running_loop()
    futs = [loop.create_future() for _ in payloads]
    conn.waiting.extend(futs)
    t0 = time.perf_counter_ns()
    conn.transport.write(b"".join(payloads))
    return t0, [await f for f in futs]


async def populate(port, work):
    conn = await connect(port)
    batch = []
    for cmd in work.populate_commands():
        batch.append(cmd)
        if len(batch) == 200:
            _, res = await send_batch(conn, batch)
            if any(e for _, e in res):
                raise RuntimeError("populating the keys got an error reply")
            batch = []
    if batch:
        await send_batch(conn, batch)
    conn.transport.close()


async def client(port, work, args, seed, start_at, stop_at, lat, counts):
    """One closed-loop connection; appends ns latencies of commands sent
    between start_at and stop_at (monotonic ns)."""
    rnd = random.Random(seed)
    conn = await connect(port)
    try:
        while True:
            now = time.perf_counter_ns()
            if now >= stop_at:
                break
            ops = [work.command(rnd) for _ in range(args.pipeline)]
            t0, res = await send_batch(conn, [c for _, c in ops])
            if t0 < start_at:
                continue
            for (op, _), (t1, err) in zip(ops, res):
                lat.append(t1 - t0)
                counts[op] = counts.get(op, 0) + 1
                if err:
                    counts["errors"] = counts.get("errors", 0) + 1
    finally:
        conn.transport.close()


async def run_load(port, work, args, seed, stats_port=None):
    """Returns latencies, counts, measured seconds and, with stats_port, the
    L1 (hits, misses) of the measured window (read when it opens and after
    the last client is done)."""
    now = time.perf_counter_ns()
    start_at = now + int(args.warmup * 1e9)
    stop_at = start_at + int(args.seconds * 1e9)
    lat, counts = [], {}
    tasks = [client(port, work, args, seed * 1000 + i, start_at, stop_at, lat, counts)
             for i in range(args.clients)]

    async def l1_at_start():
        await asyncio.sleep(max(0.0, (start_at - time.perf_counter_ns()) / 1e9))
        return await l1_counts(stats_port)

    first = asyncio.ensure_future(l1_at_start()) if stats_port else None
    # A reply that never comes must not hang the run: bound it.
    await asyncio.wait_for(asyncio.gather(*tasks), args.warmup + args.seconds + 30)
    l1 = None
    if first:
        (h0, m0), (h1, m1) = await first, await l1_counts(stats_port)
        l1 = (h1 - h0, m1 - m0)
    return lat, counts, (stop_at - start_at) / 1e9, l1


# --- stats from nearcache ------------------------------------------------------

async def info_nearcache(port):
    """nearcache_* fields of INFO nearcache, as a dict of str."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 5)
    try:
        writer.write(encode(b"INFO", b"nearcache"))
        buf = bytearray()
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            if not chunk:
                raise RuntimeError("nearcache closed the connection during INFO")
            buf += chunk
            if scan_reply(buf, 0) is not None:
                break
    finally:
        writer.close()
    head, _, body = bytes(buf).partition(b"\r\n")
    if not head.startswith(b"$"):
        raise RuntimeError(f"INFO nearcache answered {bytes(buf[:80])!r}")
    fields = {}
    for line in body.decode(errors="replace").splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields[name] = value
    if "nearcache_l1_hits" not in fields:
        raise RuntimeError("INFO nearcache has no nearcache_l1_hits: is this nearcache?")
    return fields


async def l1_counts(port):
    f = await info_nearcache(port)
    return int(f["nearcache_l1_hits"]), int(f["nearcache_l1_misses"])


# --- reporting -------------------------------------------------------------------

def percentile(sorted_ns, q):
    if not sorted_ns:
        return float("nan")
    i = min(len(sorted_ns) - 1, max(0, int(round(q * len(sorted_ns) + 0.5)) - 1))
    return sorted_ns[i] / 1e6


def summarize(lat, counts, seconds):
    lat.sort()
    return {
        "ops": len(lat),
        "ops_s": len(lat) / seconds,
        "p50": percentile(lat, 0.50),
        "p99": percentile(lat, 0.99),
        "p999": percentile(lat, 0.999),
        "errors": counts.get("errors", 0),
        "counts": counts,
    }


def fmt_ms(v):
    return f"{v:.3f}" if v < 10 else f"{v:.2f}"


def table(results):
    head = ["delay", "ops/s direct", "ops/s nearcache", "p50 ms direct", "p50 ms nearcache",
            "p99 ms direct", "p99 ms nearcache", "p99.9 ms direct", "p99.9 ms nearcache",
            "nearcache hit ratio"]
    rows = []
    for r in results:
        d, n = r["direct"], r["nearcache"]
        hr = r["hit_ratio"]
        rows.append([r["delay"], f"{d['ops_s']:,.0f}", f"{n['ops_s']:,.0f}",
                     fmt_ms(d["p50"]), fmt_ms(n["p50"]), fmt_ms(d["p99"]), fmt_ms(n["p99"]),
                     fmt_ms(d["p999"]), fmt_ms(n["p999"]),
                     "n/a" if hr is None else f"{hr:.1%}"])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cols: "| " + " | ".join(
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths))) + " |"
    out = [line(head), "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":")
                                      for i, w in enumerate(widths)) + "|"]
    out += [line(row) for row in rows]
    return "\n".join(out)


def plot(results, path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4.2), squeeze=False)
    labels = ["p50", "p99", "p99.9"]
    for ax, r in zip(axes[0], results):
        xs = range(len(labels))
        dv = [r["direct"][k] for k in ("p50", "p99", "p999")]
        nv = [r["nearcache"][k] for k in ("p50", "p99", "p999")]
        ax.bar([x - 0.2 for x in xs], dv, 0.4, label="direct Redis", color="#8c8c8c")
        ax.bar([x + 0.2 for x in xs], nv, 0.4, label="through nearcache", color="#2a7ab9")
        for x, v in zip(xs, dv):
            ax.text(x - 0.2, v, fmt_ms(v), ha="center", va="bottom", fontsize=7)
        for x, v in zip(xs, nv):
            ax.text(x + 0.2, v, fmt_ms(v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(xs), labels)
        ax.set_yscale("log")
        hr = r["hit_ratio"]
        delay = "Redis on loopback" if r["delay"] == "0" else f"Redis {r['delay']} away (each way)"
        ax.set_title(f"{delay}\nhit ratio {hr:.0%}" if hr is not None else delay, fontsize=9)
        ax.set_ylabel("latency, ms (log)")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="upper left")
    mix = ",".join(f"{k}={v:g}" for k, v in args.mix.items())
    fig.suptitle(f"nearcache loadgen: {mix}, {args.keys} keys, {args.clients} clients, "
                 f"pipeline {args.pipeline}, {args.value_size} B values, {args.seconds:g} s per run",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")


# --- main ------------------------------------------------------------------------

def main(argv):
    args = parse_args(argv)
    work = Workload(args)
    procs = Processes()
    failed = True
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(130))
    try:
        results = measure(args, work, procs)
        print(table(results))
        mix = ",".join(f"{k}={v:g}" for k, v in args.mix.items())
        print(f"\nmix {mix}; {args.keys} keys per family; {args.clients} clients × pipeline "
              f"{args.pipeline}; {args.value_size} B values; {args.seconds:g} s measured after "
              f"{args.warmup:g} s warm-up per run; delay = each way, via examples/slow_link; "
              f"hit ratio = L1 hits / (hits + misses) during the nearcache run")
        if args.plot:
            plot(results, args.plot, args)
        failed = check(results, args)
    finally:
        procs.close(failed)
    return 1 if failed else 0


def check(results, args):
    bad = False
    cacheable = any(OPS[op][1] and w > 0 for op, w in args.mix.items())
    for r in results:
        for side in ("direct", "nearcache"):
            if r[side]["errors"]:
                log(f"FAIL: {r[side]['errors']} error replies {side} at delay {r['delay']}")
                bad = True
            if r[side]["ops"] == 0:
                log(f"FAIL: no commands completed {side} at delay {r['delay']}")
                bad = True
        if cacheable and not r["hits"]:
            log(f"FAIL: no L1 hits through nearcache at delay {r['delay']}")
            bad = True
    return bad


def measure(args, work, procs):
    if args.redis_url:
        redis_port = host_port(args.redis_url)[1]
        wait_ready(redis_port, None, "Redis at --redis-url", timeout=5)
    else:
        redis_port = free_port()
        rs = procs.start("redis-server", [
            "redis-server", "--bind", HOST, "--port", str(redis_port), "--save", "",
            "--appendonly", "no", "--dir", str(procs.dir)])
        wait_ready(redis_port, rs, "redis-server")
    nc_bin = None
    if not args.nearcache_url:
        nc_bin = args.nearcache_bin or cargo_binary(["--release"], "release/nearcache")
    link_bin = None
    if any(d > 0 for _, d in args.delay):
        link_bin = args.slow_link_bin or cargo_binary(
            ["--release", "--example", "slow_link"], "release/examples/slow_link")
    asyncio.run(populate(redis_port, work))
    log(f"Redis on {HOST}:{redis_port}: {args.keys} ticker:N strings and orderbook:N hashes written")

    results = []
    for i, (label, delay) in enumerate(args.delay):
        started = []
        upstream_port = redis_port
        if delay > 0:
            upstream_port = free_port()
            link = procs.start(f"slow_link-{label}", [
                link_bin, f"{HOST}:{upstream_port}", f"{HOST}:{redis_port}", label])
            started.append(link)
            wait_ready(upstream_port, link, f"slow_link {label}")
        if args.nearcache_url:
            nc_port = host_port(args.nearcache_url)[1]
            wait_ready(nc_port, None, "nearcache at --nearcache-url", timeout=5)
        else:
            nc_port = free_port()
            cfg = procs.dir / "nearcache.toml"
            cfg.write_text(NEARCACHE_CONFIG)
            env = dict(os.environ, NEARCACHE_LOG=os.environ.get("NEARCACHE_LOG", "warn"))
            path = procs.dir / f"nearcache-{label}.log"
            with open(path, "wb") as f:
                nc = subprocess.Popen(
                    [nc_bin, "--config", str(cfg), "--listen", f"{HOST}:{nc_port}",
                     "--upstream", f"redis://{HOST}:{upstream_port}"],
                    stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            procs.procs.append((f"nearcache-{label}", nc, path))
            started.append(nc)
            wait_ready(nc_port, nc, "nearcache")
        r = {"delay": label}
        # Alternate which side runs first, so neither always gets the
        # machine just warmed (or just loaded) by the other.
        sides = [("direct", upstream_port), ("nearcache", nc_port)]
        if i % 2:
            sides.reverse()
        for side, port in sides:
            log(f"delay {label}: {side} for {args.warmup:g}+{args.seconds:g} s, "
                f"{args.clients} clients")
            lat, counts, seconds, l1 = asyncio.run(run_load(
                port, work, args, args.seed + i, nc_port if side == "nearcache" else None))
            r[side] = summarize(lat, counts, seconds)
            if l1:
                r["hits"], r["misses"] = l1
            s = r[side]
            log(f"  {s['ops_s']:,.0f} ops/s, p50 {fmt_ms(s['p50'])} ms, p99 {fmt_ms(s['p99'])} ms, "
                f"p99.9 {fmt_ms(s['p999'])} ms, errors {s['errors']}")
        total = r["hits"] + r["misses"]
        r["hit_ratio"] = r["hits"] / total if total else None
        log(f"  L1 during the measured nearcache run: {r['hits']} hits, {r['misses']} misses")
        for p in reversed(started):
            procs.stop(p)
        results.append(r)
    return results


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (RuntimeError, OSError, asyncio.TimeoutError, subprocess.CalledProcessError) as e:
        log(f"error: {e!r}")
        sys.exit(1)
