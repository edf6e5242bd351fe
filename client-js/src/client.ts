/**
 * The reconnecting client: one connection at a time — a WebSocket, or
 * where WebSocket cannot get through, SSE (docs/protocol.md §10: an event
 * stream and POSTs, `sse.ts`) — with the protocol's client rules
 * (docs/protocol.md §5–§7) on top.
 *
 * - Transports are tried in the order of `transports` (WebSocket, then
 *   SSE): the next one is taken at once when a WebSocket cannot be made
 *   (no `WebSocket` here, a constructor that throws), and after two
 *   failures in a row before any `welcome` (a refused upgrade, a proxy
 *   that drops it) of a transport that never worked for this client. One
 *   that worked is kept: a gateway restart does not move a client off it.
 *
 * - Reconnects with exponential backoff and full jitter, waits at least a
 *   `bye`'s `retry_ms`, never reconnects after 4000/4005/4006, asks the
 *   token-refresh hook after 4001/4008 (and before the token's `exp`).
 * - Keeps the position (epoch, seq) of every subscription and of the user's
 *   own `user:<id>` stream; after a reconnect it re-subscribes with
 *   `meta.since` and says `hello.meta.since`, resends every publish that had
 *   no `ok` with the same id under the same `hello.meta.instance` (the
 *   gateway stores it once), drops a `msg` whose `seq` it delivered already,
 *   and emits `unrecovered` when the gateway cannot replay what was missed.
 * - Declares the connection dead when nothing arrives for
 *   `2 × hb_ms + 10 s`; pings after `hb_ms` of silence, because a browser
 *   answers the server's WebSocket pings without telling the page.
 *
 * Chat features (docs/protocol.md §8): `subscribe(ch, { presence: true })`
 * gives the room's count and `members` events; `presence(ch)` lists who is
 * there (or whether a user is online); `publish(ch, data, { ephemeral:
 * true })` sends a typing indicator or read marker that is never stored and
 * never moves a position; `history(ch)` reads a page of the last messages.
 *
 * Envelopes queued in one tick leave as one WebSocket message (a batch),
 * never larger than the gateway's `max_frame`.
 */

import { type BackoffOptions, classify, delay } from "./backoff.js";
import {
  decodeBinaryBatch, decodeJsonBatch, encodeBinaryBatch, encodeJson, type Envelope, type Type,
} from "./codec.js";
import { SseSocket, sseUrl } from "./sse.js";

/** A way to the gateway: WebSocket, or SSE (an event stream and POSTs). */
export type Transport = "websocket" | "sse";

/** What the client needs of a WebSocket: the browser's, or `ws`'s in Node. */
export interface WebSocketLike {
  binaryType: string;
  readonly protocol: string;
  send(data: string | Uint8Array): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}

/** A WebSocket constructor (`globalThis.WebSocket`, or `ws`'s default export). */
export type WebSocketCtor = new (url: string, protocols?: string | string[]) => WebSocketLike;

/** Why the hook is asked for a token. */
export type RefreshReason = "unauthorized" | "expired" | "expiring";

/** Client options. */
export interface ClientOptions {
  /** The gateway's WebSocket URL, e.g. `wss://edge.example.com/ws`. */
  url: string;
  /** `json` (subprotocol `edgegate.v1.json`, the default) or `binary` (`edgegate.v1.bin`). */
  encoding?: "json" | "binary";
  /** A JWT for `hello.meta.token` (`auth.mode = "jwt"`). */
  token?: string;
  /** The user id in `hello.meta.user` (only where the gateway runs without auth). */
  user?: string;
  /**
   * Returns a fresh token: after a close with 4001/4008, and before the
   * current token's `exp` (a minute, or 10 % of its lifetime, earlier).
   */
  refreshToken?: (why: RefreshReason) => Promise<string | undefined> | string | undefined;
  /** `hello.meta.instance`, scoping publish ids; default: random per client. */
  instance?: string;
  /** `hello.meta.client`. */
  clientName?: string;
  /** The WebSocket constructor; default `globalThis.WebSocket` (Node < 22 has none: pass `ws`). */
  WebSocket?: WebSocketCtor;
  /** Transports to try, in order; default `["websocket", "sse"]`. SSE is JSON only. */
  transports?: Transport[];
  /** The SSE URL; default: `url` with `http(s):` and `/ws` → `/sse`. */
  sseUrl?: string;
  /** Reconnect backoff. */
  backoff?: BackoffOptions;
  /** How long `subscribe`/`unsubscribe`/`publish`/`request` wait for an answer, ms. Default 10 000. */
  timeoutMs?: number;
  /** Silence after which the connection is dead, ms. Default `2 × hb_ms + 10 000`. */
  idleTimeoutMs?: number;
}

