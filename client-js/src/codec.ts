/**
 * The envelope codecs of docs/protocol.md §1–§2, sans-IO: JSON (one object
 * per envelope, `\n`-separated in a WebSocket text message) and binary (a
 * type code, field bits, the fields in bit order, then the payload; each
 * preceded by its LEB128 length in a WebSocket binary message).
 *
 * Both decode to the same {@link Envelope}: `err` codes as their name (a
 * number when the protocol names none), JSON payloads parsed into `d`,
 * other payloads as bytes in `db`. Numbers the protocol carries as u64
 * (`id`, `seq`) must be safe integers here (≤ 2^53 − 1): a larger one is a
 * decode error, never a silently rounded position.
 */

/** The message types (`t`) and their binary codes. */
export const TYPES = {
  hello: 1, sub: 2, unsub: 3, pub: 4, req: 5, ping: 6, pong: 7, presence: 8, history: 9,
  welcome: 64, ok: 65, err: 66, msg: 67, reply: 68, bye: 69, members: 70,
} as const;

/** A message type name. */
export type Type = keyof typeof TYPES;

/** `err` codes, in number order from 1 (docs/protocol.md §5). */
export const ERR_CODES = [
  "bad_request", "unauthorized", "forbidden", "bad_channel", "no_service", "timeout",
  "rate_limited", "too_large", "not_subscribed", "backbone_unavailable", "internal",
] as const;

/** One envelope, as both codecs decode it. */
export interface Envelope {
  t: Type;
  id?: number;
  ch?: string;
  seq?: number;
  from?: string;
  /** `err`: the code's name (a number when unnamed); `bye`: the close code. */
  code?: string | number;
  reason?: string;
  meta?: Record<string, unknown>;
  /** A JSON payload (any JSON value, `null` included). */
  d?: unknown;
  /** A payload that is not JSON text. */
  db?: Uint8Array;
}

/** A frame or envelope that does not decode. */
export class DecodeError extends Error {
  override name = "DecodeError";
}

const BIT_ID = 1, BIT_CH = 2, BIT_SEQ = 4, BIT_FROM = 8, BIT_CODE = 16, BIT_META = 32,
  BIT_JSON = 64, BIT_RESERVED = 128;
const NAMES: Record<number, Type> = {};
for (const [n, c] of Object.entries(TYPES)) NAMES[c] = n as Type;
const utf8 = new TextEncoder();
const strict = new TextDecoder("utf-8", { fatal: true });

function fail(why: string): never {
  throw new DecodeError(why);
}

function safe(v: unknown, field: string): number | undefined {
  if (v === undefined || v === null) return undefined;
  if (!Number.isSafeInteger(v) || (v as number) < 0) fail(`${field}: not an integer in [0, 2^53)`);
  return v as number;
}

function text(v: unknown, field: string): string | undefined {
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "string") fail(`${field}: not a string`);
  return v;
}

function object(v: unknown): Record<string, unknown> | undefined {
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "object" || Array.isArray(v)) fail("meta: not an object");
  return v as Record<string, unknown>;
}

function errName(code: number): string | number {
  return ERR_CODES[code - 1] ?? code;
}

function errNumber(code: string | number): number {
  if (typeof code === "number") return code;
  const i = ERR_CODES.indexOf(code as (typeof ERR_CODES)[number]);
  if (i < 0) fail(`code: unknown err code ${JSON.stringify(code)}`);
  return i + 1;
}

/** Base64 (RFC 4648, padded) of `b`. */
export function toBase64(b: Uint8Array): string {
  let s = "";
  for (let i = 0; i < b.length; i += 0x8000) s += String.fromCharCode(...b.subarray(i, i + 0x8000));
  return btoa(s);
}

function fromBase64(s: string): Uint8Array {
  let bin: string;
  try {
    bin = atob(s);
  } catch {
    fail("db: not base64");
  }
  return Uint8Array.from(bin, (c) => c.charCodeAt(0));
}

