/**
 * SSE (docs/protocol.md §10) behind the small WebSocket interface the
 * client drives, for networks that refuse WebSocket.
 *
 * - The first envelope sent (the client's `hello`) opens the stream:
 *   `GET /sse?hello=<URL-encoded hello>`, read with `fetch` streaming
 *   (browsers and Node ≥ 20 alike; `EventSource` cannot be stopped from
 *   reconnecting on its own, and Node has none). Each event's data is a
 *   batch of JSON envelopes, one per line: exactly a WebSocket text
 *   message, so the client decodes both the same way.
 * - Later envelopes are POSTed with `Eg-Session` (the `welcome`'s
 *   `meta.session`), one request at a time; what queues meanwhile leaves
 *   in the next body, within `max_frame`. A `429`/`503` is retried after
 *   `Retry-After`; any other failure ends the session (the client then
 *   reconnects and resends what had no answer, as after a dropped
 *   WebSocket).
 * - A comment line is the server's heartbeat (it comes when the client
 *   has been quiet for `hb_ms`): it is answered with a `ping`, as a
 *   browser answers a WebSocket ping, so the gateway's idle timeout sees
 *   the client alive.
 * - The stream ends after `bye`; its end, an aborted read or a failed POST
 *   is a close (code 1006, as a WebSocket without a close frame).
 *
 * Lines are read as the gateway writes them (LF, or CRLF); no other
 * field than `data` is used.
 */

import type { WebSocketLike } from "./client.js";

const utf8 = new TextEncoder();

/** The SSE URL of a gateway whose WebSocket URL is `ws`: same host and TLS, `/ws` → `/sse`. */
export function sseUrl(ws: string): string {
  const u = new URL(ws);
  u.protocol = u.protocol === "wss:" ? "https:" : u.protocol === "ws:" ? "http:" : u.protocol;
  u.pathname = u.pathname.replace(/\/ws$|\/$/, "") + "/sse";
  u.search = "";
  return u.toString();
}

/** One SSE session, driven like a WebSocket (JSON only). */
export class SseSocket implements WebSocketLike {
  binaryType = "arraybuffer";
  readonly protocol = "edgegate.v1.json";
  onopen: ((ev: unknown) => void) | null = null;
  onmessage: ((ev: { data: unknown }) => void) | null = null;
  onclose: ((ev: { code: number; reason: string }) => void) | null = null;
  onerror: ((ev: unknown) => void) | null = null;

  private readonly abort = new AbortController();
  private session?: string;
  private maxFrame = Infinity;
  private queue: string[] = [];
  private posting = false;
  private started = false;
  private done = false;

  constructor(private readonly url: string) {
    // Like a WebSocket, it is "open" a moment later; the client then sends
    // its hello, which is what opens the stream.
    setTimeout(() => this.done || this.onopen?.({}), 0);
  }

  send(data: string | Uint8Array): void {
    if (typeof data !== "string") throw new TypeError("SSE carries JSON envelopes only");
    if (this.done) return;
    if (!this.started) {
      this.started = true;
      void this.read(data);
    } else {
      this.queue.push(data);
      void this.pump();
    }
  }

  close(code = 1000, reason = ""): void {
    this.end(code, reason);
  }

  private end(code: number, reason: string): void {
    if (this.done) return;
    this.done = true;
    this.abort.abort();
    const h = this.onclose;
    setTimeout(() => h?.({ code, reason }), 0);
  }

  private async read(hello: string): Promise<void> {
    try {
      const r = await fetch(`${this.url}?hello=${encodeURIComponent(hello)}`, {
        headers: { Accept: "text/event-stream" },
        cache: "no-store",
        signal: this.abort.signal,
      });
      if (r.status !== 200 || !r.body) throw new Error(`HTTP ${r.status}`);
      const body = r.body.getReader();
      const text = new TextDecoder();
      let buf = "";
      let data: string[] = [];
      for (;;) {
        const { value, done } = await body.read();
        if (done) break;
        buf += text.decode(value, { stream: true });
        let nl: number;
        while ((nl = buf.indexOf("\n")) >= 0) {
          let line = buf.slice(0, nl);
          buf = buf.slice(nl + 1);
          if (line.endsWith("\r")) line = line.slice(0, -1);
          if (line === "") {
            if (data.length) this.event(data);
            data = [];
          } else if (line[0] === ":") {
            // The server's heartbeat: answered like a WebSocket ping.
            this.send('{"t":"ping"}');
          } else if (line.startsWith("data:")) {
            data.push(line.slice(line[5] === " " ? 6 : 5));
          }
        }
      }
      this.end(1006, "stream ended");
    } catch (err) {
      this.end(1006, String(err));
    }
  }

  private event(lines: string[]): void {
    if (!this.session) {
      for (const l of lines) {
        const e = JSON.parse(l);
        if (e.t === "welcome") {
          this.session = e.meta?.session;
          this.maxFrame = Number(e.meta?.max_frame ?? Infinity);
        }
      }
    }
    this.onmessage?.({ data: lines.join("\n") });
    void this.pump();
  }

  /** POSTs what is queued, one request at a time (after the welcome). */
  private async pump(): Promise<void> {
    if (this.posting || !this.session || this.done) return;
    this.posting = true;
    try {
      while (this.queue.length && !this.done) {
        let body = this.queue.shift()!;
        let size = utf8.encode(body).length;
        while (this.queue.length) {
          const n = utf8.encode(this.queue[0]!).length + 1;
          if (size + n > this.maxFrame) break;
          body += "\n" + this.queue.shift();
          size += n;
        }
        const r = await fetch(this.url, {
          method: "POST",
          headers: { "Eg-Session": this.session, "Content-Type": "text/plain" },
          body,
          signal: this.abort.signal,
        });
        if (r.status === 429 || r.status === 503) {
          this.queue.unshift(body);
          const s = Number(r.headers.get("Retry-After"));
          await new Promise((ok) => setTimeout(ok, (s > 0 ? s : 1) * 1000));
        } else if (r.status !== 204) {
          throw new Error(`POST answered ${r.status}`);
        }
      }
    } catch (err) {
      this.end(1006, String(err));
    } finally {
      this.posting = false;
    }
  }
}