/** A position in a channel's stream (docs/protocol.md §7). */
export interface Position {
  epoch: string;
  seq: number;
}

/** The gateway's `welcome`. */
export interface Welcome {
  conn: string;
  user: string;
  node: string;
  shard: number;
  hbMs: number;
  maxFrame: number;
  /** The user's own stream: its position, and a recovery's outcome. */
  stream?: SubResult;
  /** The transport this connection came over. */
  transport: Transport;
}

/** The answer to a `sub`: the stream's top and the recovery's outcome. */
export interface SubResult {
  ch: string;
  /** The stream's latest `seq` (0 when empty); absent without history. */
  seq?: number;
  epoch?: string;
  /** Present when the client asked to recover (`since`). */
  recovered?: boolean;
  reason?: string;
  oldest?: number;
  /** Users present in the room, for a `subscribe` with `presence`. */
  present?: number;
}

/** Options of {@link Client.subscribe}. */
export interface SubscribeOptions {
  /** Watch the room's presence: `present` in the result, `members` events after it. */
  presence?: boolean;
}

/** Options of {@link Client.publish}. */
export interface PublishOptions {
  /**
   * Never stored: delivered to the channel's current subscribers only, no
   * `seq`, no history, not resent after a reconnect, and dropped for a
   * subscriber that is behind (typing indicators, read markers, cursors).
   */
  ephemeral?: boolean;
}

/** A room's presence changes (`members`), batched by the gateway. */
export interface Members {
  ch: string;
  /** Users present now. */
  present: number;
  /** Who came (absent in rooms past the gateway's `diff_limit`). */
  join?: string[];
  /** Who left. */
  leave?: string[];
}

/** A page of a presence query. */
export interface PresencePage {
  /** Users present in all. */
  total: number;
  /** User ids in byte order. */
  users: string[];
  /** Pass as `after` for the next page; absent on the last one. */
  next?: string;
}

/** A page of a channel's history. */
export interface HistoryPage {
  epoch: string;
  /** The stream's latest `seq`. */
  top: number;
  /** Oldest first. */
  messages: Message[];
  /** Older messages are still kept: ask again with `before` = the first `seq`. */
  more: boolean;
  /** `unavailable` when the gateway keeps no history. */
  reason?: string;
}

/** A delivered message. */
export interface Message {
  ch: string;
  seq?: number;
  from?: string;
  /** The JSON payload. */
  data?: unknown;
  /** A payload that is not JSON. */
  bytes?: Uint8Array;
  /** The publisher's id for it. */
  id?: number;
  /** Ephemeral: never stored, no `seq`. */
  ephemeral?: true;
}

/** The answer to a `pub`. */
export interface PubAck {
  seq?: number;
  /** True when the gateway had stored this publish before (a resend). */
  duplicate: boolean;
}

/** The connection's state. */
export type State = "idle" | "connecting" | "connected" | "disconnected" | "closed";

/** Why the client stopped for good. */
export interface Stopped {
  /** `closed` by the application, `fatal` close code, or `gave_up` after `maxAttempts`. */
  reason: "closed" | "fatal" | "gave_up";
  code?: number;
  message?: string;
}

