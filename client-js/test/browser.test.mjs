// The SDK and the demo page in a real browser: Debian's chromium, headless,
// driven by puppeteer-core (nothing downloads a browser). Skipped where no
// chromium is installed, unless EG_REQUIRE_BROWSER=1 (scripts/test.sh).
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { Gateway, newUser, sleep } from "./helpers.mjs";
import { serve } from "../../examples/chat/serve.mjs";

const CHROMIUM = process.env.CHROMIUM_BIN ?? ["/usr/bin/chromium", "/usr/bin/chromium-browser"].find(existsSync);
const skip = !CHROMIUM && process.env.EG_REQUIRE_BROWSER !== "1" && "no chromium (apt-get install chromium)";
const SHOT = fileURLToPath(new URL("../../target/chat-demo.png", import.meta.url));

let gw, http, browser, base;
before(async () => {
  if (skip) return;
  const puppeteer = (await import("puppeteer-core")).default;
  gw = await Gateway.start({ EDGEGATE_LIMITS__RETRY_MS: "300" });
  http = await serve(0);
  base = `http://127.0.0.1:${http.address().port}`;
  browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    // Two pages chat side by side: a background tab must not be throttled
    // (puppeteer's click waits on the page's frames).
    args: [
      "--no-sandbox",
      "--disable-dev-shm-usage",
      "--disable-gpu",
      "--disable-background-timer-throttling",
      "--disable-backgrounding-occluded-windows",
      "--disable-renderer-backgrounding",
    ],
    protocolTimeout: 20_000,
  });
});
after(async () => {
  await browser?.close();
  http?.close();
  await gw?.stop();
});

/** A page of the demo; `opts.blockWebSocket` takes `WebSocket` away from it before any script runs. */
async function demo(user, opts = {}) {
  const page = await browser.newPage();
  await page.setViewport({ width: 900, height: 520 });
  const errors = [];
  page.on("pageerror", (e) => errors.push(e));
  if (opts.blockWebSocket) await page.evaluateOnNewDocument(() => { window.WebSocket = undefined; });
  await page.goto(`${base}/examples/chat/?gw=${encodeURIComponent(gw.url)}&user=${user}${opts.query ?? ""}`);
  await page.click("#connect");
  await page.waitForFunction(() => document.getElementById("state").textContent === "connected");
  page.errors = errors;
  return page;
}

const logText = (page) => page.$eval("#log", (el) => el.innerText);
async function waitLog(page, text) {
  try {
    // Polled on a timer: a page in the background gets no animation frames.
    await page.waitForFunction((t) => document.getElementById("log").innerText.includes(t), { timeout: 10_000, polling: 100 }, text);
  } catch (err) {
    throw new Error(`${JSON.stringify(text)} never showed in the log: ${JSON.stringify(await logText(page))}`, { cause: err });
  }
}

async function say(page, text) {
  await page.bringToFront();
  await page.type("#text", text);
  await page.keyboard.press("Enter");
}

test("two pages chat through the gateway in a room and by direct message, through the demo's UI", { skip }, async () => {
  const [an, bn] = [newUser("ann"), newUser("ben")];
  const room = newUser("lobby");
  const [a, b] = [await demo(an), await demo(bn)];
  for (const p of [a, b]) {
    await p.bringToFront();
    await p.type("#room", room);
    await p.click("#join");
    await p.waitForFunction((r) => document.getElementById("target").textContent === `room:${r}`, {}, room);
  }
  await say(a, "hello from ann");
  await waitLog(b, "hello from ann");
  await say(b, "hi ann, ben here");
  await waitLog(a, "hi ann, ben here");
  // A direct message: ann opens ben, ben's page opens ann's conversation by itself.
  await a.bringToFront();
  await a.type("#dmto", bn);
  await a.click("#dm");
  await say(a, "a secret for ben");
  await waitLog(b, "a secret for ben");
  assert.match(await logText(b), new RegExp(`@${an}`));
  assert.ok(await b.$eval("#dms", (el, u) => el.innerText.includes(u), an), "the conversation is listed");
  assert.equal(await b.$eval("#target", (el) => el.textContent), `user:${an}`, "and selected: a reply goes to ann");
  await say(b, "got it, ann");
  await waitLog(a, "got it, ann");
  assert.ok(!(await logText(a)).includes("disconnected"));
  assert.deepEqual([...a.errors, ...b.errors], []);
  await a.close();
  await b.close();
});

