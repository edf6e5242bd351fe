// The demo chat page: the SDK and nothing else. Query parameters preset the
// form: ?gw=ws://127.0.0.1:8080/ws&user=alice&enc=binary; ?transport=sse
// talks SSE only (as where WebSocket is refused: the SDK falls back to it by
// itself when WebSocket cannot get through).
//
// Rooms show who is here (presence: the count and `members` events), who is
// typing (ephemeral messages: never stored), and open with their last 50
// messages (a history page), with older ones a click away.
import { Client } from "../../client-js/dist/index.js";

const $ = (id) => document.getElementById(id);
const q = new URLSearchParams(location.search);
$("url").value = q.get("gw") ?? `ws://${location.hostname || "127.0.0.1"}:8080/ws`;
$("user").value = q.get("user") ?? "";

const PAGE = 50;
let client;
let target; // the channel the footer sends to
const joined = new Set();
/** room → Set of users present (from the count's query and `members`). */
const people = new Map();
/** room → the oldest seq shown, and its "older messages" line. */
const older = new Map();
/** channel → user → when their typing indicator goes away. */
const typing = new Map();

function entry(parts, cls) {
  const li = document.createElement("li");
  if (cls) li.className = cls;
  for (const [text, c] of parts) {
    const s = document.createElement("span");
    if (c) s.className = c;
    s.textContent = text;
    li.append(s, " ");
  }
  return li;
}

function line(parts, cls) {
  const li = entry(parts, cls);
  $("log").append(li);
  li.scrollIntoView({ block: "end" });
}

const textOf = (m) =>
  typeof m.data?.text === "string" ? m.data.text : JSON.stringify(m.data ?? [...(m.bytes ?? [])]);

function select(ch) {
  target = ch;
  $("target").textContent = ch;
  for (const li of document.querySelectorAll("aside li[data-ch]")) li.classList.toggle("on", li.dataset.ch === ch);
  showPeople();
  showTyping();
}

function addChannel(list, ch, label) {
  if (joined.has(ch)) return select(ch);
  joined.add(ch);
  const li = document.createElement("li");
  li.dataset.ch = ch;
  li.textContent = label;
  li.onclick = () => select(ch);
  $(list).append(li);
  select(ch);
}

function showPeople() {
  const set = people.get(target);
  $("present").textContent = set ? `(${set.size})` : "";
  $("people").replaceChildren(
    ...[...(set ?? [])].sort().map((u) => {
      const li = document.createElement("li");
      li.textContent = u;
      return li;
    }),
  );
}

function showTyping() {
  const now = Date.now();
  const who = [...(typing.get(target) ?? new Map())].filter(([, until]) => until > now).map(([u]) => u);
  $("typing").textContent = who.length ? `${who.join(", ")} ${who.length > 1 ? "are" : "is"} typing…` : "";
}
setInterval(showTyping, 500);

function setTyping(ch, user, on) {
  if (!typing.has(ch)) typing.set(ch, new Map());
  if (on) typing.get(ch).set(user, Date.now() + 3000);
  else typing.get(ch).delete(user);
  if (ch === target) showTyping();
}

/** Inserts a page of history after `anchor` (oldest first): before whatever came since. */
function insertPage(room, page, anchor) {
  for (const m of page.messages) {
    const li = entry([[m.ch, "ch"], [m.from ?? "?", "from"], [textOf(m), "text"]], "hist");
    anchor.after(li);
    anchor = li;
  }
  const o = older.get(room);
  if (page.messages.length) o.seq = page.messages[0].seq;
  o.line.hidden = !page.more;
}

/** The previous page of `room`, above what is shown. */
async function loadOlder(room) {
  const o = older.get(room);
  const page = await client.history(room, { limit: PAGE, before: o.seq });
  insertPage(room, page, o.line);
}

/** Who is in `room` now: every page of the presence query. */
async function loadPeople(room) {
  const set = new Set();
  let after;
  do {
    const p = await client.presence(room, after ? { limit: 1000, after } : { limit: 1000 });
    for (const u of p.users) set.add(u);
    after = p.next;
  } while (after);
  people.set(room, set);
  if (room === target) showPeople();
}

