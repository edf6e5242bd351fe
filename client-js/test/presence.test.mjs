// The SDK's chat features against the real gateway, in both encodings:
// the own stream's position in every welcome, presence (count, members
// events, queries), ephemeral messages, history pages.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { Client, EdgegateError } from "../dist/index.js";
import { Gateway, newUser, record, sleep, waitFor } from "./helpers.mjs";

let gw;
before(async () => {
  gw = await Gateway.start({ EDGEGATE_PRESENCE__FLUSH_MS: "100" });
});
after(async () => {
  await gw.stop();
});

function client(user, encoding) {
  const c = new Client({ url: gw.url, user, encoding, WebSocket });
  const log = record(c);
  c.on("members", (m) => log.push(["members", m]));
  c.connect();
  return { c, log };
}

for (const encoding of ["json", "binary"]) {
  describe(`${encoding} encoding`, () => {
    test("the first welcome carries the own stream's position, without a recovery", async () => {
      const { c } = client(newUser(), encoding);
      await waitFor(() => c.state === "connected", "connected");
      assert.equal(c.welcome.stream.seq, 0);
      assert.equal(typeof c.welcome.stream.epoch, "string");
      assert.equal(c.welcome.stream.recovered, undefined, "no since was sent");
      c.close();
    });

    test("presence: the count, members events, queries, online", async () => {
      const room = `room:${newUser("p")}`;
      const [an, bn] = [newUser("alice"), newUser("bob")];
      const a = client(an, encoding);
      const r = await a.c.subscribe(room, { presence: true });
      assert.equal(r.present, 1);
      const b = client(bn, encoding);
      await b.c.subscribe(room);
      const m = await waitFor(() => a.log.of("members")[0], "a members event");
      assert.deepEqual(m, { ch: room, present: 2, join: [bn], leave: [] });
      assert.deepEqual(await b.c.presence(room), { total: 2, users: [an, bn].sort() });
      const p1 = await b.c.presence(room, { limit: 1 });
      assert.equal(p1.users.length, 1);
      const p2 = await b.c.presence(room, { limit: 1, after: p1.next });
      assert.deepEqual([...p1.users, ...p2.users], [an, bn].sort());
      assert.equal(p2.next, undefined);
      assert.deepEqual(await a.c.presence(`user:${bn}`), { total: 1, users: [bn] });
      await assert.rejects(a.c.presence(room, { limit: 0 }), (e) => e instanceof EdgegateError && e.code === "bad_request");
      b.c.close();
      const left = await waitFor(() => a.log.of("members").find((x) => x.leave?.length), "a leave");
      assert.deepEqual(left, { ch: room, present: 1, join: [], leave: [bn] });
      assert.deepEqual(await a.c.presence(`user:${bn}`), { total: 0, users: [] });
      a.c.close();
    });

    test("ephemeral messages: delivered, never a position, never in history", async () => {
      const room = `room:${newUser("e")}`;
      const a = client(newUser(), encoding);
      const b = client(newUser(), encoding);
      await Promise.all([a.c.subscribe(room), b.c.subscribe(room)]);
      const ack = await a.c.publish(room, { typing: true }, { ephemeral: true });
      assert.equal(ack.seq, undefined);
      const m = await waitFor(() => b.log.of("message").find((x) => x.ephemeral), "the ephemeral message");
      assert.deepEqual(m, { ch: room, from: a.c.welcome.user, id: m.id, ephemeral: true, data: { typing: true } });
      const stored = await a.c.publish(room, { text: "hi" });
      assert.equal(stored.seq, 1, "the ephemeral message took no seq");
      const h = await b.c.history(room);
      assert.deepEqual(h.messages.map((x) => x.data), [{ text: "hi" }]);
      a.c.close();
      b.c.close();
    });

    test("history pages: the last messages on opening a room, then older ones", async () => {
      const room = `room:${newUser("h")}`;
      const a = client(newUser(), encoding);
      for (let i = 0; i < 12; i++) await a.c.publish(room, { n: i });
      await a.c.publish(room, Uint8Array.from([7, 0, 255]));
      const b = client(newUser(), encoding); // no subscription needed
      await waitFor(() => b.c.state === "connected", "connected");
      const p = await b.c.history(room, { limit: 5 });
      assert.equal(p.top, 13);
      assert.equal(p.more, true);
      assert.deepEqual(p.messages.map((x) => x.seq), [9, 10, 11, 12, 13]);
      assert.deepEqual(p.messages[4].bytes, Uint8Array.from([7, 0, 255]));
      assert.deepEqual(p.messages[0], { ch: room, seq: 9, from: a.c.welcome.user, data: { n: 8 } });
      const older = await b.c.history(room, { before: p.messages[0].seq });
      assert.deepEqual(older.messages.map((x) => x.seq), [1, 2, 3, 4, 5, 6, 7, 8]);
      assert.equal(older.more, false);
      await assert.rejects(b.c.history(`user:${a.c.welcome.user}`), (e) => e.code === "forbidden");
      await sleep(10);
      a.c.close();
      b.c.close();
    });
  });
}
