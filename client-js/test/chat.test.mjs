// The SDK against the real gateway, in both encodings: subscribe, publish
// (JSON and bytes), direct messages, requests, refusals.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { Client, EdgegateError } from "../dist/index.js";
import { Gateway, newUser, record, sleep, waitFor } from "./helpers.mjs";

let gw;
before(async () => {
  gw = await Gateway.start();
});
after(async () => {
  await gw.stop();
});

function client(user, encoding, extra = {}) {
  const c = new Client({ url: gw.url, user, encoding, WebSocket, ...extra });
  const log = record(c);
  c.connect();
  return { c, log };
}

for (const encoding of ["json", "binary"]) {
  describe(`${encoding} encoding`, () => {
    test("two users chat in a room and by direct message", async () => {
      const [an, bn] = [newUser("alice"), newUser("bob")];
      const a = client(an, encoding);
      const b = client(bn, encoding);
      const room = `room:${newUser("r")}`;
      const [ra, rb] = await Promise.all([a.c.subscribe(room), b.c.subscribe(room)]);
      assert.equal(ra.ch, room);
      assert.equal(rb.seq, 0, "an empty stream's top");
      assert.equal(typeof rb.epoch, "string");
      assert.equal(a.c.welcome.user, an);
      assert.ok(a.c.welcome.hbMs > 0 && a.c.welcome.maxFrame > 0);

      const ack = await a.c.publish(room, { text: "hi" });
      assert.equal(ack.seq, 1);
      assert.equal(ack.duplicate, false);
      const bytes = Uint8Array.from([0, 1, 2, 255]);
      const ack2 = await a.c.publish(room, bytes);
      assert.equal(ack2.seq, 2);
      await waitFor(() => b.log.of("message").length >= 2, "two room messages");
      const [m1, m2] = b.log.of("message");
      assert.deepEqual(m1, { ch: room, seq: 1, from: an, id: m1.id, data: { text: "hi" } });
      assert.deepEqual(m2.bytes, bytes);
      assert.equal(m2.seq, 2);
      // The publisher, subscribed too, sees its own messages in the same order.
      await waitFor(() => a.log.of("message").length >= 2, "own messages");

      await b.c.publish(`user:${an}`, { dm: "psst" });
      const dm = await waitFor(() => a.log.of("message").find((m) => m.ch === `user:${an}`), "the direct message");
      assert.deepEqual(dm.data, { dm: "psst" });
      assert.equal(dm.from, bn);
      assert.ok(dm.seq >= 1, "a user stream's message has a position");

      await b.c.unsubscribe(room);
      await a.c.publish(room, { text: "after" });
      await waitFor(() => a.log.of("message").some((m) => m.data?.text === "after"), "the third message");
      await sleep(100);
      assert.equal(b.log.of("message").filter((m) => m.ch === room).length, 2, "no message after unsubscribe");
      a.c.close();
      b.c.close();
      assert.deepEqual(a.log.of("stopped"), [{ reason: "closed" }]);
    });

    test("requests get replies, refusals reject with the gateway's err code", async () => {
      const { c } = client(newUser(), encoding);
      assert.deepEqual(await c.request("svc:echo", { q: [1, 2] }), { q: [1, 2] });
      assert.deepEqual(await c.request("svc:echo", Uint8Array.from([9, 8])), Uint8Array.from([9, 8]));
      const codeOf = (p) => p.then(() => "resolved", (e) => (e instanceof EdgegateError ? e.code : String(e)));
      assert.equal(await codeOf(c.subscribe("foo:x")), "bad_channel");
      assert.equal(await codeOf(c.subscribe("room:bad id!")), "bad_channel");
      assert.equal(await codeOf(c.publish("svc:echo", 1)), "bad_request");
      assert.equal(await codeOf(c.request("room:x", 1)), "bad_channel");
      assert.equal(await codeOf(c.subscribe(`user:${newUser()}`)), "forbidden");
      assert.equal(await codeOf(c.request("svc:nobody", 1)), "no_service");
      c.close();
      assert.equal(await codeOf(c.publish("room:x", 1)), "closed");
    });

    test("an envelope over max_frame is refused here, not sent to be closed 4006", async () => {
      const { c, log } = client(newUser(), encoding);
      await waitFor(() => c.state === "connected", "connected");
      const big = "x".repeat(c.welcome.maxFrame);
      await assert.rejects(c.publish("room:big", { big }), (e) => e.code === "too_large");
      // Many small publishes in one tick are batched within max_frame.
      const room = `room:${newUser("batch")}`;
      await c.subscribe(room);
      const text = "y".repeat(1000);
      const acks = await Promise.all(Array.from({ length: 200 }, () => c.publish(room, { text })));
      assert.equal(new Set(acks.map((a) => a.seq)).size, 200);
      await waitFor(() => log.of("message").length === 200, "200 messages");
      assert.equal(log.of("disconnected").length, 0);
      c.close();
    });
  });
}