$("connect").onclick = () => {
  client?.close();
  joined.clear();
  people.clear();
  older.clear();
  $("rooms").replaceChildren();
  $("dms").replaceChildren();
  const user = $("user").value.trim();
  const transports = q.get("transport") === "sse" ? ["sse"] : undefined;
  client = new Client({ url: $("url").value.trim(), user, encoding: q.get("enc") === "binary" ? "binary" : "json", transports });
  client.on("state", (s) => {
    $("state").textContent = s;
    $("state").className = s;
  });
  client.on("connected", (w) => {
    $("info").textContent = `${w.user} on ${w.node || "node"} shard ${w.shard}, over`;
    $("transport").textContent = w.transport === "sse" ? "SSE" : "WebSocket";
  });
  client.on("disconnected", (d) =>
    line([[`disconnected${d.code ? ` (${d.code})` : ""}: ${d.reason}` + (d.retryInMs !== undefined ? `, retrying in ${d.retryInMs} ms` : ""), "sys"]]));
  client.on("unrecovered", (u) => line([[`${u.ch}: missed messages could not be recovered (${u.reason})`, "sys"]]));
  client.on("stopped", (s) => line([[`stopped: ${s.reason}${s.code ? ` ${s.code}` : ""}`, "sys"]]));
  // Presence is at most once: after a (re)subscription, ask again.
  client.on("subscribed", (r) => r.present !== undefined && loadPeople(r.ch).catch(() => {}));
  client.on("members", (m) => {
    const set = people.get(m.ch) ?? new Set();
    for (const u of m.join ?? []) set.add(u);
    for (const u of m.leave ?? []) set.delete(u);
    people.set(m.ch, set);
    if (!m.join && !m.leave) loadPeople(m.ch).catch(() => {}); // a big room: the count only
    if (m.ch === target) showPeople();
  });
  client.on("message", (m) => {
    const me = client.welcome?.user;
    const dm = m.ch === `user:${me}`;
    const conv = dm ? `user:${m.from}` : m.ch;
    if (m.ephemeral) {
      if (m.from !== me && m.data && typeof m.data.typing === "boolean") setTyping(conv, m.from, m.data.typing);
      return;
    }
    if (dm && m.from !== me) addChannel("dms", conv, m.from);
    setTyping(conv, m.from, false);
    line([[dm ? `@${m.from}` : m.ch, "ch"], [m.from ?? "?", "from"], [textOf(m), "text"]]);
  });
  client.connect();
};

$("join").onclick = async () => {
  const id = $("room").value.trim();
  if (!client || !id) return;
  const room = `room:${id}`;
  try {
    const r = await client.subscribe(room, { presence: true });
    addChannel("rooms", room, `#${id}`);
    $("room").value = "";
    // The room's last messages, above anything that arrives meanwhile.
    const more = entry([]);
    more.className = "more";
    const btn = document.createElement("button");
    btn.textContent = "older messages";
    btn.className = "older";
    btn.onclick = () => loadOlder(room).catch((err) => line([[`history: ${err.message}`, "sys"]]));
    more.append(btn);
    more.hidden = true;
    $("log").append(more);
    older.set(room, { line: more, seq: undefined });
    const page = await client.history(room, { limit: PAGE, before: (r.seq ?? 0) + 1 });
    insertPage(room, page, more);
  } catch (err) {
    line([[`cannot join ${id}: ${err.message}`, "sys"]]);
  }
};

$("dm").onclick = () => {
  const id = $("dmto").value.trim();
  if (id) addChannel("dms", `user:${id}`, id);
  $("dmto").value = "";
};

async function send() {
  const text = $("text").value;
  if (!client || !target || !text) return;
  $("text").value = "";
  lastTyping = 0;
  try {
    await client.publish(target, { text });
    // A direct message is not echoed by the gateway to the sender: show it here.
    if (target.startsWith("user:")) line([[`@${target.slice(5)}`, "ch"], [client.welcome?.user ?? "me", "from"], [text, "text"]]);
  } catch (err) {
    line([[`not sent: ${err.message}`, "sys"]]);
  }
}
$("send").onclick = send;

// "… is typing": an ephemeral message at most every 2 s while keys go down.
let lastTyping = 0;
$("text").addEventListener("input", () => {
  if (!client || !target || !$("text").value || Date.now() - lastTyping < 2000) return;
  lastTyping = Date.now();
  client.publish(target, { typing: true }, { ephemeral: true }).catch(() => {});
});
// Not `onkeydown = (e) => ... && send()`: a handler that returns false cancels the key.
$("text").addEventListener("keydown", (e) => {
  if (e.key === "Enter") send();
});
