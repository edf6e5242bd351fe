// SSE (docs/protocol.md §10) in the SDK, against the real gateway: a client
// on SSE chats with one on WebSocket; WebSocket that cannot be made, or is
// refused, falls back to SSE by itself; the same reconnect, resume and
// heartbeat rules hold over SSE.
import { test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { Client } from "../dist/index.js";
import { Gateway, Proxy, newUser, record, sleep, started, waitFor } from "./helpers.mjs";

const client = (url, extra = {}) => started(Client, url, { WebSocket, backoff: { baseMs: 20, capMs: 200 }, ...extra });

const texts = (log, ch) => log.of("message").filter((m) => m.ch === ch).map((m) => m.data.n);

/** A WebSocket a network (or a page) has blocked: its constructor throws. */
class Blocked {
  constructor() {
    throw new Error("WebSocket is blocked here");
  }
}

test("an SSE client chats with a WebSocket client in a room and by direct message", async () => {
  const gw = await Gateway.start();
  const s = client(gw.url, { transports: ["sse"] });
  const w = client(gw.url);
  await waitFor(() => s.c.state === "connected" && w.c.state === "connected", "both connected");
  assert.equal(s.c.transport, "sse");
  assert.equal(s.log.of("connected")[0].transport, "sse");
  assert.equal(w.log.of("connected")[0].transport, "websocket");
  const room = `room:${newUser("r")}`;
  await Promise.all([s.c.subscribe(room), w.c.subscribe(room)]);
  const ack = await s.c.publish(room, { n: 1 });
  assert.ok(ack.seq > 0);
  await w.c.publish(room, { n: 2 });
  await waitFor(() => texts(s.log, room).length === 2 && texts(w.log, room).length === 2, "both messages at both");
  assert.deepEqual(texts(s.log, room), [1, 2]);
  await s.c.publish(`user:${w.c.welcome.user}`, { n: 3 });
  await w.c.publish(`user:${s.c.welcome.user}`, { n: 4 });
  await waitFor(() => texts(w.log, `user:${w.c.welcome.user}`).includes(3), "the direct message to w");
  await waitFor(() => texts(s.log, `user:${s.c.welcome.user}`).includes(4), "the direct message to s");
  // Requests, presence and history work the same way.
  assert.deepEqual(await s.c.request("svc:echo", { e: 1 }), { e: 1 });
  const who = await s.c.presence(room);
  assert.equal(who.total, 2);
  const page = await s.c.history(room);
  assert.deepEqual(page.messages.map((m) => m.data.n), [1, 2]);
  // Many publishes at once leave in few POSTs, in order.
  await Promise.all(Array.from({ length: 50 }, (_, i) => s.c.publish(room, { n: 10 + i })));
  await waitFor(() => texts(w.log, room).length === 52, "fifty more");
  assert.deepEqual(texts(w.log, room).slice(2), Array.from({ length: 50 }, (_, i) => 10 + i));
  const posts = (await gw.metrics()).split("\n").filter((l) => l.startsWith('edgegate_sse_posts_total{') && l.includes('outcome="taken"'));
  const taken = posts.reduce((n, l) => n + Number(l.split(" ").pop()), 0);
  assert.ok(taken < 40, `${taken} POSTs for about 60 envelopes`);
  s.c.close();
  w.c.close();
  await gw.stop();
});

test("a WebSocket that cannot be made falls back to SSE at once", async () => {
  const gw = await Gateway.start();
  const a = client(gw.url, { WebSocket: Blocked });
  await waitFor(() => a.c.state === "connected", "connected");
  assert.equal(a.c.transport, "sse");
  assert.equal(a.log.of("disconnected").length, 0, "no failed attempt first");
  // With no WebSocket at all and SSE not allowed, the client stops.
  const b = new Client({ url: gw.url, user: newUser(), WebSocket: Blocked, transports: ["websocket"] });
  const blog = record(b);
  b.connect();
  assert.equal(blog.of("stopped")[0]?.reason, "fatal");
  a.c.close();
  await gw.stop();
});

test("refused upgrades: two failures before any welcome, then SSE; a gateway restart keeps it there", async () => {
  // The upgrade path answers 404 (as a proxy that refuses WebSocket would
  // answer something else than 101); SSE is where the client expects it.
  const gw = await Gateway.start({ EDGEGATE_WS__PATH: "/elsewhere" });
  const a = client(gw.url);
  await waitFor(() => a.c.state === "connected", "connected", 10_000);
  assert.equal(a.c.transport, "sse");
  assert.equal(a.log.of("disconnected").length, 2, "two refused upgrades first");
  const room = `room:${newUser("r")}`;
  await a.c.subscribe(room);
  const p = client(gw.url, { transports: ["sse"] });
  await p.c.publish(room, { n: 1 });
  await waitFor(() => texts(a.log, room).length === 1, "a message");
  // Restart: the client comes back over SSE, and learns the honest
  // outcome of its resume (an embedded gateway's history died with it).
  await gw.kill();
  await waitFor(() => a.c.state === "disconnected", "disconnected");
  await gw.run();
  await waitFor(() => a.log.of("connected").length === 2, "the reconnect", 15_000);
  assert.equal(a.log.of("connected")[1].transport, "sse");
  const un = await waitFor(() => a.log.of("unrecovered").find((u) => u.ch === room), "unrecovered");
  assert.equal(un.reason, "epoch_changed");
  await waitFor(() => p.c.state === "connected", "the publisher back");
  await p.c.publish(room, { n: 2 });
  await waitFor(() => texts(a.log, room).includes(2), "live after the restart");
  a.c.close();
  p.c.close();
  await gw.stop();
});

test("over SSE: missed messages are replayed after a cut, and an unanswered publish is stored once", async () => {
  const gw = await Gateway.start();
  const proxy = await Proxy.start(gw.url);
  const a = client(proxy.url, { transports: ["sse"] });
  const p = client(gw.url);
  const room = `room:${newUser("r")}`;
  await Promise.all([a.c.subscribe(room), p.c.subscribe(room)]);
  for (let n = 1; n <= 3; n++) await p.c.publish(room, { n });
  await waitFor(() => texts(a.log, room).length === 3, "the first three");
  proxy.refuse = true;
  proxy.cut();
  await waitFor(() => a.c.state !== "connected", "cut off");
  for (let n = 4; n <= 10; n++) await p.c.publish(room, { n });
  const pending = a.c.publish(room, { n: 11 }); // queued while away
  proxy.refuse = false;
  await waitFor(() => texts(a.log, room).length === 11, "the replay and the resent publish", 10_000);
  assert.deepEqual(texts(a.log, room), Array.from({ length: 11 }, (_, i) => i + 1));
  assert.ok((await pending).seq > 0);
  await sleep(200);
  assert.deepEqual(texts(p.log, room).filter((n) => n === 11), [11], "stored once");
  assert.equal(a.log.of("subscribed").filter((s) => s.ch === room)[1].recovered, true);
  a.c.close();
  p.c.close();
  proxy.close();
  await gw.stop();
});

test("over SSE, a quiet client stays connected: it answers the heartbeat comments", async () => {
  const gw = await Gateway.start({ EDGEGATE_HEARTBEAT__INTERVAL_MS: "300", EDGEGATE_HEARTBEAT__IDLE_TIMEOUT_MS: "1200" });
  const a = client(gw.url, { transports: ["sse"] });
  await waitFor(() => a.c.state === "connected", "connected");
  await sleep(3500);
  assert.equal(a.log.of("disconnected").length, 0, JSON.stringify(a.log.of("disconnected")));
  assert.equal(a.c.state, "connected");
  a.c.close();
  await gw.stop();
});
