// Test helpers: the real gateway binary on free loopback ports, a TCP proxy
// that can cut or silence connections, HS256 tokens, and event logs.
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync, mkdtempSync, openSync, readFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
export const BIN = process.env.EDGEGATE_BIN ?? join(REPO, "target/debug/edgegate");

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Ports handed out so far in this test process: the kernel may give the same
// free port to two binds in a row (CI once saw the admin port equal the TCP
// port), and ports are picked before anything listens on them.
const ISSUED = new Set();

function bindFree() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** A TCP port free on 127.0.0.1 now and never handed out before in this process. */
export async function freePort() {
  for (let i = 0; i < 1000; i++) {
    const port = await bindFree();
    if (!ISSUED.has(port)) {
      ISSUED.add(port);
      return port;
    }
  }
  throw new Error("no fresh free port on 127.0.0.1");
}

/** Polls `fn` until it returns a truthy value; fails with `what` after `ms`. */
export async function waitFor(fn, what, ms = 10_000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(10);
  }
}

/** The real gateway: `await Gateway.start({EDGEGATE_X__Y: "..."})`. */
export class Gateway {
  static async start(env = {}) {
    const g = new Gateway();
    g.env = {
      EDGEGATE_WS__LISTEN: `127.0.0.1:${await freePort()}`,
      EDGEGATE_TCP__LISTEN: `127.0.0.1:${await freePort()}`,
      EDGEGATE_ADMIN__LISTEN: `127.0.0.1:${await freePort()}`,
      EDGEGATE_QUIC__LISTEN: "",
      EDGEGATE_SHARDS__COUNT: "2",
      ...env,
    };
    g.dir = mkdtempSync(join(tmpdir(), "eg-js-"));
    g.runs = 0;
    await g.run();
    return g;
  }

  get url() {
    return `ws://${this.env.EDGEGATE_WS__LISTEN}/ws`;
  }

  get admin() {
    return `http://${this.env.EDGEGATE_ADMIN__LISTEN}`;
  }

  /** Starts (again, on the same ports) and waits for /readyz. */
  async run() {
    if (!existsSync(BIN)) throw new Error(`edgegate binary not found at ${BIN} (cargo build, or set EDGEGATE_BIN)`);
    this.log = join(this.dir, `gateway${this.runs++}.stderr`);
    const err = openSync(this.log, "w");
    this.proc = spawn(BIN, ["run"], { env: { ...process.env, ...this.env }, stdio: ["ignore", "ignore", err] });
    this.exited = new Promise((r) => this.proc.once("exit", (code, sig) => r({ code, sig })));
    const end = Date.now() + 30_000;
    for (;;) {
      if (this.proc.exitCode !== null) throw new Error(`edgegate exited before ready:\n${this.tail()}`);
      try {
        const r = await fetch(`${this.admin}/readyz`);
        if (r.status === 200) return;
      } catch {
        /* not listening yet */
      }
      if (Date.now() > end) {
        // A gateway left running keeps this test process (and the suite) alive.
        this.proc.kill("SIGKILL");
        await this.exited;
        throw new Error(`edgegate not ready in 30 s:\n${this.tail()}`);
      }
      await sleep(50);
    }
  }

  tail() {
    return readFileSync(this.log, "utf8").split("\n").slice(-40).join("\n");
  }

  async metrics() {
    return (await fetch(`${this.admin}/metrics`)).text();
  }

  /** SIGKILL: a crash, no bye. */
  async kill() {
    this.proc.kill("SIGKILL");
    await this.exited;
  }

  /** SIGTERM; resolves with the exit code, which must be 0, and checks for panics. */
  async stop() {
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill("SIGTERM");
    const { code, sig } = await this.exited;
    const log = readFileSync(this.log, "utf8");
    if (log.includes("panicked")) throw new Error(`gateway panicked:\n${this.tail()}`);
    if (sig !== "SIGKILL" && code !== 0) throw new Error(`gateway exited ${code} (${sig}):\n${this.tail()}`);
    return code;
  }
}

/**
 * A TCP proxy in front of the gateway: `cut()` resets every connection,
 * `refuse` closes new ones at once, `silence` forwards nothing (in one
 * direction or both) while keeping the sockets open, as a dead path does.
 */
export class Proxy {
  static async start(target) {
    const p = new Proxy();
    p.target = new URL(target);
    p.conns = new Set();
    p.refuse = false;
    p.silence = { up: false, down: false };
    p.server = net.createServer((c) => p.accept(c));
    await new Promise((r) => p.server.listen(0, "127.0.0.1", r));
    p.port = p.server.address().port;
    return p;
  }

  get url() {
    return `ws://127.0.0.1:${this.port}${this.target.pathname}`;
  }

  accept(c) {
    if (this.refuse) return c.destroy();
    const u = net.connect(Number(this.target.port), this.target.hostname);
    const pair = [c, u];
    this.conns.add(pair);
    c.on("data", (b) => this.silence.up || u.write(b));
    u.on("data", (b) => this.silence.down || c.write(b));
    const end = () => {
      this.conns.delete(pair);
      c.destroy();
      u.destroy();
    };
    for (const s of pair) {
      s.on("error", end);
      s.on("close", end);
    }
  }

  cut() {
    for (const [c, u] of this.conns) {
      c.resetAndDestroy();
      u.destroy();
    }
    this.conns.clear();
  }

  close() {
    this.cut();
    this.server.close();
  }
}

const b64url = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");

/** An HS256 JWT for `sub`, valid for `expIn` seconds. */
export function jwt(sub, secret, expIn = 300) {
  const now = Math.floor(Date.now() / 1000);
  const head = `${b64url({ alg: "HS256", typ: "JWT" })}.${b64url({ sub, iat: now, exp: now + expIn })}`;
  return `${head}.${createHmac("sha256", secret).update(head).digest("base64url")}`;
}

/** Records every event of `client` as `[name, value]`, in order. */
export function record(client) {
  const log = [];
  for (const ev of ["state", "connected", "disconnected", "message", "subscribed", "unrecovered", "stopped", "error"]) {
    client.on(ev, (v) => log.push([ev, v]));
  }
  log.of = (ev) => log.filter(([e]) => e === ev).map(([, v]) => v);
  return log;
}

/** A client of the SDK (`Client`), connecting at once, with its event log: `{ c, log }`. */
export function started(Client, url, extra = {}) {
  const c = new Client({ url, user: newUser(), ...extra });
  const log = record(c);
  c.connect();
  return { c, log };
}

let users = 0;
/** A user id no other test uses. */
export const newUser = (p = "u") => `${p}${process.pid}x${users++}`;
