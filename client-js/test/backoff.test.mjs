// The reconnect policy, sans-IO.
import { test } from "node:test";
import assert from "node:assert/strict";
import { bound, classify, delay } from "../dist/index.js";

test("each close code of the protocol's table gets its rule", () => {
  const want = {
    1000: "retry", 1001: "retry", 4000: "fatal", 4001: "refresh", 4002: "retry", 4003: "retry",
    4004: "retry", 4005: "fatal", 4006: "fatal", 4007: "retry", 4008: "refresh", 4009: "retry",
  };
  for (const [code, rule] of Object.entries(want)) assert.equal(classify(Number(code)), rule, code);
  assert.equal(classify(undefined), "retry", "a connection lost without a code");
  assert.equal(classify(4999), "retry", "an unknown code");
});

test("the bound doubles from base up to cap", () => {
  const o = { baseMs: 100, capMs: 30_000 };
  assert.deepEqual([0, 1, 2, 3, 8, 9, 100, 5000].map((a) => bound(o, a)), [100, 200, 400, 800, 25_600, 30_000, 30_000, 30_000]);
  assert.equal(bound({}, 0), 100);
  assert.equal(bound({}, 20), 30_000);
});

test("full jitter: uniform over [0, bound], raised to retry_ms", () => {
  const o = { baseMs: 100, capMs: 1000 };
  assert.equal(delay(o, 3, 0, () => 0), 0);
  assert.equal(delay(o, 3, 0, () => 0.999999), 800);
  assert.equal(delay(o, 3, 2500, () => 0.5), 2500, "retry_ms is a floor, even above cap");
  assert.equal(delay(o, 0, 30, () => 0.9), 90);
  const samples = Array.from({ length: 4000 }, () => delay(o, 2));
  assert.ok(samples.every((s) => s >= 0 && s <= 400));
  const mean = samples.reduce((a, b) => a + b) / samples.length;
  assert.ok(mean > 170 && mean < 230, `mean ${mean} of U[0, 400]`);
  assert.ok(new Set(samples).size > 300, "jittered, not a fixed schedule");
});