test("the demo shows who is here, who is typing, and a room's last messages", { skip }, async () => {
  const [an, bn] = [newUser("ann"), newUser("ben")];
  const room = newUser("hall");
  // Sixty messages before anyone opens the room.
  const { Client } = await import("../dist/index.js");
  const WebSocket = (await import("ws")).default;
  const pre = new Client({ url: gw.url, user: newUser("bot"), WebSocket });
  pre.connect();
  for (let i = 0; i < 60; i++) await pre.publish(`room:${room}`, { text: `old message ${i}` });
  pre.close();

  const a = await demo(an);
  await a.type("#room", room);
  await a.click("#join");
  // Opening the room shows its last 50 messages, older ones behind a button.
  await waitLog(a, "old message 59");
  let log = await logText(a);
  assert.ok(log.includes("old message 10") && !log.includes("old message 9\n"), log);
  await a.waitForFunction(() => !document.querySelector("#log li.more").hidden, { polling: 100 });
  await a.click("#log button.older");
  await waitLog(a, "old message 0");
  log = await logText(a);
  assert.ok(log.indexOf("old message 0") < log.indexOf("old message 10"), "older ones above");
  await a.waitForFunction(() => document.querySelector("#log li.more").hidden, { polling: 100 });
  const here = (page) => page.$eval("#people", (el) => el.innerText);
  await a.waitForFunction((u) => document.getElementById("people").innerText.includes(u), { polling: 100 }, an);

  // Ben joins: ann sees him arrive, then type.
  const b = await demo(bn);
  await b.type("#room", room);
  await b.click("#join");
  await a.waitForFunction((u) => document.getElementById("people").innerText.includes(u), { polling: 100 }, bn);
  assert.equal(await a.$eval("#present", (el) => el.textContent), "(2)");
  await say(b, "hi ann, I'm here for the meeting");
  await waitLog(a, "here for the meeting");
  await b.type("#text", "typing away");
  await a.waitForFunction((u) => document.getElementById("typing").textContent.includes(`${u} is typing`), { polling: 100 }, bn);
  mkdirSync(fileURLToPath(new URL("../../target", import.meta.url)), { recursive: true });
  await a.evaluate(() => {
    const l = document.getElementById("log");
    l.scrollTop = l.scrollHeight;
  });
  await a.screenshot({ path: SHOT });
  await b.keyboard.press("Enter");
  await waitLog(a, "typing away");
  await a.waitForFunction(() => document.getElementById("typing").textContent === "", { polling: 100 });
  // Ben leaves (his page goes): ann sees him go.
  await b.close();
  await a.waitForFunction((u) => !document.getElementById("people").innerText.includes(u), { timeout: 10_000, polling: 100 }, bn);
  assert.ok((await here(a)).includes(an));
  assert.deepEqual([...a.errors, ...b.errors], []);
  await a.close();
});

test("a page whose WebSocket is blocked falls back to SSE and chats with a WebSocket page in a room and by direct message", { skip }, async () => {
  const [sn, wn] = [newUser("sse"), newUser("web")];
  const room = newUser("fall");
  const s = await demo(sn, { blockWebSocket: true });
  const w = await demo(wn);
  assert.equal(await s.$eval("#transport", (el) => el.textContent), "SSE");
  assert.equal(await w.$eval("#transport", (el) => el.textContent), "WebSocket");
  for (const p of [s, w]) {
    await p.bringToFront();
    await p.type("#room", room);
    await p.click("#join");
    await p.waitForFunction((r) => document.getElementById("target").textContent === `room:${r}`, {}, room);
  }
  await say(s, "hello over sse");
  await waitLog(w, "hello over sse");
  await say(w, "hello over websocket");
  await waitLog(s, "hello over websocket");
  // Who is here works over SSE too.
  await s.waitForFunction((u) => document.getElementById("people").innerText.includes(u), { polling: 100 }, wn);
  // Direct messages both ways.
  await s.bringToFront();
  await s.type("#dmto", wn);
  await s.click("#dm");
  await say(s, "a secret over sse");
  await waitLog(w, "a secret over sse");
  await say(w, "got it over websocket");
  await waitLog(s, "got it over websocket");
  assert.ok(!(await logText(s)).includes("disconnected"));
  assert.deepEqual([...s.errors, ...w.errors], []);
  assert.ok((await metric("edgegate_connections", 'transport="sse"')) >= 1, "the page's stream counts as SSE");
  // ?transport=sse asks for SSE whatever the browser can do.
  const e = await demo(newUser("explicit"), { query: "&transport=sse" });
  assert.equal(await e.$eval("#transport", (el) => el.textContent), "SSE");
  await e.close();
  await s.close();
  await w.close();
});

/** Runs the SDK inside the page (imported as the browser loads it). */
async function sdkPage(opts = {}) {
  const page = await browser.newPage();
  // A network (or a policy) that lets no WebSocket through: the constructor throws.
  if (opts.blockWebSocket) {
    await page.evaluateOnNewDocument(() => {
      window.WebSocket = class {
        constructor() {
          throw new DOMException("blocked", "SecurityError");
        }
      };
    });
  }
  await page.goto(`${base}/examples/chat/`);
  await page.evaluate(async () => {
    const sdk = await import("/client-js/dist/index.js");
    window.sdk = sdk;
    window.events = [];
    window.make = (opts) => {
      const c = new sdk.Client(opts);
      for (const ev of ["state", "connected", "disconnected", "message", "subscribed", "unrecovered", "stopped"]) {
        c.on(ev, (v) => window.events.push([ev, JSON.parse(JSON.stringify(v ?? null, (k, x) => (x instanceof Uint8Array ? [...x] : x)))]));
      }
      c.connect();
      return c;
    };
  });
  return page;
}

