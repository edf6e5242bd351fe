// The demo chat page: the SDK and nothing else. Query parameters preset the
// form: ?gw=ws://127.0.0.1:8080/ws&user=alice&enc=binary
import { Client } from "../../client-js/dist/index.js";

const $ = (id) => document.getElementById(id);
const q = new URLSearchParams(location.search);
$("url").value = q.get("gw") ?? `ws://${location.hostname || "127.0.0.1"}:8080/ws`;
$("user").value = q.get("user") ?? "";

let client;
let target; // the channel the footer sends to
const joined = new Set();

function line(parts, cls) {
  const li = document.createElement("li");
  if (cls) li.className = cls;
  for (const [text, c] of parts) {
    const s = document.createElement("span");
    if (c) s.className = c;
    s.textContent = text;
    li.append(s, " ");
  }
  $("log").append(li);
  li.scrollIntoView({ block: "end" });
}

function select(ch) {
  target = ch;
  $("target").textContent = ch;
  for (const li of document.querySelectorAll("aside li")) li.classList.toggle("on", li.dataset.ch === ch);
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

$("connect").onclick = () => {
  client?.close();
  joined.clear();
  $("rooms").replaceChildren();
  $("dms").replaceChildren();
  const user = $("user").value.trim();
  client = new Client({ url: $("url").value.trim(), user, encoding: q.get("enc") === "binary" ? "binary" : "json" });
  client.on("state", (s) => {
    $("state").textContent = s;
    $("state").className = s;
  });
  client.on("connected", (w) => ($("info").textContent = `${w.user} on ${w.node || "node"} shard ${w.shard}`));
  client.on("disconnected", (d) =>
    line([[`disconnected${d.code ? ` (${d.code})` : ""}: ${d.reason}` + (d.retryInMs !== undefined ? `, retrying in ${d.retryInMs} ms` : ""), "sys"]]));
  client.on("unrecovered", (u) => line([[`${u.ch}: missed messages could not be recovered (${u.reason})`, "sys"]]));
  client.on("stopped", (s) => line([[`stopped: ${s.reason}${s.code ? ` ${s.code}` : ""}`, "sys"]]));
  client.on("message", (m) => {
    const dm = m.ch === `user:${client.welcome?.user}`;
    if (dm && m.from !== client.welcome?.user) addChannel("dms", `user:${m.from}`, m.from);
    const text = typeof m.data?.text === "string" ? m.data.text : JSON.stringify(m.data ?? [...(m.bytes ?? [])]);
    line([[dm ? `@${m.from}` : m.ch, "ch"], [m.from ?? "?", "from"], [text, "text"]]);
  });
  client.connect();
};

$("join").onclick = async () => {
  const id = $("room").value.trim();
  if (!client || !id) return;
  try {
    await client.subscribe(`room:${id}`);
    addChannel("rooms", `room:${id}`, `#${id}`);
    $("room").value = "";
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
  try {
    await client.publish(target, { text });
    // A direct message is not echoed by the gateway to the sender: show it here.
    if (target.startsWith("user:")) line([[`@${target.slice(5)}`, "ch"], [client.welcome?.user ?? "me", "from"], [text, "text"]]);
  } catch (err) {
    line([[`not sent: ${err.message}`, "sys"]]);
  }
}
$("send").onclick = send;
// Not `onkeydown = (e) => ... && send()`: a handler that returns false cancels the key.
$("text").addEventListener("keydown", (e) => {
  if (e.key === "Enter") send();
});