/** The events, with their payloads. */
export interface Events {
  state: State;
  connected: Welcome;
  /** A connection ended; `retryInMs` is absent when the client stops. */
  disconnected: { code?: number; reason: string; retryMs?: number; retryInMs?: number };
  message: Message;
  subscribed: SubResult;
  /** Who joined and left a room watched with `presence` (at most once: after a reconnect, query again). */
  members: Members;
  /** Missed messages of `ch` cannot be replayed: resynchronise it from the core service. */
  unrecovered: { ch: string; reason: string; oldest?: number };
  stopped: Stopped;
  /** A problem the application may want to see (a re-subscription refused, a bad frame). */
  error: Error;
}

/** An `err` answer, a timeout, or a lost connection. */
export class EdgegateError extends Error {
  override name = "EdgegateError";
  /** The `err` code (`forbidden`, …), or `timeout`, `disconnected`, `closed`, `too_large`. */
  readonly code: string | number;
  constructor(code: string | number, reason?: string) {
    super(reason ? `${code}: ${reason}` : String(code));
    this.code = code;
  }
}

interface Pending {
  env: Envelope;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
  timer?: ReturnType<typeof setTimeout>;
  sent: boolean;
}

interface Sub {
  live: boolean;
  last?: SubResult;
  waiters: Pending[];
  presence?: boolean;
}

const utf8 = new TextEncoder();

/** A browser tab id: random, URL-safe, within `[A-Za-z0-9_-]{1,64}`. */
function randomId(): string {
  const b = new Uint8Array(12);
  globalThis.crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(36).padStart(2, "0")).join("");
}

/** The `exp` of a JWT, in ms, and its lifetime; undefined when not a JWT. */
function jwtTimes(token: string): { exp: number; life: number } | undefined {
  try {
    const p = token.split(".")[1]!.replace(/-/g, "+").replace(/_/g, "/");
    const c = JSON.parse(atob(p + "=".repeat((4 - (p.length % 4)) % 4)));
    if (typeof c.exp !== "number") return undefined;
    const exp = c.exp * 1000;
    return { exp, life: exp - (typeof c.iat === "number" ? c.iat * 1000 : Date.now()) };
  } catch {
    return undefined;
  }
}

function streamResult(ch: string, m: Record<string, unknown> | undefined, seq: number | undefined): SubResult {
  const r: SubResult = { ch };
  m = m ?? {};
  const s = seq ?? m.seq;
  if (typeof s === "number") r.seq = s;
  if (typeof m.epoch === "string") r.epoch = m.epoch;
  if (typeof m.recovered === "boolean") r.recovered = m.recovered;
  if (typeof m.reason === "string") r.reason = m.reason;
  if (typeof m.oldest === "number") r.oldest = m.oldest;
  if (typeof m.present === "number") r.present = m.present;
  return r;
}

const b64 = (s: string) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));

/**
 * A reconnecting edgegate client.
 *
 * ```ts
 * const c = new Client({ url: "ws://127.0.0.1:8080/ws", user: "alice" });
 * c.on("message", (m) => console.log(m.ch, m.data));
 * c.connect();
 * await c.subscribe("room:lobby");
 * await c.publish("room:lobby", { text: "hi" });
 * ```
 */
export class Client {
  /** The connection's state. */
  state: State = "idle";
  /** The last `welcome`. */
  welcome?: Welcome;
  /** `hello.meta.instance`. */
  readonly instance: string;
  /** Publishes resent after a reconnect, and re-delivered messages dropped. */
  readonly stats = { resent: 0, dropped: 0 };
  /** The transport in use (or last tried). */
  transport: Transport;

  private readonly o: ClientOptions;
  private readonly Ws?: WebSocketCtor;
  private readonly transports: Transport[];
  /** Transports that got a `welcome`; failures in a row before one. */
  private readonly worked = new Set<Transport>();
  private failures = 0;
  private gotWelcome = false;
  private ws?: WebSocketLike;
  private token?: string;
  private nextId = 1;
  private attempt = 0;
  private bye?: { code: number; reason: string; retryMs?: number };
  private readonly pending = new Map<number, Pending>();
  private readonly subs = new Map<string, Sub>();
  private readonly positions = new Map<string, Position>();
  private own?: string;
  private queue: Envelope[] = [];
  private flushing = false;
  private lastRx = 0;
  private timers: ReturnType<typeof setTimeout>[] = [];
  private readonly handlers = new Map<keyof Events, Set<(v: never) => void>>();

