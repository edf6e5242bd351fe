#!/usr/bin/env python3
"""permessage-deflate benchmarks (docs/bench-notes.md, "permessage-deflate").

Raw WebSocket clients on asyncio (the harness's tungstenite has no
permessage-deflate), against a gateway this script starts, pinned with
taskset to CPU 0 while the clients run on CPU 1:

    idle     N idle sessions offering permessage-deflate vs not: gateway RSS
             per connection (two fresh gateways, one per mode).
    wire     bytes on the wire of a chat-like ~300-byte JSON message, alone
             and in a batch (a recovery's catch-up), compressed vs not.
    fanout   K subscribers of one room, one publisher at R msg/s for S s:
             gateway CPU per delivery with compression off, on (shared: once
             per shard) and on with ws.compression_shared = false (compressed
             for each connection).

    .venv/bin/python scripts/bench_deflate.py idle --conns 10000
    .venv/bin/python scripts/bench_deflate.py wire
    .venv/bin/python scripts/bench_deflate.py fanout --subs 1000 --rate 100 --secs 10

Every run is bounded in count and time and stops the gateway it started.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("EDGEGATE_BIN", REPO / "target" / "release" / "edgegate"))
OFFER = "permessage-deflate; client_max_window_bits"
CHAT = {"text": "Hey team, the deploy to staging finished; can someone check the dashboard "
                "for the checkout service? Latency looks a bit high since the last release.",
        "ts": 1733212345678, "kind": "text", "mentions": ["user_19ab", "user_77cd"],
        "client_msg_id": "c0a8f1e2-1b2c-4d5e-9f00-112233445566"}
CLK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Gateway:
    def __init__(self, **env: str) -> None:
        self.ws, self.tcp, self.admin = free_port(), free_port(), free_port()
        full = dict(os.environ, RUST_LOG="warn", EDGEGATE_SHARDS__COUNT="1",
                    EDGEGATE_WS__LISTEN=f"127.0.0.1:{self.ws}", EDGEGATE_TCP__LISTEN=f"127.0.0.1:{self.tcp}",
                    EDGEGATE_ADMIN__LISTEN=f"127.0.0.1:{self.admin}", EDGEGATE_QUIC__LISTEN="",
                    EDGEGATE_LIMITS__ACCEPT_PER_S="100000", EDGEGATE_LIMITS__MAX_CONNECTIONS="19000",
                    **env)
        self.proc = subprocess.Popen(["taskset", "-c", "0", str(BIN), "run"], env=full,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(200):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/readyz", timeout=1).status == 200:
                    return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("gateway not ready")

    def rss_kib(self) -> int:
        for ln in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1])
        return 0

    def cpu_s(self) -> float:
        f = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / CLK

    def metric(self, name: str, label: str = "") -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=5).read().decode()
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                   if ln.startswith(name) and (ln[len(name)] in "{ ") and label in ln)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def frame(op: int, payload: bytes, rsv1: bool = False) -> bytes:
    n = len(payload)
    b0 = 0x80 | (0x40 if rsv1 else 0) | op
    hdr = bytes([b0, 0x80 | n]) if n < 126 else bytes([b0, 0xFE]) + struct.pack(">H", n)
    return hdr + b"\0\0\0\0" + payload     # a zero mask: the payload as it is


class Client(asyncio.Protocol):
    """Counts data frames and their payload bytes; answers pings."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.head: asyncio.Future | None = None
        self.frames = self.bytes = self.deflated = 0
        self.messages: list[tuple[bool, bytes]] = []
        self.keep = False
        self.transport = None

    def connection_made(self, t) -> None:
        self.transport = t
        self.head = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.head.done():
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return
            self.head.set_result(bytes(self.buf[:i]).decode("latin-1"))
            del self.buf[:i + 4]
        pos, buf = 0, self.buf
        while len(buf) - pos >= 2:
            b0, n = buf[pos], buf[pos + 1] & 0x7F
            at = pos + 2
            if n == 126:
                if len(buf) - pos < 4:
                    break
                n, at = struct.unpack_from(">H", buf, pos + 2)[0], pos + 4
            elif n == 127:
                if len(buf) - pos < 10:
                    break
                n, at = struct.unpack_from(">Q", buf, pos + 2)[0], pos + 10
            if len(buf) - at < n:
                break
            op = b0 & 0x0F
            if op == 0x9:
                self.transport.write(frame(0xA, bytes(buf[at:at + n])))
            elif op in (0x1, 0x2, 0x0):
                self.frames += 1
                self.bytes += n
                self.deflated += bool(b0 & 0x40)
                if self.keep:
                    self.messages.append((bool(b0 & 0x40), bytes(buf[at:at + n])))
            pos = at + n
        del buf[:pos]

    def envelopes(self) -> list[dict]:
        out = []
        for z, p in self.messages:
            if z:
                p = zlib.decompressobj(-15).decompress(p + b"\x00\x00\xff\xff")
            out += [json.loads(x) for x in p.decode().split("\n")]
        return out


