// Tokens: the refresh hook after 4001 and 4008, and before exp on an open
// connection (hello with the new token, no reconnect).
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { Client } from "../dist/index.js";
import { Gateway, jwt, newUser, record, sleep, waitFor } from "./helpers.mjs";

const SECRET = "js-test-secret-" + "0123456789abcdef".repeat(4);
let gw;
before(async () => {
  gw = await Gateway.start({
    EDGEGATE_AUTH__MODE: "jwt",
    EDGEGATE_AUTH__SECRET: SECRET,
    EDGEGATE_AUTH__LEEWAY_MS: "0",
  });
});
after(async () => {
  await gw.stop();
});

function client(token, refreshToken) {
  const asked = [];
  const hook = refreshToken && (async (why) => {
    asked.push(why);
    return refreshToken(why);
  });
  const c = new Client({ url: gw.url, token, refreshToken: hook, WebSocket, backoff: { baseMs: 20, capMs: 200 } });
  const log = record(c);
  c.connect();
  return { c, log, asked };
}

test("4001: the hook is asked for a new token, and the client gets in with it", async () => {
  const user = newUser();
  const a = client(jwt(user, "not the secret"), () => jwt(user, SECRET));
  await waitFor(() => a.c.state === "connected", "connected with the refreshed token");
  assert.equal(a.log.of("disconnected")[0].code, 4001);
  assert.deepEqual(a.asked, ["unauthorized"]);
  assert.equal(a.c.welcome.user, user);
  a.c.close();
});

test("4008: an expired token is refreshed and the client reconnects", async () => {
  const user = newUser();
  // The hook cannot help before exp (undefined), only after the 4008.
  const a = client(jwt(user, SECRET, 2), (why) => (why === "expired" ? jwt(user, SECRET, 300) : undefined));
  await waitFor(() => a.c.state === "connected", "connected");
  const conn = a.c.welcome.conn;
  await waitFor(() => a.log.of("disconnected").length === 1, "the expiry", 5000);
  assert.equal(a.log.of("disconnected")[0].code, 4008);
  await waitFor(() => a.log.of("connected").length === 2, "the reconnect");
  assert.notEqual(a.c.welcome.conn, conn);
  assert.deepEqual(a.asked, ["expiring", "expired"]);
  a.c.close();
});

test("before exp the client refreshes in place: the same connection outlives its first token", async () => {
  const user = newUser();
  const a = client(jwt(user, SECRET, 2), () => jwt(user, SECRET, 300));
  await waitFor(() => a.c.state === "connected", "connected");
  const conn = a.c.welcome.conn;
  await sleep(3500);
  assert.equal(a.log.of("disconnected").length, 0, "no 4008");
  assert.equal(a.c.welcome.conn, conn);
  assert.deepEqual(a.asked, ["expiring"]);
  // The refreshed connection still works.
  await a.c.subscribe(`room:${newUser("r")}`);
  a.c.close();
});

test("4001 without a hook that helps: retried with backoff, never silently given up", async () => {
  const user = newUser();
  const a = client(jwt(user, "wrong"), () => undefined);
  await waitFor(() => a.log.of("disconnected").length >= 3, "three refusals");
  assert.ok(a.log.of("disconnected").every((d) => d.code === 4001));
  assert.equal(a.log.of("stopped").length, 0);
  a.c.close();
});
