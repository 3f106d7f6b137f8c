#!/usr/bin/env python3
"""Coherence bus benchmark: invalidation delay across three instances, the
invalidation throughput one instance sustains, and what the bus costs write
throughput. Run it through scripts/bench-bus.sh (which installs and builds
what it needs).

Everything runs on 127.0.0.1: one redis-server, one nats-server, and
nearcache release binaries with the rule `key:` (ttl 60 s), so every SET of
redis-benchmark's `key:__rand_int__` is an invalidation to publish.

Phases (instances are started afresh for each, so every figure is its own):

  sparse  one writer through A, N_SPARSE SETs 4 ms apart (~200 SET/s): each
          invalidation alone in its batch window, the common case of a
          bot updating a few keys; B and C apply.
  light   one writer (redis-benchmark -c 1, pipeline 1) through A; B and C
          apply. Delay = from Redis acknowledging the write on A to B/C having
          dropped the key, from their PROXY STATS histograms.
  all     one such writer through each of A, B and C at once.
  load    50 clients SET at pipeline 1 and 16 (-r 100000, 64 B) through a
          nearcache without the bus and through A (bus, peer B applying),
          interleaved for ROUNDS rounds: throughput ratio with/without the
          bus, CPU per SET, keys/s published by A and applied by B, keys per
          message, and the delay at B under that load.

Environment: ROUNDS (3), N_SPARSE (1000), N_LIGHT (20000), N_P1 (200000), N_P16 (1000000),
WARMUP (20000 SETs on each instance before it is measured: A and B are fresh
processes every round, and a cold process pays first-use costs the
long-lived instance without the bus paid long ago), BATCH_DELAY (the config
default when unset), BATCH_MAX_KEYS (likewise), PHASES ("sparse light all
load"), PIPELINES (of the load phase, "1 16"), NATS_GOMAXPROCS (GOMAXPROCS
for nats-server; unset = Go's default, every core), NEARCACHE (binary path).
"""

import csv
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import redis

from benchlib import HOST, cpu_ns, free_port

ROUNDS = int(os.environ.get("ROUNDS", "3"))
N_LIGHT = int(os.environ.get("N_LIGHT", "20000"))
N_P1 = int(os.environ.get("N_P1", "200000"))
N_P16 = int(os.environ.get("N_P16", "1000000"))
WARMUP = int(os.environ.get("WARMUP", "20000"))
N_SPARSE = int(os.environ.get("N_SPARSE", "1000"))
SPARSE_GAP = 0.004
BATCH_DELAY = os.environ.get("BATCH_DELAY", "")
BATCH_MAX_KEYS = os.environ.get("BATCH_MAX_KEYS", "")
PHASES = os.environ.get("PHASES", "sparse light all load").split()
PIPELINES = [int(p) for p in os.environ.get("PIPELINES", "1 16").split()]
NEARCACHE = os.environ["NEARCACHE"]
CLIENTS, KEYSPACE, DATA_SIZE = 50, 100000, 64
TIMEOUT = 30.0


def log(msg):
    print(f"bench-bus: {msg}", file=sys.stderr, flush=True)


