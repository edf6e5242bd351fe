/**
 * edgegate's client SDK for browsers and Node ≥ 20: the protocol of
 * docs/protocol.md over WebSocket, in JSON or binary encoding, with the
 * reconnect, backoff, close-code, heartbeat and resume (§7) rules of a
 * well-behaved client. No runtime dependencies.
 *
 * - {@link Client}: the reconnecting client.
 * - `codec`: the envelope codecs, sans-IO (tested against the same vectors
 *   as the gateway's `proto` crate).
 * - `backoff`: the reconnect policy, sans-IO.
 */
export * from "./client.js";
export * from "./codec.js";
export * from "./backoff.js";