/** Encodes one envelope as a JSON object (fields in the gateway's order). */
export function encodeJson(e: Envelope): string {
  const o: Record<string, unknown> = { t: e.t };
  if (e.id !== undefined) o.id = e.id;
  if (e.ch !== undefined) o.ch = e.ch;
  if (e.seq !== undefined) o.seq = e.seq;
  if (e.from !== undefined) o.from = e.from;
  if (e.code !== undefined) o.code = e.code;
  if (e.reason !== undefined) o.reason = e.reason;
  if (e.meta !== undefined) o.meta = e.meta;
  if (e.db !== undefined) o.db = toBase64(e.db);
  else if ("d" in e) o.d = e.d === undefined ? null : e.d;
  return JSON.stringify(o);
}

/** Decodes one JSON envelope. */
export function decodeJson(s: string): Envelope {
  let o: Record<string, unknown>;
  try {
    o = JSON.parse(s);
  } catch {
    fail("not JSON");
  }
  if (typeof o !== "object" || o === null || Array.isArray(o)) fail("not an object");
  const t = o.t;
  if (typeof t !== "string" || !(t in TYPES)) fail(`unknown type ${JSON.stringify(t)}`);
  if ("d" in o && o.db !== undefined && o.db !== null) fail("both d and db");
  const e: Envelope = { t: t as Type };
  const id = safe(o.id, "id"), seq = safe(o.seq, "seq");
  const ch = text(o.ch, "ch"), from = text(o.from, "from"), reason = text(o.reason, "reason");
  const meta = object(o.meta);
  if (id !== undefined) e.id = id;
  if (ch !== undefined) e.ch = ch;
  if (seq !== undefined) e.seq = seq;
  if (from !== undefined) e.from = from;
  if (o.code !== undefined && o.code !== null) {
    const c = o.code;
    if (typeof c === "string") errNumber(c);
    else if ((safe(c, "code") as number) > 0xffffffff) fail("code: over u32");
    e.code = t === "err" && typeof c === "number" ? errName(c) : (c as string | number);
  }
  if (reason !== undefined) e.reason = reason;
  if (meta !== undefined) e.meta = meta;
  if ("d" in o) e.d = o.d;
  else if (typeof o.db === "string") e.db = fromBase64(o.db);
  else if (o.db != null) fail("db: not a string");
  return e;
}

/** Decodes a WebSocket text message: one or more `\n`-separated envelopes. */
export function decodeJsonBatch(msg: string): Envelope[] {
  return msg.split("\n").filter((l) => l.trim() !== "").map(decodeJson);
}

/** A growable byte buffer. */
class Out {
  b = new Uint8Array(64);
  n = 0;
  room(k: number): void {
    if (this.n + k <= this.b.length) return;
    const nb = new Uint8Array(Math.max(this.b.length * 2, this.n + k));
    nb.set(this.b.subarray(0, this.n));
    this.b = nb;
  }
  byte(v: number): void {
    this.room(1);
    this.b[this.n++] = v;
  }
  bytes(v: Uint8Array): void {
    this.room(v.length);
    this.b.set(v, this.n);
    this.n += v.length;
  }
  /** LEB128 of a safe integer (arithmetic, not bit operations: > 2^32 too). */
  uint(v: number): void {
    while (v >= 0x80) {
      this.byte((v % 0x80) | 0x80);
      v = Math.floor(v / 0x80);
    }
    this.byte(v);
  }
  str(s: string): void {
    const u = utf8.encode(s);
    this.uint(u.length);
    this.bytes(u);
  }
  done(): Uint8Array {
    return this.b.slice(0, this.n);
  }
}

function writeBinary(e: Envelope, out: Out): void {
  const code = TYPES[e.t];
  if (code === undefined) throw new TypeError(`unknown type ${e.t}`);
  const json = e.db === undefined && "d" in e;
  const bits = (e.id !== undefined ? BIT_ID : 0) | (e.ch !== undefined ? BIT_CH : 0)
    | (e.seq !== undefined ? BIT_SEQ : 0) | (e.from !== undefined ? BIT_FROM : 0)
    | (e.code !== undefined ? BIT_CODE : 0) | (e.meta !== undefined ? BIT_META : 0)
    | (json ? BIT_JSON : 0);
  out.byte(code);
  out.byte(bits);
  if (e.id !== undefined) out.uint(e.id);
  if (e.ch !== undefined) out.str(e.ch);
  if (e.seq !== undefined) out.uint(e.seq);
  if (e.from !== undefined) out.str(e.from);
  if (e.code !== undefined) {
    out.uint(e.t === "err" ? errNumber(e.code) : Number(e.code));
    out.str(e.reason ?? "");
  }
  if (e.meta !== undefined) out.str(JSON.stringify(e.meta));
  if (json) out.bytes(utf8.encode(JSON.stringify(e.d === undefined ? null : e.d)));
  else if (e.db !== undefined) out.bytes(e.db);
}