def until(what, check, timeout=TIMEOUT):
    """Polls `check` until it returns a true value; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            sys.exit(f"bench-bus: timed out waiting for {what}")
        time.sleep(0.01)


def as_dict(v):
    """PROXY STATS as nested dicts, whatever the protocol gave."""
    if isinstance(v, dict):
        return {k.decode() if isinstance(k, bytes) else k: as_dict(x) for k, x in v.items()}
    if isinstance(v, list) and len(v) % 2 == 0 and all(isinstance(k, bytes) for k in v[::2]):
        return {v[i].decode(): as_dict(v[i + 1]) for i in range(0, len(v), 2)}
    return v


class World:
    def __init__(self, work):
        self.work = work
        self.procs = []
        self.redis_port = free_port()
        self.spawn("redis", ["redis-server", "--bind", HOST, "--port", str(self.redis_port),
                             "--save", "", "--appendonly", "no", "--dir", work])
        self.wait_ping(self.redis_port)
        self.nats_port = free_port()
        # NATS_GOMAXPROCS: Go's GOMAXPROCS for nats-server (unset: all cores).
        nats_env = dict(os.environ)
        if os.environ.get("NATS_GOMAXPROCS"):
            nats_env["GOMAXPROCS"] = os.environ["NATS_GOMAXPROCS"]
        self.nats = self.spawn("nats", ["nats-server", "-a", HOST, "-p", str(self.nats_port)], env=nats_env)
        until("nats-server", lambda: self.connects(self.nats_port))
        coherence = "[coherence]\n"
        if BATCH_DELAY:
            coherence += f'batch_delay = "{BATCH_DELAY}"\n'
        if BATCH_MAX_KEYS:
            coherence += f"batch_max_keys = {int(BATCH_MAX_KEYS)}\n"
        self.config = os.path.join(work, "bench.toml")
        with open(self.config, "w") as f:
            f.write(f'[[cache.rules]]\nprefix = "key:"\nttl = "60s"\n{coherence}')

    def spawn(self, name, argv, env=None):
        logf = open(os.path.join(self.work, f"{name}.log"), "ab")
        p = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=env)
        self.procs.append(p)
        return p

    @staticmethod
    def connects(port):
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return True
        except OSError:
            return False

    def wait_ping(self, port):
        def ping():
            try:
                return redis.Redis(host=HOST, port=port, socket_timeout=1).ping()
            except redis.RedisError:
                return False
        until(f"PING on port {port}", ping)

    def nearcache(self, name, bus=True):
        """Starts an instance; with the bus, waits until it serves L1."""
        port = free_port()
        argv = [NEARCACHE, "--config", self.config, "--listen", f"{HOST}:{port}",
                "--upstream", f"redis://{HOST}:{self.redis_port}"]
        if bus:
            argv += ["--nats", f"nats://{HOST}:{self.nats_port}", "--instance-id", name]
        env = dict(os.environ, NEARCACHE_LOG="warn")
        inst = Instance(name, port, self.spawn(f"nearcache-{name}", argv, env))
        self.wait_ping(port)
        if bus:
            until(f"{name} on the bus", lambda: inst.bus().get("healthy") == 1)
        return inst

    def close(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


class Instance:
    def __init__(self, name, port, proc):
        self.name, self.port, self.proc = name, port, proc
        self.conn = redis.Redis(host=HOST, port=port, protocol=3)

    def bus(self):
        return as_dict(self.conn.execute_command("PROXY", "STATS"))["bus"]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def benchmark(port, n, clients, pipeline):
    """One redis-benchmark SET run: (rps, p50 ms, p99 ms)."""
    out = subprocess.run(
        ["redis-benchmark", "-h", HOST, "-p", str(port), "-c", str(clients), "-n", str(n),
         "-d", str(DATA_SIZE), "-r", str(KEYSPACE), "-P", str(pipeline), "-t", "set",
         "--csv", "-q"], capture_output=True, text=True, check=True).stdout
    rows = [r for r in csv.DictReader(io.StringIO(out)) if r.get("rps")]
    if len(rows) != 1:
        sys.exit(f"bench-bus: unexpected redis-benchmark output {out!r}")
    r = rows[0]
    return float(r["rps"]), float(r["p50_latency_ms"]), float(r["p99_latency_ms"])


def caught_up(writers, readers):
    """Waits until every reader applied every key its peers published."""
    def done():
        for r in readers:
            want = sum(w.bus()["published_keys"] for w in writers if w is not r)
            if r.bus()["applied_keys"] < want:
                return False
        return True
    until("peers to apply every published key", done)


def delay_row(phase, inst, b):
    return (f"| {phase} | {inst} | {b['delay_samples']:,} | {b['delay_p50_us']:,} | "
            f"{b['delay_p99_us']:,} | {b['delay_max_us']:,} | {b['flushes']} |")


def phase_light(world, rows):
    a, b, c = (world.nearcache(n) for n in "ABC")
    rps, _, _ = benchmark(a.port, N_LIGHT, 1, 1)
    caught_up([a], [b, c])
    pub = a.bus()
    log(f"light: one writer on A at {rps:,.0f} SET/s, {pub['published_keys']:,} keys")
    for inst in (b, c):
        rows.append(delay_row(f"light: 1 writer on A, {rps:,.0f} SET/s", inst.name, inst.bus()))
    for inst in (a, b, c):
        inst.stop()


def phase_sparse(world, rows):
    """Writes with gaps between them (a bot updating a few keys a few hundred
    times a second): each is alone in its batch window."""
    a, b, c = (world.nearcache(n) for n in "ABC")
    w = redis.Redis(host=HOST, port=a.port)
    t0 = time.monotonic()
    for i in range(N_SPARSE):
        w.set(f"key:sparse:{i % 100}", i)
        # Load shaping, not synchronisation: the gap is the point.
        time.sleep(SPARSE_GAP)
    rate = N_SPARSE / (time.monotonic() - t0)
    caught_up([a], [b, c])
    for inst in (b, c):
        rows.append(delay_row(f"sparse: 1 writer on A, {rate:,.0f} SET/s", inst.name, inst.bus()))
    for inst in (a, b, c):
        inst.stop()


def phase_all(world, rows):
    insts = [world.nearcache(n) for n in "ABC"]
    procs = [subprocess.Popen(
        ["redis-benchmark", "-h", HOST, "-p", str(i.port), "-c", "1", "-n", str(N_LIGHT),
         "-d", str(DATA_SIZE), "-r", str(KEYSPACE), "-t", "set", "-q"],
        stdout=subprocess.DEVNULL) for i in insts]
    for p in procs:
        if p.wait() != 0:
            sys.exit("bench-bus: redis-benchmark failed")
    caught_up(insts, insts)
    for inst in insts:
        rows.append(delay_row("all: 1 writer on each of A, B, C", inst.name, inst.bus()))
    for inst in insts:
        inst.stop()


def phase_load(world, rows, load_rows):
    plain = world.nearcache("N", bus=False)
    if WARMUP:
        benchmark(plain.port, WARMUP, CLIENTS, 1)
    cells = {}
    for rnd in range(1, ROUNDS + 1):
        for pipe in PIPELINES:
            n = N_P1 if pipe == 1 else N_P16

            def without_bus():
                c0 = cpu_ns(plain.proc.pid)
                rps0, _, p99_0 = benchmark(plain.port, n, CLIENTS, pipe)
                return rps0, p99_0, (cpu_ns(plain.proc.pid) - c0) / n / 1000

            # Alternate which goes first (ABBA…), so neither always runs on
            # a machine just warmed, or just loaded, by the other.
            if rnd % 2:
                rps0, p99_0, plain_cpu = without_bus()
            a, b = world.nearcache("A"), world.nearcache("B")
            if WARMUP:
                benchmark(a.port, WARMUP, CLIENTS, pipe)
                caught_up([a], [b])
            wa, wb = a.bus(), b.bus()
            a0, b0, n0 = cpu_ns(a.proc.pid), cpu_ns(b.proc.pid), cpu_ns(world.nats.pid)
            t0 = time.monotonic()
            rps1, _, p99_1 = benchmark(a.port, n, CLIENTS, pipe)
            elapsed = time.monotonic() - t0
            a_cpu = (cpu_ns(a.proc.pid) - a0) / n / 1000
            caught_up([a], [b])
            lag = time.monotonic() - t0 - elapsed
            b_cpu_ns = cpu_ns(b.proc.pid) - b0
            nats_cpu = (cpu_ns(world.nats.pid) - n0) / n / 1000
            pa, pb = a.bus(), b.bus()
            # Counters less the warm-up (the delay quantiles include it).
            for k in ("published_keys", "applied_keys", "delay_samples"):
                pa[k] -= wa[k]
                pb[k] -= wb[k]
            keys = pa["published_keys"]
            cells.setdefault(pipe, []).append(dict(
                rps1=rps1, p99_1=p99_1, a_cpu=a_cpu, nats_cpu=nats_cpu, keys_s=keys / elapsed, applied_s=pb["applied_keys"] / (elapsed + lag),
                per_msg=keys / max(pb["delay_samples"], 1), b_ns_key=b_cpu_ns / max(keys, 1),
                samples=pb["delay_samples"], p50=pb["delay_p50_us"], p99=pb["delay_p99_us"], max=pb["delay_max_us"],
                flushes=pb["flushes"]))
            a.stop()
            b.stop()
            if not rnd % 2:
                rps0, p99_0, plain_cpu = without_bus()
            # The bus's whole CPU bill per SET: what A spends beyond the
            # instance without the bus, plus NATS, plus peer B.
            bus_cpu = a_cpu - plain_cpu + nats_cpu + b_cpu_ns / n / 1000
            cells[pipe][-1].update(rps0=rps0, p99_0=p99_0, plain_cpu=plain_cpu, bus_cpu=bus_cpu)
            log(f"load round {rnd} P{pipe}: without bus {rps0:,.0f} SET/s, with {rps1:,.0f} "
                f"({rps1 / rps0:.2f}); delay at B p50 {pb['delay_p50_us']} µs "
                f"p99 {pb['delay_p99_us']} µs; {keys / max(pb['delay_samples'], 1):.1f} keys/message")
    for pipe, runs in cells.items():
        med = lambda k: statistics.median(r[k] for r in runs)
        load_rows.append(
            f"| {pipe} | {med('rps0'):,.0f} | {med('rps1'):,.0f} | {med('rps1') / med('rps0'):.2f} | "
            f"{med('plain_cpu'):.2f} | {med('a_cpu'):.2f} | {med('nats_cpu'):.2f} | {med('p99_0'):.3f}/{med('p99_1'):.3f} | "
            f"{med('keys_s'):,.0f} | {med('applied_s'):,.0f} | {med('per_msg'):.1f} | "
            f"{med('b_ns_key'):,.0f} | {med('bus_cpu'):.2f} |")
        rows.append(f"| load: 50 clients P{pipe} on A ({med('rps1'):,.0f} SET/s) | B | "
                    f"{med('samples'):,.0f} | {med('p50'):,.0f} | "
                    f"{med('p99'):,.0f} | {max(r['max'] for r in runs):,} | "
                    f"{max(r['flushes'] for r in runs)} |")
    plain.stop()


def main():
    with tempfile.TemporaryDirectory(prefix="nearcache-bench-bus.") as work:
        world = World(work)
        try:
            rows, load_rows = [], []
            for name in PHASES:
                phase = globals().get(f"phase_{name}")
                if phase is None:
                    sys.exit(f"bench-bus: unknown phase {name!r} in PHASES")
                if name == "load":
                    phase(world, rows, load_rows)
                else:
                    phase(world, rows)
        finally:
            world.close()
    batch = BATCH_DELAY or "default"
    print(f"\nInvalidation delay (write acknowledged on the writer → key dropped on the peer), "
          f"batch_delay {batch}; targets: p99 ≤ 2 ms")
    print("| phase | at | invalidation messages | p50 µs | p99 µs | max µs | L1 flushes |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print(f"\nWrite throughput without and with the bus (medians of {ROUNDS} rounds, SET, 50 clients, "
          f"-r {KEYSPACE}, {DATA_SIZE} B); target: with/without ≥ 0.9")
    print("| P | without bus SET/s | with bus SET/s | ratio | nc CPU µs/SET without | with | "
          "nats-server CPU µs/SET | "
          "p99 ms without/with | keys/s published (A) | keys/s applied (B) | keys/message | "
          "B CPU ns/applied key | bus CPU µs/SET, all processes |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(load_rows))


if __name__ == "__main__":
    main()
