// The codecs against the shared vectors of proto/vectors/binary.json (the
// same file the Rust codecs are tested with), plus the SDK's own rules.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import {
  decodeBinary, decodeBinaryBatch, decodeJson, decodeJsonBatch, encodeBinary, encodeBinaryBatch,
  encodeJson, DecodeError,
} from "../dist/index.js";

const V = JSON.parse(readFileSync(new URL("../../proto/vectors/binary.json", import.meta.url), "utf8"));
const hex = (s) => Uint8Array.from(s.match(/../g) ?? [], (h) => parseInt(h, 16));
const toHex = (b) => Buffer.from(b).toString("hex");

test("every vector reads the same from both codecs and writes back byte for byte", () => {
  assert.ok(V.envelopes.length >= 20);
  for (const c of V.envelopes) {
    const fromJson = decodeJson(c.json);
    const fromBin = decodeBinary(hex(c.bin));
    assert.deepEqual(fromBin, fromJson, c.name);
    assert.equal(toHex(encodeBinary(fromJson)), c.bin, `${c.name}: binary encode`);
    assert.equal(encodeJson(fromBin), c.json, `${c.name}: JSON encode`);
  }
});

test("a WebSocket binary batch splits into its envelopes and is rebuilt the same", () => {
  const want = V.ws_binary_batch.json.map(decodeJson);
  assert.deepEqual(decodeBinaryBatch(hex(V.ws_binary_batch.bin)), want);
  assert.equal(toHex(encodeBinaryBatch(want)), V.ws_binary_batch.bin);
});

test("every bad input is a DecodeError, never another exception", () => {
  for (const c of V.bad_bin) assert.throws(() => decodeBinary(hex(c.bin)), DecodeError, c.name);
  for (const c of V.bad_json) assert.throws(() => decodeJson(c.json), DecodeError, c.name);
});

test("u64 fields beyond 2^53 are refused rather than rounded", () => {
  // seq 2^53 in LEB128: 0x80 x7, 0x10
  assert.throws(() => decodeBinary(hex("4104" + "80808080808080" + "10")), DecodeError);
  assert.throws(() => decodeJson('{"t":"msg","ch":"room:a","seq":9007199254740992}'), DecodeError);
  assert.equal(decodeJson('{"t":"msg","ch":"room:a","seq":9007199254740991}').seq, 2 ** 53 - 1);
});

test("a JSON text message may carry several envelopes, blank lines and CRLF included", () => {
  const got = decodeJsonBatch('{"t":"ping"}\r\n\n{"t":"pong","id":3}\n');
  assert.deepEqual(got, [{ t: "ping" }, { t: "pong", id: 3 }]);
});

test("an err code sent as a number reads as its name in both codecs", () => {
  assert.equal(decodeJson('{"t":"err","code":3}').code, "forbidden");
  assert.equal(decodeBinary(hex("4210" + "03" + "00")).code, "forbidden");
});

test("random envelopes survive both codecs", () => {
  const types = ["pub", "msg", "ok", "err", "bye", "req", "sub"];
  for (let i = 0; i < 500; i++) {
    const e = { t: types[i % types.length] };
    if (i % 2) e.id = Math.floor(Math.random() * 2 ** 53);
    if (i % 3) e.ch = "room:" + String.fromCodePoint(32 + (i % 500)) + i;
    if (i % 5) e.seq = i * 7919;
    if (e.t === "err") e.code = "timeout";
    if (e.t === "bye") e.code = 4000 + (i % 10);
    if (i % 7 === 0) e.meta = { k: [i, "x\n\"y"], n: null };
    if (i % 4 === 1) e.db = Uint8Array.from({ length: i % 40 + 1 }, (_, j) => (i * j) & 255);
    else if (i % 4 === 2) e.d = { text: "é\u0000".repeat(i % 9), n: i / 4 };
    assert.deepEqual(decodeBinary(encodeBinary(e)), e);
    assert.deepEqual(decodeJson(encodeJson(e)), e);
    assert.ok(!encodeJson(e).includes("\n"));
  }
});
