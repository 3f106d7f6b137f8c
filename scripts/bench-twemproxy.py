#!/usr/bin/env python3
"""Forwarding beside a reference proxy: redis-benchmark against Redis
directly, through twemproxy (nutcracker, Debian's package) and through
nearcache, interleaved in one run, with each proxy's CPU per request (sum of
its threads' /proc schedstat) and redis-server's.

Usage: scripts/bench-twemproxy.py [ROUNDS]   (default 3)
Env:   NEARCACHE (default target/release/nearcache), N_P1 (200000),
       N_P16 (1000000), TESTS ("get set")
Needs: redis-server, redis-benchmark, nutcracker (apt-get install -y
       redis-server redis-tools nutcracker) and a release build.

twemproxy runs with one server connection (`server_connections: 1`, its
default) and nearcache with its defaults; both on 127.0.0.1, free ports.
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

from benchlib import HOST, cpu_ns, free_port

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
N = {1: int(os.environ.get("N_P1", "200000")), 16: int(os.environ.get("N_P16", "1000000"))}
TESTS = os.environ.get("TESTS", "get set").split()
NEARCACHE = os.environ.get("NEARCACHE", "target/release/nearcache")


def wait_port(port):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"bench-twemproxy: nothing listens on {port}")


def main():
    procs = []
    with tempfile.TemporaryDirectory(prefix="nearcache-twem.") as work:
        try:
            rport, tport, nport = free_port(), free_port(), free_port()
            redis = subprocess.Popen(
                ["redis-server", "--bind", HOST, "--port", str(rport), "--save", "",
                 "--appendonly", "no", "--dir", work], stdout=subprocess.DEVNULL)
            procs.append(redis)
            wait_port(rport)
            conf = os.path.join(work, "nutcracker.yml")
            with open(conf, "w") as f:
                f.write(f"alpha:\n  listen: {HOST}:{tport}\n  redis: true\n"
                        f"  server_connections: 1\n  servers:\n   - {HOST}:{rport}:1\n")
            sides = {"direct": (rport, None)}
            tw = subprocess.Popen(["nutcracker", "-c", conf, "-o", os.path.join(work, "tw.log")])
            procs.append(tw)
            nc = subprocess.Popen([NEARCACHE, "--listen", f"{HOST}:{nport}", "--upstream",
                                   f"redis://{HOST}:{rport}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(nc)
            wait_port(tport)
            wait_port(nport)
            sides["twemproxy"] = (tport, tw)
            sides["nearcache"] = (nport, nc)
            res = {}
            for rnd in range(ROUNDS):
                for pipe in (1, 16):
                    for test in TESTS:
                        for side, (port, proc) in sides.items():
                            c0 = cpu_ns(proc.pid) if proc else 0
                            r0 = cpu_ns(redis.pid)
                            out = subprocess.run(
                                ["redis-benchmark", "-h", HOST, "-p", str(port), "-c", "50",
                                 "-n", str(N[pipe]), "-d", "64", "-r", "100000", "-P", str(pipe),
                                 "-t", test, "--csv", "-q"],
                                capture_output=True, text=True, check=True).stdout
                            row = [r for r in csv.DictReader(io.StringIO(out)) if r.get("rps")][0]
                            proxy_us = (cpu_ns(proc.pid) - c0) / N[pipe] / 1000 if proc else 0.0
                            redis_us = (cpu_ns(redis.pid) - r0) / N[pipe] / 1000
                            res.setdefault((test, pipe, side), []).append(
                                (float(row["rps"]), proxy_us, redis_us))
                            print(f"round {rnd + 1} {test} P{pipe} {side}: {float(row['rps']):,.0f} rps",
                                  file=sys.stderr, flush=True)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait()
    print(f"| test | P | side | rps (median of {ROUNDS}) | × direct | proxy CPU µs/req | redis CPU µs/req |")
    print("|---|--:|---|--:|--:|--:|--:|")
    for (test, pipe, side), runs in res.items():
        med = [statistics.median(r[i] for r in runs) for i in range(3)]
        direct = statistics.median(r[0] for r in res[(test, pipe, "direct")])
        cpu = "—" if side == "direct" else f"{med[1]:.2f}"
        print(f"| {test.upper()} | {pipe} | {side} | {med[0]:,.0f} | {med[0] / direct:.2f} | {cpu} | {med[2]:.2f} |")


if __name__ == "__main__":
    main()
