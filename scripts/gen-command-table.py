#!/usr/bin/env python3
"""Generate src/command/table.rs from a real redis-server's COMMAND INFO.

Usage:
    scripts/gen-command-table.py                  # start a private redis-server
    scripts/gen-command-table.py --url host:port  # use a running server
    scripts/gen-command-table.py --out PATH       # write somewhere else

Standard library only: RESP2 is spoken over a raw socket. The output is a pure
function of the server's reply (everything is sorted or kept in Redis's own
order), so the same server always yields the same file.
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "src", "command", "table.rs")

# Redis command flag -> flag::* constant. The order here is the order in which
# constants are written, so output does not depend on Redis's flag order.
COMMAND_FLAGS = [
    ("write", "WRITE"),
    ("readonly", "READONLY"),
    ("denyoom", "DENYOOM"),
    ("admin", "ADMIN"),
    ("pubsub", "PUBSUB"),
    ("noscript", "NOSCRIPT"),
    ("blocking", "BLOCKING"),
    ("loading", "LOADING"),
    ("stale", "STALE"),
    ("fast", "FAST"),
    ("no_auth", "NO_AUTH"),
    ("may_replicate", "MAY_REPLICATE"),
    ("movablekeys", "MOVABLE_KEYS"),
    ("no_multi", "NO_MULTI"),
    ("allow_busy", "ALLOW_BUSY"),
    ("no_mandatory_keys", "NO_MANDATORY_KEYS"),
]
# Flags Redis reports that nearcache has no use for: dropped without a warning
# so that a warning always means "Redis grew something new, look at it".
IGNORED_COMMAND_FLAGS = {
    "skip_monitor",
    "skip_slowlog",
    "asking",
    "module",
    "sentinel",
    "only_sentinel",
    "module_no_cluster",
    "no_async_loading",
}
ACL_CATEGORIES = [
    ("@transaction", "TRANSACTION"),
    ("@connection", "CONNECTION"),
    ("@scripting", "SCRIPTING"),
]
# nearcache's own flag: read-only commands on one key whose reply depends only
# on the key's value, so L1 may cache it until the key is written or expires.
# TTL and PTTL are left out: their answers change with time alone. (EXISTS is
# cacheable with one key only; the request path checks the count.)
CACHEABLE = {
    "get", "getrange", "substr", "strlen", "exists", "getbit", "bitcount",
    "bitpos", "hget", "hmget", "hgetall", "hlen", "hexists", "hkeys", "hvals",
    "hstrlen", "lrange", "llen", "lindex", "lpos", "smembers", "sismember",
    "smismember", "scard", "zrange", "zrangebyscore", "zrevrange",
    "zrevrangebyscore", "zrangebylex", "zrevrangebylex", "zscore", "zmscore",
    "zcard", "zrank", "zrevrank", "zcount", "zlexcount", "xrange", "xrevrange",
    "xlen", "type",
}
# Every ACL category Redis 7.0 has, in `ACL CAT`'s order -> acl::* constant.
# A category Redis reports that is not here stops the generator: nearcache's
# users could not name it, so the table must learn it first.
ACL_ALL = [
    "keyspace", "read", "write", "set", "sortedset", "list", "hash", "string",
    "bitmap", "hyperloglog", "geo", "stream", "pubsub", "admin", "fast",
    "slow", "blocking", "dangerous", "connection", "transaction", "scripting",
]
KEY_FLAGS = [
    ("RO", "RO"),
    ("RW", "RW"),
    ("OW", "OW"),
    ("RM", "RM"),
    ("access", "ACCESS"),
    ("update", "UPDATE"),
    ("insert", "INSERT"),
    ("delete", "DELETE"),
    ("not_key", "NOT_KEY"),
    ("incomplete", "INCOMPLETE"),
    ("variable_flags", "VARIABLE_FLAGS"),
]

_warned = set()


def warn(msg, key=None):
    """Print a warning once per `key` (default: the message itself)."""
    key = msg if key is None else key
    if key not in _warned:
        _warned.add(key)
        print("gen-command-table: warning: " + msg, file=sys.stderr)


# --------------------------------------------------------------------------
# RESP2 client


class RespError(Exception):
    pass


class Resp:
    def __init__(self, host, port, timeout=10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.rfile = self.sock.makefile("rb")

    def close(self):
        self.rfile.close()
        self.sock.close()

    def call(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a.encode() if isinstance(a, str) else a
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        self.sock.sendall(b"".join(out))
        return self.read()

    def _line(self):
        line = self.rfile.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("connection closed mid-reply")
        return line[:-2]

    def read(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RespError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.rfile.read(n + 2)
            if len(data) != n + 2:
                raise ConnectionError("connection closed mid-reply")
            return data[:-2].decode()
        if kind == b"*":
            n = int(rest)
            if n < 0:
                return None
            return [self.read() for _ in range(n)]
        raise ValueError("unexpected RESP type byte %r" % kind)


# --------------------------------------------------------------------------
# Private server


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(binary, tmpdir):
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--dir", tmpdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 5.0
    while True:
        try:
            conn = Resp("127.0.0.1", port, timeout=1.0)
            try:
                if conn.call("PING") == "PONG":
                    return proc, port
            finally:
                conn.close()
        except (OSError, RespError, ConnectionError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            sys.exit("gen-command-table: redis-server did not come up on port %d" % port)
        time.sleep(0.05)


# --------------------------------------------------------------------------
# COMMAND INFO -> Rust


def pairs(flat):
    """RESP2 flattens maps into [k1, v1, k2, v2, ...]."""
    if isinstance(flat, dict):
        return flat
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def rust_str(s):
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= ord(ch) < 0x7F:
            out.append(ch)
        else:
            out.append("\\u{%x}" % ord(ch))
    out.append('"')
    return "".join(out)


def bit_expr(module, consts):
    return " | ".join("%s::%s" % (module, c) for c in consts) if consts else "0"


def command_flags(name, flags, categories, key_specs):
    flags = set(flags)
    consts = [c for f, c in COMMAND_FLAGS if f in flags]
    known = {f for f, _ in COMMAND_FLAGS} | IGNORED_COMMAND_FLAGS
    for f in sorted(flags - known):
        warn("unknown command flag %r ignored (first seen on %s)" % (f, name), ("cmd", f))
    cats = set(categories)
    consts += [c for f, c in ACL_CATEGORIES if f in cats]
    if not key_specs:
        consts.append("NO_KEYS")
    if name in CACHEABLE:
        if "readonly" not in flags:
            sys.exit("gen-command-table: %s is listed as cacheable but Redis does not flag it readonly" % name)
        consts.append("CACHEABLE")
    return bit_expr("flag", consts)


def acl_expr(name, categories):
    for cat in categories:
        bare = cat.lstrip("@")
        if bare not in ACL_ALL:
            sys.exit("gen-command-table: %s has ACL category %r, unknown to ACL_ALL" % (name, cat))
    cats = {c.lstrip("@") for c in categories}
    consts = [c.upper() for c in ACL_ALL if c in cats]
    return bit_expr("acl", consts)


def key_spec(cmd, raw):
    spec = pairs(raw)
    flags = set(spec.get("flags", []))
    known = {f for f, _ in KEY_FLAGS}
    for f in sorted(flags - known):
        warn("unknown key-spec flag %r ignored (first seen on %s)" % (f, cmd), ("key", f))
    kflags = bit_expr("key_flag", [c for f, c in KEY_FLAGS if f in flags])

    bs = pairs(spec.get("begin_search", []))
    bs_type, bs_spec = bs.get("type"), pairs(bs.get("spec", []))
    if bs_type == "index":
        begin = "BeginSearch::Index(%d)" % bs_spec["index"]
    elif bs_type == "keyword":
        begin = "BeginSearch::Keyword { keyword: %s, start_from: %d }" % (
            rust_str(bs_spec["keyword"]), bs_spec["startfrom"])
    else:
        if bs_type != "unknown":
            warn("unknown begin_search type %r (on %s)" % (bs_type, cmd))
        begin = "BeginSearch::Unknown"

    fk = pairs(spec.get("find_keys", []))
    fk_type, fk_spec = fk.get("type"), pairs(fk.get("spec", []))
    if fk_type == "range":
        find = "FindKeys::Range { last_key: %d, step: %d, limit: %d }" % (
            fk_spec["lastkey"], fk_spec["keystep"], fk_spec["limit"])
    elif fk_type == "keynum":
        find = "FindKeys::KeyNum { key_num_idx: %d, first_key: %d, step: %d }" % (
            fk_spec["keynumidx"], fk_spec["firstkey"], fk_spec["keystep"])
    else:
        if fk_type != "unknown":
            warn("unknown find_keys type %r (on %s)" % (fk_type, cmd))
        find = "FindKeys::Unknown"

    return "KeySpec { flags: %s, begin: %s, find: %s }" % (kflags, begin, find)


_next_id = [0]


def command(info, indent):
    # [name, arity, flags, first, last, step, acl categories, tips, key specs,
    #  subcommands]
    name, arity, flags = info[0].lower(), info[1], info[2]
    categories = info[6] if len(info) > 6 else []
    specs = info[8] if len(info) > 8 else []
    subs = info[9] if len(info) > 9 else []
    pad = " " * indent
    lines = [pad + "CommandSpec {"]
    lines.append(pad + "    name: %s," % rust_str(name))
    lines.append(pad + "    id: %d," % _next_id[0])
    _next_id[0] += 1
    lines.append(pad + "    arity: %d," % arity)
    lines.append(pad + "    flags: %s," % command_flags(name, flags, categories, specs))
    lines.append(pad + "    acl: %s," % acl_expr(name, categories))
    if specs:
        lines.append(pad + "    key_specs: &[")
        for s in specs:
            lines.append(pad + "        %s," % key_spec(name, s))
        lines.append(pad + "    ],")
    else:
        lines.append(pad + "    key_specs: &[],")
    if subs:
        lines.append(pad + "    subcommands: &[")
        for sub in sorted(subs, key=lambda s: s[0].lower()):
            lines.extend(command(sub, indent + 8))
        lines.append(pad + "    ],")
    else:
        lines.append(pad + "    subcommands: &[],")
    lines.append(pad + "},")
    return lines


def server_version(conn):
    for line in conn.call("INFO", "server").splitlines():
        if line.startswith("redis_version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def render(version, infos):
    infos = sorted((i for i in infos if i), key=lambda i: i[0].lower())
    n_subs = sum(len(i[9]) if len(i) > 9 else 0 for i in infos)
    out = [
        "// @generated by scripts/gen-command-table.py from redis-server %s \u2014 do not edit" % version,
        "",
        "//! Redis's command table (%d commands, %d subcommands), as `COMMAND INFO` reports it."
        % (len(infos), n_subs),
        "",
        "use super::spec::{BeginSearch, CommandSpec, FindKeys, KeySpec, acl, flag, key_flag};",
        "",
        "/// Every top-level command, sorted by name; subcommands nested and sorted.",
        "pub static COMMANDS: &[CommandSpec] = &[",
    ]
    for info in infos:
        out.extend(command(info, 4))
    out.append("];")
    out.append("")
    out.append("/// How many commands and subcommands the table holds: every `id` is below.")
    out.append("pub const COUNT: usize = %d;" % _next_id[0])
    return "\n".join(out) + "\n", len(infos), n_subs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="host:port of a running redis-server")
    ap.add_argument("--out", default=DEFAULT_OUT, help="output file (default: %(default)s)")
    ap.add_argument("--redis-server", default="redis-server", help="server binary")
    args = ap.parse_args()

    proc = tmpdir = None
    try:
        if args.url:
            host, _, port = args.url.rpartition(":")
            host, port = host or "127.0.0.1", int(port)
        else:
            tmpdir = tempfile.mkdtemp(prefix="gen-command-table-")
            proc, port = start_server(args.redis_server, tmpdir)
            host = "127.0.0.1"
        conn = Resp(host, port)
        try:
            version = server_version(conn)
            infos = conn.call("COMMAND", "INFO")
        finally:
            conn.close()
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)

    missing = CACHEABLE - {i[0].lower() for i in infos if i}
    if missing:
        sys.exit("gen-command-table: cacheable commands the server does not have: %s" % sorted(missing))
    text, n_cmds, n_subs = render(version, infos)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)

    rustfmt = shutil.which("rustfmt")
    if rustfmt:
        subprocess.run([rustfmt, "--edition", "2024", args.out], check=True)
    else:
        warn("rustfmt not found; %s left unformatted" % args.out)
    print("wrote %s: %d commands, %d subcommands (redis-server %s)"
          % (args.out, n_cmds, n_subs, version), file=sys.stderr)


if __name__ == "__main__":
    main()