for (const blocked of [false, true]) test(`a page keeps working across a gateway restart and reports the honest recovery outcome${blocked ? " (WebSocket blocked: over SSE)" : ""}`, { skip }, async () => {
  const page = await sdkPage({ blockWebSocket: blocked });
  const room = `room:${newUser("r")}`;
  await page.evaluate(async (url, user, room) => {
    window.c = window.make({ url, user, backoff: { baseMs: 50, capMs: 500 } });
    await window.c.subscribe(room);
    await window.c.publish(room, { text: "before" });
  }, gw.url, newUser("page"), room);
  await gw.kill();
  await sleep(700);
  await gw.run();
  await page.waitForFunction(() => window.events.filter(([e]) => e === "connected").length === 2, { timeout: 15_000 });
  await page.waitForFunction((room) => window.events.some(([e, u]) => e === "unrecovered" && u.ch === room), { timeout: 5000 }, room);
  const un = await page.evaluate(() => window.events.filter(([e]) => e === "unrecovered").map(([, u]) => u));
  // An embedded gateway's restart lost its history, and says so: for the
  // room and for the user's own stream.
  assert.deepEqual(un.map((u) => u.reason), ["epoch_changed", "epoch_changed"]);
  assert.ok(un.some((u) => u.ch.startsWith("user:")));
  const got = await page.evaluate(async (room) => {
    const ack = await window.c.publish(room, { text: "after" });
    await new Promise((r) => setTimeout(r, 200));
    return { ack, texts: window.events.filter(([e]) => e === "message").map(([, m]) => m.data.text) };
  }, room);
  assert.equal(got.ack.seq, 1, "the new epoch starts over");
  assert.deepEqual(got.texts, ["before", "after"]);
  const disc = await page.evaluate(() => window.events.filter(([e]) => e === "disconnected").map(([, d]) => d));
  assert.ok(disc.length >= 1 && disc.every((d) => d.retryInMs !== undefined), "it kept retrying by itself");
  const over = await page.evaluate(() => window.events.filter(([e]) => e === "connected").map(([, w]) => w.transport));
  assert.deepEqual(over, blocked ? ["sse", "sse"] : ["websocket", "websocket"]);
  await page.evaluate(() => window.c.close());
  await page.close();
});

test("the binary encoding works in the browser", { skip }, async () => {
  const page = await sdkPage();
  const room = `room:${newUser("bin")}`;
  const out = await page.evaluate(async (url, room) => {
    const a = window.make({ url, user: "binA", encoding: "binary" });
    const b = window.make({ url, user: "binB", encoding: "binary" });
    await Promise.all([a.subscribe(room), b.subscribe(room)]);
    await a.publish(room, { text: "json in binary" });
    await a.publish(room, new Uint8Array([0, 255, 7]));
    const echo = await b.request("svc:echo", new Uint8Array([1, 2, 3]));
    await new Promise((r) => setTimeout(r, 300));
    const msgs = window.events.filter(([e]) => e === "message").map(([, m]) => m);
    a.close();
    b.close();
    return { msgs, echo: [...echo], protocol: "edgegate.v1.bin" };
  }, gw.url, room);
  const seen = out.msgs.filter((m) => m.from === "binA");
  assert.equal(seen.length, 4, "both messages reached both pages");
  assert.deepEqual(seen[0].data, { text: "json in binary" });
  assert.deepEqual(seen.find((m) => m.bytes).bytes, [0, 255, 7]);
  assert.deepEqual(out.echo, [1, 2, 3]);
  await page.close();
});

/** Sum of a Prometheus metric's series whose labels include `labels`. */
async function metric(name, labels = "") {
  let sum = 0;
  for (const line of (await gw.metrics()).split("\n")) {
    if (line.startsWith(`${name}{`) && line.includes(labels)) sum += Number(line.split(" ").pop());
  }
  return sum;
}

test("the browser negotiates permessage-deflate: long messages travel compressed both ways", { skip }, async () => {
  const page = await sdkPage();
  const room = `room:${newUser("z")}`;
  const [outZ, inZ] = [await metric("edgegate_ws_deflate_bytes_total", 'dir="out",form="compressed"'), await metric("edgegate_ws_deflate_bytes_total", 'dir="in",form="compressed"')];
  const text = "a chat message long enough to be worth compressing, ".repeat(8);
  const got = await page.evaluate(async (url, room, text) => {
    const c = window.make({ url, user: "zpage" });
    await c.subscribe(room);
    await c.publish(room, { text });
    await new Promise((r) => setTimeout(r, 300));
    c.close();
    return window.events.filter(([e]) => e === "message").map(([, m]) => m.data.text);
  }, gw.url, room, text);
  assert.deepEqual(got, [text], "inflated by the browser to the same text");
  assert.ok((await metric("edgegate_ws_deflate_bytes_total", 'dir="in",form="compressed"')) > inZ, "Chromium compressed its publish");
  assert.ok((await metric("edgegate_ws_deflate_bytes_total", 'dir="out",form="compressed"')) > outZ, "the gateway compressed the message to it");
  await page.close();
});
