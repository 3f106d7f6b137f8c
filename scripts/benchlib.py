"""Helpers shared by the Python benchmark scripts (bench-bus.py,
bench-twemproxy.py): free loopback ports and a process's CPU time."""

import os
import socket

HOST = "127.0.0.1"


def free_port():
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def cpu_ns(pid):
    """CPU time of a process so far: the sum of its threads' schedstat."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total
