// ioredis with its defaults, through nearcache, across a Redis restart.
//
// Usage: node ioredis_restart.js PROXY_PORT. Writes and reads keys; prints
// "ready" once warm, then the test restarts Redis. Every command must
// succeed (ioredis reconnects and resends what nearcache closes, as it would
// for Redis itself) and every read returns what was written, except that the
// one write acknowledged by the old server just before it went is lost with
// it (Redis restarts empty), which is allowed only once INFO shows another
// run_id; the run ends 200 commands after that, or fails after 20 s.
"use strict";
const Redis = require("ioredis");

const port = Number(process.argv[2]);
const r = new Redis({ host: "127.0.0.1", port });
let first = null;
let lost = false;

async function runId() {
  const info = await r.info("server");
  return /run_id:(\w+)/.exec(info)[1];
}

async function op(i) {
  const key = `io:${i % 50}`;
  await r.set(key, String(i));
  const got = await r.get(key);
  if (got === String(i)) return;
  if (got === null && !lost && (await runId()) !== first) {
    lost = true; // written to the old server, read from the new one
    return;
  }
  throw new Error(`${key}: read ${got} after writing ${i}`);
}

(async () => {
  first = await runId();
  for (let i = 0; i < 200; i++) await op(i);
  console.log("ready");
  const deadline = Date.now() + 20000;
  let i = 200;
  let after = null;
  while (after === null || i < after + 200) {
    if (Date.now() > deadline) throw new Error(`no restart seen within 20 s (${i} commands)`);
    await op(i);
    i++;
    if (after === null && i % 10 === 0 && (await runId()) !== first) after = i;
  }
  console.log(`ok: ${i} commands, the restart seen after ${after - 200}`);
  r.disconnect();
})().catch((e) => {
  console.error(`failed: ${e.stack || e}`);
  process.exit(1);
});
