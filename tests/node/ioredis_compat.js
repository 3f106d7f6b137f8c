// ioredis through nearcache: the client a Node.js trading bot would use.
//
// Run by tests/integration/clients.rs as
// `node ioredis_compat.js PROXY_PORT REDIS_PORT`; the proxy caches keys under
// `io:c:` in L1. Exits non-zero with the failing check's message. Each check
// compares what the proxy answers with what Redis holds or answers directly.
"use strict";

const assert = require("node:assert/strict");
const Redis = require("ioredis");

const [proxyPort, redisPort] = process.argv.slice(2).map(Number);
const opts = (port, extra = {}) => ({
  host: "127.0.0.1",
  port,
  lazyConnect: true,
  maxRetriesPerRequest: 0,
  ...extra,
});

// Bounded polling of Redis's own state (never a sleep standing in for an event).
async function until(what, check) {
  const deadline = Date.now() + 10_000;
  while (!(await check())) {
    assert.ok(Date.now() < deadline, `timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

async function getCalls(d) {
  const stats = await d.info("commandstats");
  const m = /cmdstat_get:calls=(\d+)/.exec(stats);
  return m ? Number(m[1]) : 0;
}

async function main() {
  // The ready check (INFO), CLIENT SETNAME and SELECT at connect, as an
  // application would configure them.
  const p = new Redis(opts(proxyPort, { connectionName: "bot-1" }));
  const d = new Redis(opts(redisPort));
  const conns = [p, d];
  try {
    await p.connect();
    await d.connect();
    assert.equal(await p.client("GETNAME"), "bot-1");

    // Strings, binary-safe values, expiry.
    const blob = Buffer.from(Array.from({ length: 1024 }, (_, i) => i % 256));
    assert.equal(await p.set("io:blob", blob), "OK");
    assert.deepEqual(await p.getBuffer("io:blob"), blob);
    assert.deepEqual(await d.getBuffer("io:blob"), blob);
    await p.set("io:ttl", "v", "PX", 60_000);
    const pttl = await d.pttl("io:ttl");
    assert.ok(pttl > 0 && pttl <= 60_000, `pttl ${pttl}`);

    // A pipeline of 1000 writes and a read.
    const pipe = p.pipeline();
    for (let i = 0; i < 1000; i++) pipe.set(`io:k${i}`, i);
    pipe.get("io:k999");
    const out = await pipe.exec();
    assert.equal(out.length, 1001);
    assert.ok(out.slice(0, 1000).every(([err, r]) => err === null && r === "OK"));
    assert.deepEqual(out[1000], [null, "999"]);

    // SCAN as a stream: every key written above, once.
    const seen = new Set();
    await new Promise((resolve, reject) => {
      p.scanStream({ match: "io:k*", count: 100 })
        .on("data", (keys) => keys.forEach((k) => seen.add(k)))
        .on("end", resolve)
        .on("error", reject);
    });
    assert.equal(seen.size, 1000);

    // MULTI/EXEC, and a WATCH conflict that aborts it (exec answers null).
    assert.deepEqual(await p.multi().incr("io:counter").incr("io:counter").exec(), [
      [null, 1],
      [null, 2],
    ]);
    await p.watch("io:watched");
    await d.set("io:watched", "changed");
    assert.equal(await p.multi().set("io:watched", "mine").exec(), null);
    assert.equal(await d.get("io:watched"), "changed");

    // Lua through defineCommand: EVALSHA, falling back to EVAL on NOSCRIPT.
    await d.script("FLUSH");
    p.defineCommand("incrByLua", {
      numberOfKeys: 1,
      lua: "return redis.call('INCRBY', KEYS[1], ARGV[1])",
    });
    assert.equal(await p.incrByLua("io:lua", 5), 5);
    assert.equal(await p.incrByLua("io:lua", 5), 10);

    // Auto-pipelining: commands issued in one tick go out as one pipeline;
    // a read right behind a write to a cached key sees the write, and the
    // next read of it is served from L1 without reaching Redis.
    const auto = new Redis(opts(proxyPort, { enableAutoPipelining: true }));
    conns.push(auto);
    await auto.connect();
    for (let round = 0; round < 20; round++) {
      const v = `v${round}`;
      const [set, got] = await Promise.all([auto.set("io:c:tick", v), auto.get("io:c:tick")]);
      assert.equal(set, "OK");
      assert.equal(got, v, `round ${round}: GET behind SET`);
    }
    const values = await Promise.all(Array.from({ length: 500 }, (_, i) => auto.get(`io:k${i}`)));
    assert.deepEqual(values, Array.from({ length: 500 }, (_, i) => String(i)));
    assert.equal(await auto.get("io:c:tick"), "v19");
    const before = await getCalls(d);
    assert.equal(await auto.get("io:c:tick"), "v19");
    assert.equal(await getCalls(d), before, "a repeated GET of a cached key reached Redis");

    // Pub/sub: a message published by another client arrives.
    const sub = new Redis(opts(proxyPort));
    conns.push(sub);
    await sub.connect();
    const message = new Promise((resolve) => sub.on("message", (ch, msg) => resolve([ch, msg])));
    assert.equal(await sub.subscribe("io:chan"), 1);
    assert.equal(await p.publish("io:chan", "tick"), 1);
    assert.deepEqual(await message, ["io:chan", "tick"]);

    // A blocking pop released by another client.
    const blocker = new Redis(opts(proxyPort));
    conns.push(blocker);
    await blocker.connect();
    const popped = blocker.blpop("io:queue", 10);
    await until("BLPOP to block in Redis", async () =>
      /blocked_clients:[1-9]/.test(await d.info("clients")),
    );
    await d.rpush("io:queue", "job");
    assert.deepEqual(await popped, ["io:queue", "job"]);

    // A connection bound to db 2 (SELECT at connect).
    const p2 = new Redis(opts(proxyPort, { db: 2 }));
    const d2 = new Redis(opts(redisPort, { db: 2 }));
    conns.push(p2, d2);
    await p2.connect();
    await d2.connect();
    await p2.set("io:db2", "x");
    assert.equal(await d2.get("io:db2"), "x");
    assert.equal(await d.get("io:db2"), null);

    console.log("ioredis checks passed");
  } finally {
    conns.forEach((c) => c.disconnect());
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