  constructor(options: ClientOptions) {
    this.o = options;
    this.token = options.token;
    this.instance = options.instance ?? randomId();
    this.Ws = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketCtor }).WebSocket;
    this.transports = options.transports?.length ? options.transports : ["websocket", "sse"];
    this.transport = this.transports[0]!;
  }

  /** Opens a connection over `t` (throws when it cannot even be made). */
  private open(t: Transport): WebSocketLike {
    if (t === "sse") return new SseSocket(this.o.sseUrl ?? sseUrl(this.o.url));
    if (!this.Ws) throw new TypeError("no WebSocket here (pass options.WebSocket, e.g. the `ws` package)");
    return new this.Ws(this.o.url, this.o.encoding === "binary" ? "edgegate.v1.bin" : "edgegate.v1.json");
  }

  /** On to the next transport. */
  private fallBack(): void {
    const i = this.transports.indexOf(this.transport);
    this.transport = this.transports[(i + 1) % this.transports.length]!;
    this.failures = 0;
  }

  /** Envelopes are binary (a WebSocket with `encoding: "binary"`; SSE is JSON). */
  private get bin(): boolean {
    return this.o.encoding === "binary" && this.transport === "websocket";
  }

  /** Calls `fn` on every `event`; returns a function that stops it. */
  on<K extends keyof Events>(event: K, fn: (v: Events[K]) => void): () => void {
    let set = this.handlers.get(event);
    if (!set) this.handlers.set(event, (set = new Set()));
    set.add(fn as (v: never) => void);
    return () => set.delete(fn as (v: never) => void);
  }

  private emit<K extends keyof Events>(event: K, v: Events[K]): void {
    for (const fn of this.handlers.get(event) ?? []) {
      try {
        (fn as (v: Events[K]) => void)(v);
      } catch (err) {
        if (event !== "error") this.emit("error", err as Error);
      }
    }
  }

  private setState(s: State): void {
    if (this.state === s) return;
    this.state = s;
    this.emit("state", s);
  }

  /** Starts connecting (and reconnecting until {@link close} or a fatal close code). */
  connect(): void {
    if (this.state !== "idle" && this.state !== "disconnected") return;
    this.clearTimers();
    this.setState("connecting");
    this.bye = undefined;
    this.gotWelcome = false;
    let ws: WebSocketLike | undefined;
    let why: unknown;
    // A transport that cannot even be made (no WebSocket, a blocked
    // constructor): the next one at once.
    for (let n = 0; !ws && n < this.transports.length; n++) {
      try {
        ws = this.open(this.transport);
      } catch (err) {
        why = err;
        this.fallBack();
      }
    }
    if (!ws) {
      this.stop({ reason: "fatal", message: String(why) });
      return;
    }
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onopen = () => {
      const meta: Record<string, unknown> = {
        client: this.o.clientName ?? "edgegate-js/0.1",
        instance: this.instance,
      };
      // Recover the own stream from where it was; the first welcome
      // carries its position anyway.
      const own = this.own && this.positions.get(this.own);
      if (own) meta.since = own;
      if (this.token !== undefined) meta.token = this.token;
      if (this.o.user !== undefined) meta.user = this.o.user;
      this.write([{ t: "hello", id: this.nextId++, meta }]);
    };
    ws.onmessage = (ev) => this.receive(ev.data);
    ws.onerror = () => {};
    ws.onclose = (ev) => this.lost(ev.code, ev.reason);
  }

  /** Closes the connection and stops; every pending operation rejects with `closed`. */
  close(): void {
    if (this.state === "closed") return;
    const ws = this.detach();
    try {
      ws?.close(1000);
    } catch {
      /* already closing */
    }
    this.stop({ reason: "closed" });
  }

  /**
   * Subscribes to `ch`; resolves once the subscription is live (with the
   * stream's position), rejects with the gateway's `err`. The client keeps
   * it across reconnects until {@link unsubscribe}.
   */
  subscribe(ch: string, options: SubscribeOptions = {}): Promise<SubResult> {
    let s = this.subs.get(ch);
    if (s?.live && s.last) return Promise.resolve(s.last);
    return new Promise((resolve, reject) => {
      const w = this.pend({ t: "sub", ch }, resolve as (v: unknown) => void, reject);
      if (!s) this.subs.set(ch, (s = { live: false, waiters: [] }));
      if (options.presence) s.presence = true;
      s.waiters.push(w);
      if (this.state === "connected" && s.waiters.length === 1) this.sendSub(ch);
    });
  }

  /** Unsubscribes from `ch` and forgets its position. */
  unsubscribe(ch: string): Promise<void> {
    const s = this.subs.get(ch);
    this.subs.delete(ch);
    this.positions.delete(ch);
    for (const w of s?.waiters ?? []) this.settle(w, new EdgegateError("unsubscribed"));
    if (!s || this.state !== "connected") return Promise.resolve();
    return this.op({ t: "unsub", ch }).then(() => undefined);
  }

  /**
   * Publishes to a `room:`/`user:` channel: a `Uint8Array` as bytes,
   * anything else as JSON. Resolves once the gateway stored it (with its
   * `seq`); a publish not yet answered when the connection drops is resent
   * after the reconnect and stored once.
   */
  publish(ch: string, data: unknown, options: PublishOptions = {}): Promise<PubAck> {
    const env = this.payload({ t: "pub", ch }, data);
    if (options.ephemeral) env.meta = { ephemeral: true };
    return this.op(env, (e) => ({
      seq: e.seq,
      duplicate: e.meta?.duplicate === true,
    })) as Promise<PubAck>;
  }

  /**
   * Who is present in a room (`limit` users after `after`, byte order), or
   * for `user:<id>` whether that user is online anywhere.
   */
  presence(ch: string, page: { limit?: number; after?: string } = {}): Promise<PresencePage> {
    return this.op({ t: "presence", ch, meta: page }, (e) => e.d) as Promise<PresencePage>;
  }

  /** The newest `limit` (default 50) stored messages of `ch` before `seq` `before`, oldest first. */
  history(ch: string, page: { limit?: number; before?: number } = {}): Promise<HistoryPage> {
    return this.op({ t: "history", ch, meta: page }, (e) => {
      const d = e.d as Omit<HistoryPage, "messages"> & { messages: Record<string, unknown>[] };
      const messages = d.messages.map((m) => {
        const r: Message = { ch, seq: m.seq as number, from: m.from as string };
        if (typeof m.db === "string") r.bytes = b64(m.db);
        else r.data = m.d;
        return r;
      });
      return { ...d, messages };
    }) as Promise<HistoryPage>;
  }

  /** Sends a request to `svc:<name>`; resolves with the reply's payload (JSON, or a `Uint8Array`). */
  request(ch: string, data: unknown): Promise<unknown> {
    return this.op(this.payload({ t: "req", ch }, data), (e) => e.db ?? e.d);
  }

  private payload(e: Envelope, data: unknown): Envelope {
    if (data instanceof Uint8Array) e.db = data;
    else e.d = data;
    return e;
  }

  private op(env: Envelope, map: (e: Envelope) => unknown = (e) => e): Promise<unknown> {
    if (this.state === "closed") return Promise.reject(new EdgegateError("closed"));
    return new Promise((resolve, reject) => {
      const p = this.pend(env, (e) => resolve(map(e as Envelope)), reject);
      if (this.state === "connected") this.transmit(p);
    });
  }

  /** Registers an operation under a fresh id, with its timeout. */
  private pend(env: Envelope, resolve: (v: unknown) => void, reject: (e: Error) => void): Pending {
    env.id = this.nextId++;
    const p: Pending = { env, resolve, reject, sent: false };
    this.pending.set(env.id, p);
    p.timer = setTimeout(() => this.settle(p, new EdgegateError("timeout")), this.o.timeoutMs ?? 10_000);
    return p;
  }

  private settle(p: Pending, err: Error | undefined, value?: unknown): void {
    clearTimeout(p.timer);
    this.pending.delete(p.env.id!);
    const s = p.env.t === "sub" ? this.subs.get(p.env.ch!) : undefined;
    if (s) s.waiters = s.waiters.filter((w) => w !== p);
    if (err) p.reject(err);
    else p.resolve(value);
  }

  private transmit(p: Pending): void {
    p.sent = true;
    this.write([p.env]);
  }

  private sendSub(ch: string): void {
    const s = this.subs.get(ch)!;
    const pos = this.positions.get(ch);
    // One `sub` on the wire per channel: the first waiter's id; the others
    // resolve with it.
    let p = s.waiters[0];
    if (!p) p = this.pend({ t: "sub", ch }, () => {}, () => {});
    const meta: Record<string, unknown> = {};
    if (pos) meta.since = pos;
    if (s.presence) meta.presence = true;
    p.env.meta = meta;
    this.transmit(p);
  }

  /** Queues envelopes; everything queued in one tick leaves as batches within `max_frame`. */
  private write(envs: Envelope[]): void {
    this.queue.push(...envs);
    if (this.flushing) return;
    this.flushing = true;
    queueMicrotask(() => {
      this.flushing = false;
      const q = this.queue;
      this.queue = [];
      const ws = this.ws;
      if (!ws) return;
      const bin = this.bin;
      const max = this.welcome?.maxFrame ?? Infinity;
      let batch: (string | Uint8Array)[] = [];
      let size = 0;
      const send = () => {
        if (!batch.length) return;
        if (bin) {
          const out = new Uint8Array(size);
          let at = 0;
          for (const b of batch as Uint8Array[]) {
            out.set(b, at);
            at += b.length;
          }
          ws.send(out);
        } else ws.send((batch as string[]).join("\n"));
        batch = [];
        size = 0;
      };
      for (const e of q) {
        let item: string | Uint8Array;
        let n: number;
        if (bin) {
          item = encodeBinaryBatch([e]); // a batch of one: LEB128 length + envelope
          n = item.length;
        } else {
          item = encodeJson(e);
          n = utf8.encode(item).length + 1;
        }
        if (n > max) {
          const p = e.id !== undefined ? this.pending.get(e.id) : undefined;
          if (p) this.settle(p, new EdgegateError("too_large", `${n} bytes over max_frame ${max}`));
          continue;
        }
        if (size + n > max) send();
        batch.push(item);
        size += n;
      }
      try {
        send();
      } catch {
        /* the close event follows */
      }
    });
  }

  private receive(data: unknown): void {
    this.lastRx = Date.now();
    let envs: Envelope[];
    try {
      envs =
        typeof data === "string"
          ? decodeJsonBatch(data)
          : decodeBinaryBatch(new Uint8Array(data as ArrayBuffer));
    } catch (err) {
      this.emit("error", err as Error);
      return;
    }
    for (const e of envs) this.dispatch(e);
  }

  private dispatch(e: Envelope): void {
    const t: Type = e.t;
    if (t === "welcome") return this.welcomed(e);
    if (t === "ping") return this.write([{ t: "pong", id: e.id }]);
    if (t === "bye") {
      const r = e.meta?.retry_ms;
      this.bye = { code: Number(e.code), reason: e.reason ?? "", retryMs: typeof r === "number" ? r : undefined };
      return;
    }
    if (t === "msg") {
      if (this.seen(e)) {
        this.stats.dropped++;
        return;
      }
      const m: Message = { ch: e.ch ?? "" };
      if (e.seq !== undefined) m.seq = e.seq;
      if (e.from !== undefined) m.from = e.from;
      if (e.id !== undefined) m.id = e.id;
      if (e.meta?.ephemeral === true) m.ephemeral = true;
      if (e.db) m.bytes = e.db;
      else m.data = e.d;
      return this.emit("message", m);
    }
    if (t === "members") {
      const m = e.meta ?? {};
      const r: Members = { ch: e.ch ?? "", present: Number(m.present ?? 0) };
      if (Array.isArray(m.join)) r.join = m.join as string[];
      if (Array.isArray(m.leave)) r.leave = m.leave as string[];
      return this.emit("members", r);
    }
    const p = e.id !== undefined ? this.pending.get(e.id) : undefined;
    if (!p) return;
    const ch = p.env.ch!;
    if (t === "err") {
      const err = new EdgegateError(e.code ?? "internal", e.reason);
      if (p.env.t === "sub") {
        const s = this.subs.get(ch);
        this.subs.delete(ch);
        for (const w of s?.waiters ?? []) if (w !== p) this.settle(w, err);
        if (!s?.waiters.length) this.emit("error", err);
      }
      return this.settle(p, err);
    }
    if (p.env.t === "sub") {
      const r = streamResult(ch, e.meta, e.seq);
      const s = this.subs.get(ch);
      if (!s) return this.settle(p, undefined, r); // unsubscribed meanwhile
      this.update(ch, r);
      s.live = true;
      s.last = r;
      for (const w of s.waiters) if (w !== p) this.settle(w, undefined, r);
      this.settle(p, undefined, r);
      return this.emit("subscribed", r);
    }
    if (p.env.t === "hello" && p.env.meta?.token) this.token = p.env.meta.token as string;
    this.settle(p, undefined, e);
  }

  private welcomed(e: Envelope): void {
    const m = e.meta ?? {};
    const w: Welcome = {
      conn: String(m.conn ?? ""),
      user: String(m.user ?? ""),
      node: String(m.node ?? ""),
      shard: Number(m.shard ?? 0),
      hbMs: Number(m.hb_ms ?? 0),
      maxFrame: Number(m.max_frame ?? Infinity),
      transport: this.transport,
    };
    this.own = `user:${w.user}`;
    if (m.stream && typeof m.stream === "object") {
      w.stream = streamResult(this.own, m.stream as Record<string, unknown>, undefined);
      this.update(this.own, w.stream);
    }
    this.welcome = w;
    this.attempt = 0;
    this.gotWelcome = true;
    this.failures = 0;
    this.worked.add(this.transport);
    this.setState("connected");
    this.emit("connected", w);
    for (const ch of this.subs.keys()) this.sendSub(ch);
    // Publishes with no answer yet go again with the same ids (the gateway
    // answers a stored one with its seq and duplicate: true), then
    // whatever was asked while disconnected.
    for (const p of this.pending.values()) {
      if (p.env.t === "pub" && p.sent) this.stats.resent++;
      if (p.env.t !== "sub") this.transmit(p);
    }
    this.heartbeat(w);
    this.scheduleRefresh();
  }

  /** The dead-connection check, and a `ping` after `hb_ms` of silence. */
  private heartbeat(w: Welcome): void {
    if (!(w.hbMs > 0)) return;
    const idle = this.o.idleTimeoutMs ?? 2 * w.hbMs + 10_000;
    const tick = Math.max(50, Math.min(w.hbMs, idle) / 4);
    const check = () => {
      const quiet = Date.now() - this.lastRx;
      if (quiet >= idle) {
        const ws = this.detach();
        try {
          ws?.close(4002, "heartbeat timeout");
        } catch {
          /* a dead socket */
        }
        return this.lost(undefined, `nothing received for ${quiet} ms`);
      }
      if (quiet >= Math.min(w.hbMs, idle / 2)) this.write([{ t: "ping" }]);
      this.timers.push(setTimeout(check, tick));
    };
    this.timers.push(setTimeout(check, tick));
  }

  /** Asks the hook for a new token before the current one expires, and sends it as `hello`. */
  private scheduleRefresh(): void {
    const hook = this.o.refreshToken;
    const jt = this.token && jwtTimes(this.token);
    if (!hook || !jt) return;
    const at = jt.exp - Math.min(60_000, jt.life / 10) - Date.now();
    this.timers.push(
      setTimeout(async () => {
        const t = await hook("expiring");
        if (t && this.state === "connected") {
          this.op({ t: "hello", meta: { token: t } }).then(
            () => this.scheduleRefresh(),
            (err) => this.emit("error", err as Error),
          );
        }
      }, Math.max(0, at)),
    );
  }

  /** Applies a stream answer; see the Rust client's `Task::update`. */
  private update(ch: string, st: SubResult): void {
    const had = this.positions.has(ch);
    if (had && st.recovered === false) {
      this.emit("unrecovered", { ch, reason: st.reason ?? "", oldest: st.oldest });
    }
    if (!st.epoch) return; // no history behind this gateway
    const p = this.positions.get(ch);
    if (st.recovered === true && p) p.epoch = st.epoch;
    else this.positions.set(ch, { epoch: st.epoch, seq: st.seq ?? 0 });
  }

  /** True when `e`'s seq was delivered already; otherwise advances the position. */
  private seen(e: Envelope): boolean {
    const p = e.ch !== undefined && e.seq !== undefined ? this.positions.get(e.ch) : undefined;
    if (!p) return false;
    if (e.seq! <= p.seq) return true;
    p.seq = e.seq!;
    return false;
  }

  private detach(): WebSocketLike | undefined {
    const ws = this.ws;
    this.ws = undefined;
    if (ws) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    return ws;
  }

  private clearTimers(): void {
    for (const t of this.timers) clearTimeout(t);
    this.timers = [];
  }

  /** The connection ended: settle what cannot survive it, then follow the policy. */
  private async lost(closeCode: number | undefined, closeReason: string): Promise<void> {
    this.detach();
    this.clearTimers();
    for (const s of this.subs.values()) s.live = false;
    for (const p of [...this.pending.values()]) {
      const t = p.env.t;
      if (t === "unsub") this.settle(p, undefined, p.env);
      else if (t === "sub" && !this.subs.get(p.env.ch!)?.waiters.includes(p)) this.settle(p, undefined);
      // Requests, token refreshes and ephemeral messages are not worth
      // sending again late.
      else if ((t === "req" || t === "hello" || p.env.meta?.ephemeral) && p.sent) {
        this.settle(p, new EdgegateError("disconnected"));
      }
    }
    // Failures before any welcome on a transport that never worked for
    // this client (a refused upgrade, a proxy that drops it): after two in
    // a row, the next transport.
    if (!this.gotWelcome && !this.worked.has(this.transport) && ++this.failures >= 2) this.fallBack();
    const bye = this.bye;
    // 1005/1006: no close frame came (a broken connection has no code).
    const code = bye?.code ?? (closeCode && closeCode !== 1005 && closeCode !== 1006 ? closeCode : undefined);
    const reason = bye?.reason || closeReason || "connection lost";
    const retryMs = bye?.retryMs;
    const cls = classify(code);
    const max = this.o.backoff?.maxAttempts;
    if (cls === "fatal" || (max !== undefined && this.attempt >= max)) {
      this.setState("disconnected");
      this.emit("disconnected", { code, reason, retryMs });
      return this.stop({ reason: cls === "fatal" ? "fatal" : "gave_up", code, message: reason });
    }
    const wait = delay(this.o.backoff ?? {}, this.attempt++, retryMs);
    this.setState("disconnected");
    this.emit("disconnected", { code, reason, retryMs, retryInMs: wait });
    if (cls === "refresh" && this.o.refreshToken) {
      try {
        const t = await this.o.refreshToken(code === 4008 ? "expired" : "unauthorized");
        if (t) this.token = t;
      } catch (err) {
        this.emit("error", err as Error);
      }
    }
    if (this.state === "disconnected") this.timers.push(setTimeout(() => this.connect(), wait));
  }

  private stop(s: Stopped): void {
    this.clearTimers();
    this.setState("closed");
    for (const p of [...this.pending.values()]) this.settle(p, new EdgegateError("closed", s.message));
    this.emit("stopped", s);
  }
}