/** Encodes one binary envelope (no length prefix: a TCP/QUIC frame's body). */
export function encodeBinary(e: Envelope): Uint8Array {
  const out = new Out();
  writeBinary(e, out);
  return out.done();
}

/** Encodes envelopes as one WebSocket binary message (each LEB128-length-prefixed). */
export function encodeBinaryBatch(es: Envelope[]): Uint8Array {
  const out = new Out();
  for (const e of es) {
    const body = encodeBinary(e);
    out.uint(body.length);
    out.bytes(body);
  }
  return out.done();
}

/** A read position in a buffer. */
class In {
  constructor(public b: Uint8Array, public i = 0, public end = b.length) {}
  byte(): number {
    if (this.i >= this.end) fail("truncated");
    return this.b[this.i++]!;
  }
  uint(field: string): number {
    let v = 0, mul = 1;
    for (;;) {
      const c = this.byte();
      v += (c & 0x7f) * mul;
      if (!(c & 0x80)) break;
      mul *= 0x80;
      if (mul > 2 ** 63) fail(`${field}: LEB128 overflow`);
    }
    if (!Number.isSafeInteger(v)) fail(`${field}: over 2^53`);
    return v;
  }
  take(n: number): Uint8Array {
    if (n > this.end - this.i) fail("truncated");
    return this.b.subarray(this.i, (this.i += n));
  }
  str(field: string): string {
    try {
      return strict.decode(this.take(this.uint(field)));
    } catch (err) {
      if (err instanceof DecodeError) throw err;
      fail(`${field}: not UTF-8`);
    }
  }
}

function parseJson(s: string, what: string): unknown {
  try {
    return JSON.parse(s);
  } catch {
    fail(`${what}: not JSON`);
  }
}

/** Decodes one binary envelope that fills all of `b`. */
export function decodeBinary(b: Uint8Array): Envelope {
  const r = new In(b);
  const code = r.byte();
  const t = NAMES[code];
  if (t === undefined) fail(`unknown type code ${code}`);
  const bits = r.byte();
  if (bits & BIT_RESERVED) fail("reserved bit set");
  const e: Envelope = { t };
  if (bits & BIT_ID) e.id = r.uint("id");
  if (bits & BIT_CH) e.ch = r.str("ch");
  if (bits & BIT_SEQ) e.seq = r.uint("seq");
  if (bits & BIT_FROM) e.from = r.str("from");
  if (bits & BIT_CODE) {
    const c = r.uint("code");
    if (c > 0xffffffff) fail("code: over u32");
    e.code = t === "err" ? errName(c) : c;
    const reason = r.str("reason");
    if (reason !== "") e.reason = reason;
  }
  if (bits & BIT_META) {
    const m = parseJson(r.str("meta"), "meta");
    if (typeof m !== "object" || m === null || Array.isArray(m)) fail("meta: not an object");
    e.meta = m as Record<string, unknown>;
  }
  const rest = r.take(r.end - r.i);
  if (bits & BIT_JSON) {
    let s: string;
    try {
      s = strict.decode(rest);
    } catch {
      fail("payload: not UTF-8");
    }
    e.d = parseJson(s, "payload");
  } else if (rest.length > 0) {
    e.db = rest.slice();
  }
  return e;
}

/** Splits and decodes a WebSocket binary message (LEB128-length-prefixed envelopes). */
export function decodeBinaryBatch(msg: Uint8Array): Envelope[] {
  const r = new In(msg);
  const out: Envelope[] = [];
  while (r.i < r.end) out.push(decodeBinary(r.take(r.uint("length"))));
  return out;
}