async def connect(gw: Gateway, user: str, offer: str | None, src: str = "127.0.0.1") -> Client:
    loop = asyncio.get_running_loop()
    _, c = await loop.create_connection(Client, "127.0.0.1", gw.ws, local_addr=(src, 0))
    key = base64.b64encode(os.urandom(16)).decode()
    req = (f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: edgegate.v1.json\r\n")
    if offer:
        req += f"Sec-WebSocket-Extensions: {offer}\r\n"
    c.transport.write((req + "\r\n").encode())
    head = await asyncio.wait_for(c.head, 10)
    assert head.startswith("HTTP/1.1 101"), head
    assert ("permessage-deflate" in head) == bool(offer), head
    c.transport.write(frame(0x1, json.dumps({"t": "hello", "id": 1, "meta": {"user": user}}).encode()))
    return c


async def until(pred, secs: float, what: str) -> None:
    end = time.monotonic() + secs
    while not pred():
        if time.monotonic() > end:
            raise SystemExit(f"timed out: {what}")
        await asyncio.sleep(0.05)


async def idle(args) -> None:
    print(f"idle: {args.conns} sessions, held {args.hold} s; gateway pinned to CPU 0, 1 shard")
    for mode, offer in (("off (not offered)", None), ("negotiated", OFFER)):
        gw = Gateway()
        try:
            # One session first, then the baseline: what the first session
            # of a mode makes once per shard (the compressor, made on first
            # use) is not a cost per connection.
            clients = [await connect(gw, "warm", offer)]
            await asyncio.sleep(0.5)
            base = gw.rss_kib()
            for i in range(args.conns):
                clients.append(await connect(gw, f"u{i}", offer, src=f"127.0.0.{2 + i // 5000}"))
            await until(lambda: gw.metric("edgegate_sessions") >= args.conns + 1, 60, "sessions")
            await asyncio.sleep(args.hold)
            rss = gw.rss_kib()
            print(f"  {mode:18}: RSS {base} -> {rss} KiB, {(rss - base) * 1024 / args.conns:.0f} B per connection")
            for c in clients:
                c.transport.close()
        finally:
            gw.stop()


async def wire(args) -> None:
    gw = Gateway()
    try:
        room = "room:wire"
        pub = await connect(gw, "pub", None)
        subs = {mode: await connect(gw, f"s-{mode}", offer) for mode, offer in (("plain", None), ("deflate", OFFER))}
        for c in subs.values():
            c.keep = True
            c.transport.write(frame(0x1, json.dumps({"t": "sub", "id": 2, "ch": room}).encode()))
        await asyncio.sleep(0.3)
        n0 = {m: (c.frames, c.bytes) for m, c in subs.items()}
        pub.transport.write(frame(0x1, json.dumps({"t": "pub", "id": 3, "ch": room, "d": CHAT}).encode()))
        await until(lambda: all(c.frames > n0[m][0] for m, c in subs.items()), 5, "delivery")
        one = {m: c.bytes - n0[m][1] for m, c in subs.items()}
        raw_len = len(subs["plain"].messages[-1][1])
        print(f"wire: one chat message ({raw_len} bytes of JSON): {one['plain']} B plain, "
              f"{one['deflate']} B compressed ({one['plain'] / one['deflate']:.2f}x)")
        for i in range(19):
            pub.transport.write(frame(0x1, json.dumps({"t": "pub", "id": 10 + i, "ch": room, "d": {**CHAT, "n": i}}).encode()))
        await asyncio.sleep(0.5)
        # A returning client's catch-up: 20 messages recovered in one batch.
        late = {mode: await connect(gw, f"l-{mode}", offer) for mode, offer in (("plain", None), ("deflate", OFFER))}
        await asyncio.sleep(0.3)
        for c in late.values():
            c.keep = True
            c.messages.clear()
            c.transport.write(frame(0x1, json.dumps({"t": "sub", "id": 2, "ch": room, "meta": {"since": {"seq": 0}}}).encode()))
        await asyncio.sleep(0.8)
        got = {m: sum(len(p) for _, p in c.messages) for m, c in late.items()}
        envs = [e for e in late["deflate"].envelopes() if e.get("t") == "msg"]
        assert envs == [e for e in late["plain"].envelopes() if e.get("t") == "msg"]
        print(f"wire: a catch-up of {len(envs)} messages: {got['plain']} B plain, {got['deflate']} B compressed "
              f"({got['plain'] / max(got['deflate'], 1):.2f}x)")
    finally:
        gw.stop()


async def fanout(args) -> None:
    modes = [("off", None, {}), ("shared", OFFER, {}),
             ("per-connection", OFFER, {"EDGEGATE_WS__COMPRESSION_SHARED": "false"})]
    print(f"fanout: {args.subs} subscribers, 1 publisher at {args.rate} msg/s for {args.secs} s "
          f"({args.subs * args.rate} deliveries/s), a {len(json.dumps(CHAT))}-byte payload; gateway on CPU 0, 1 shard")
    for rnd in range(args.rounds):
        for name, offer, env in modes:
            gw = Gateway(**env)
            try:
                room = "room:fan"
                subs = [await connect(gw, f"s{i}", offer, src=f"127.0.0.{2 + i // 5000}") for i in range(args.subs)]
                pub = await connect(gw, "pub", None)
                for c in subs:
                    c.transport.write(frame(0x1, json.dumps({"t": "sub", "id": 2, "ch": room}).encode()))
                await until(lambda: all(c.frames >= 2 for c in subs), 30, "subscribed")
                f0, b0 = sum(c.frames for c in subs), sum(c.bytes for c in subs)
                d0, cpu0, t0 = gw.metric("edgegate_messages_out_total"), gw.cpu_s(), time.monotonic()
                sent = 0
                while (now := time.monotonic() - t0) < args.secs:
                    due = int(now * args.rate) + 1
                    for _ in range(due - sent):
                        sent += 1
                        msg = {"t": "pub", "id": 100 + sent, "ch": room, "d": {**CHAT, "n": sent}}
                        pub.transport.write(frame(0x1, json.dumps(msg).encode()))
                    await asyncio.sleep(0.002)
                # Frames may carry batches: wait on the gateway's count.
                want = d0 + sent * (args.subs + 1)
                try:
                    await until(lambda: gw.metric("edgegate_messages_out_total") >= want, 20, "deliveries")
                except SystemExit:
                    pass
                cpu, el = gw.cpu_s() - cpu0, time.monotonic() - t0
                deliveries = gw.metric("edgegate_messages_out_total") - d0 - sent   # less the publisher's acks
                got = sum(c.frames for c in subs) - f0
                z = sum(c.deflated for c in subs)
                nbytes = sum(c.bytes for c in subs) - b0
                runs = gw.metric("edgegate_ws_deflate_compressions_total")
                drops = gw.metric("edgegate_drops_total")
                print(f"  [{rnd + 1}] {name:15}: {deliveries:.0f} deliveries ({got} frames, {z} compressed, "
                      f"{runs:.0f} compressor runs), {nbytes / max(deliveries, 1):.0f} B/delivery on the wire; gateway CPU "
                      f"{cpu:.2f} s in {el:.1f} s = {cpu / max(deliveries, 1) * 1e6:.2f} us/delivery; drops {drops:.0f}")
                for c in subs + [pub]:
                    c.transport.close()
            finally:
                gw.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("idle")
    p.add_argument("--conns", type=int, default=10000)
    p.add_argument("--hold", type=float, default=5)
    sub.add_parser("wire")
    p = sub.add_parser("fanout")
    p.add_argument("--subs", type=int, default=1000)
    p.add_argument("--rate", type=int, default=100)
    p.add_argument("--secs", type=float, default=10)
    p.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    if not BIN.exists():
        sys.exit(f"{BIN} not built (cargo build --release --bin edgegate, or set EDGEGATE_BIN)")
    # The clients on CPU 1, away from the gateway.
    os.sched_setaffinity(0, {1})
    asyncio.run({"idle": idle, "wire": wire, "fanout": fanout}[args.cmd](args))


if __name__ == "__main__":
    main()
