/**
 * The reconnect policy, sans-IO (it mirrors the Rust client's `policy`
 * module): exponential backoff with full jitter, raised to at least a
 * `bye`'s `retry_ms`, and what each close code means (docs/protocol.md §5).
 */

/** Backoff parameters. */
export interface BackoffOptions {
  /** Bound of the first attempt's sleep, ms (attempt 0 sleeps in [0, base]). Default 100. */
  baseMs?: number;
  /** Largest bound of any sleep, ms (`retry_ms` may exceed it). Default 30 000. */
  capMs?: number;
  /** Consecutive failed attempts after which the client gives up; default: never. */
  maxAttempts?: number;
}

/** What a close code asks of a client. */
export type CloseClass = "fatal" | "refresh" | "retry";

/**
 * 4000 (protocol error), 4005 (kicked) and 4006 (frame too large) end the
 * client; 4001/4008 refresh the token first; everything else, and a
 * connection lost without a code, is retried with backoff.
 */
export function classify(code: number | undefined): CloseClass {
  if (code === 4000 || code === 4005 || code === 4006) return "fatal";
  if (code === 4001 || code === 4008) return "refresh";
  return "retry";
}

/** `min(cap, base · 2^attempt)`. */
export function bound(o: BackoffOptions, attempt: number): number {
  const base = o.baseMs ?? 100, cap = o.capMs ?? 30_000;
  return Math.min(cap, base * 2 ** Math.min(attempt, 52));
}

/** The sleep before attempt `attempt` (0-based): uniform in [0, bound], at least `retryMs`. */
export function delay(o: BackoffOptions, attempt: number, retryMs = 0, random = Math.random): number {
  return Math.max(Math.floor(random() * (bound(o, attempt) + 1)), retryMs);
}
