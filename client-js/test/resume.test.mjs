// Resume (docs/protocol.md §7) through a proxy that cuts the client off
// while the gateway keeps running: the missed messages follow once, in
// order; an unanswered publish is resent and stored once; what history
// cannot cover is reported.
import { test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { Client } from "../dist/index.js";
import { Gateway, Proxy, newUser, record, sleep, waitFor } from "./helpers.mjs";

function client(url, extra = {}) {
  const c = new Client({ url, user: newUser(), WebSocket, backoff: { baseMs: 20, capMs: 200 }, ...extra });
  const log = record(c);
  c.connect();
  return { c, log };
}

const texts = (log, ch) => log.of("message").filter((m) => m.ch === ch).map((m) => m.data.n);

for (const encoding of ["json", "binary"]) {
  test(`${encoding}: messages missed while cut off are replayed once, in order, rooms and direct`, async () => {
    const gw = await Gateway.start();
    const proxy = await Proxy.start(gw.url);
    const a = client(proxy.url, { encoding });
    const p = client(gw.url, { encoding });
    const room = `room:${newUser("r")}`;
    await a.c.subscribe(room);
    for (let n = 1; n <= 5; n++) await p.c.publish(room, { n });
    await waitFor(() => texts(a.log, room).length === 5, "the first five");
    proxy.refuse = true;
    proxy.cut();
    await waitFor(() => a.c.state !== "connected", "cut off");
    const own = `user:${a.c.welcome.user}`;
    for (let n = 6; n <= 25; n++) await p.c.publish(room, { n });
    for (let n = 1; n <= 3; n++) await p.c.publish(own, { n });
    await sleep(200);
    proxy.refuse = false;
    await waitFor(() => texts(a.log, room).length === 25 && texts(a.log, own).length === 3, "the replay", 10_000);
    // Live traffic after the replay, with no gap.
    for (let n = 26; n <= 30; n++) await p.c.publish(room, { n });
    await waitFor(() => texts(a.log, room).length === 30, "live after the replay");
    await sleep(100);
    assert.deepEqual(texts(a.log, room), Array.from({ length: 30 }, (_, i) => i + 1));
    assert.deepEqual(texts(a.log, own), [1, 2, 3]);
    const seqs = a.log.of("message").filter((m) => m.ch === room).map((m) => m.seq);
    assert.deepEqual(seqs, [...seqs].sort((x, y) => x - y), "seq order");
    const sub = a.log.of("subscribed").filter((s) => s.ch === room);
    assert.equal(sub.length, 2);
    assert.equal(sub[1].recovered, true);
    assert.equal(a.c.welcome.stream.recovered, true, "the user's own stream recovered at hello");
    assert.equal(a.log.of("unrecovered").length, 0);
    a.c.close();
    p.c.close();
    proxy.close();
    await gw.stop();
  });
}

test("a publish whose ok was lost is resent with the same id and delivered once", async () => {
  const gw = await Gateway.start();
  const proxy = await Proxy.start(gw.url);
  const a = client(proxy.url);
  const s = client(gw.url);
  const room = `room:${newUser("r")}`;
  await Promise.all([a.c.subscribe(room), s.c.subscribe(room)]);
  proxy.silence.down = true; // the gateway hears the pub; its ok never arrives
  const ack = a.c.publish(room, { n: 1 });
  await waitFor(() => texts(s.log, room).length === 1, "the message stored and delivered");
  proxy.silence.down = false;
  proxy.cut();
  const got = await ack;
  assert.equal(got.duplicate, true, "answered with the original seq");
  assert.equal(got.seq, s.log.of("message")[0].seq);
  assert.equal(a.c.stats.resent, 1);
  await a.c.publish(room, { n: 2 });
  await waitFor(() => texts(s.log, room).length === 2, "the next message");
  await sleep(200);
  assert.deepEqual(texts(s.log, room), [1, 2], "delivered once");
  assert.deepEqual(texts(a.log, room).filter((n) => n === 1).length, 1, "the publisher saw it once too");
  a.c.close();
  s.c.close();
  proxy.close();
  await gw.stop();
});

test("history that no longer covers the gap: unrecovered with expired and oldest", async () => {
  const gw = await Gateway.start({ EDGEGATE_HISTORY__MAX_MESSAGES: "5" });
  const proxy = await Proxy.start(gw.url);
  const a = client(proxy.url);
  const p = client(gw.url);
  const room = `room:${newUser("r")}`;
  await a.c.subscribe(room);
  await p.c.publish(room, { n: 1 });
  await waitFor(() => texts(a.log, room).length === 1, "the first");
  proxy.refuse = true;
  proxy.cut();
  await waitFor(() => a.c.state !== "connected", "cut off");
  for (let n = 2; n <= 12; n++) await p.c.publish(room, { n });
  proxy.refuse = false;
  const un = await waitFor(() => a.log.of("unrecovered")[0], "unrecovered", 10_000);
  assert.equal(un.ch, room);
  assert.equal(un.reason, "expired");
  assert.equal(un.oldest, 8);
  await p.c.publish(room, { n: 13 });
  await waitFor(() => texts(a.log, room).includes(13), "live traffic goes on");
  assert.deepEqual(texts(a.log, room), [1, 13], "nothing partial replayed");
  a.c.close();
  p.c.close();
  proxy.close();
  await gw.stop();
});
