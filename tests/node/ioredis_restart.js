// ioredis with its defaults, through nearcache, across a Redis restart.
//
// Usage: node ioredis_restart.js PROXY_PORT. Writes and reads keys; prints
// "ready" once warm, then the test restarts Redis. Every command must
// succeed (ioredis reconnects and resends what nearcache closes, as it would
// for Redis itself); the run ends 200 commands after INFO shows another
// run_id, or fails after 20 s.
"use strict";
const Redis = require("ioredis");

const port = Number(process.argv[2]);
const r = new Redis({ host: "127.0.0.1", port });

async function runId() {
  const info = await r.info("server");
  return /run_id:(\w+)/.exec(info)[1];
}

async function op(i) {
  const key = `io:${i % 50}`;
  await r.set(key, String(i));
  const got = await r.get(key);
  if (got !== String(i)) throw new Error(`${key}: read ${got} after writing ${i}`);
}

(async () => {
  const first = await runId();
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
