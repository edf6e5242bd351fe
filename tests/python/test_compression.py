"""permessage-deflate (RFC 7692): negotiated only with no context takeover
both ways; a routed message is compressed once per shard and the same bytes
reach every subscriber that negotiated it; what a client compresses is
inflated within the same limits as what it sends plain.  Frames are read
raw and inflated with Python's zlib (egproto.RawWs), an implementation
independent of the gateway's; `websockets` with compression on is the
library client."""

import asyncio
import json
import subprocess

import pytest

from conftest import BIN
from egproto import RawWs, WsClient
from helpers import new_user

BOTH = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"

# A chat message of about 300 bytes, as a room would carry it.
CHAT = {"text": "Hey team, the deploy to staging finished; can someone check the dashboard "
                "for the checkout service? Latency looks a bit high since the last release.",
        "ts": 1733212345678, "kind": "text", "mentions": ["user_19ab", "user_77cd"],
        "client_msg_id": "c0a8f1e2-1b2c-4d5e-9f00-112233445566"}


async def raw(gw, user, extensions=BOTH, enc="json"):
    c = await RawWs.connect("127.0.0.1", gw.ws_port, enc=enc, extensions=extensions)
    await c.hello(user)
    return c


def deflate_metrics(gw):
    return {
        "runs": gw.metric("edgegate_ws_deflate_compressions_total"),
        "out_raw": gw.metric("edgegate_ws_deflate_bytes_total", dir="out", form="uncompressed"),
        "out_z": gw.metric("edgegate_ws_deflate_bytes_total", dir="out", form="compressed"),
        "in_raw": gw.metric("edgegate_ws_deflate_bytes_total", dir="in", form="uncompressed"),
        "in_z": gw.metric("edgegate_ws_deflate_bytes_total", dir="in", form="compressed"),
    }


async def test_negotiation_answers_each_offer(gateway):
    gw = gateway()
    # What browsers (and the `websockets` library) offer.
    c = await RawWs.connect("127.0.0.1", gw.ws_port, extensions="permessage-deflate; client_max_window_bits")
    assert c.headers.get("sec-websocket-extensions") == BOTH
    await c.close()
    # A limited server window is accepted and echoed (RFC 7692 §7.1.2.1).
    c = await RawWs.connect("127.0.0.1", gw.ws_port, extensions="permessage-deflate; server_max_window_bits=10")
    assert c.headers.get("sec-websocket-extensions") == BOTH + "; server_max_window_bits=10"
    await c.close()
    # Offers it cannot accept are declined: no extension, plain frames.
    for bad in ("permessage-deflate; x_unknown", "permessage-deflate; server_max_window_bits=16",
                "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
                "x-webkit-deflate-frame"):
        c = await RawWs.connect("127.0.0.1", gw.ws_port, extensions=bad)
        assert "sec-websocket-extensions" not in c.headers, (bad, c.headers)
        await c.close()
    # First acceptable offer of a list.
    c = await RawWs.connect("127.0.0.1", gw.ws_port,
                            extensions="permessage-deflate; x_unknown, permessage-deflate")
    assert c.headers.get("sec-websocket-extensions") == BOTH
    await c.close()
    # No offer, no extension.
    c = await RawWs.connect("127.0.0.1", gw.ws_port)
    assert "sec-websocket-extensions" not in c.headers
    await c.close()


async def test_compression_off_never_accepts(gateway):
    gw = gateway(EDGEGATE_WS__COMPRESSION="off")
    c = await raw(gw, new_user(), extensions="permessage-deflate; client_max_window_bits")
    assert "sec-websocket-extensions" not in c.headers
    # So RSV1 is a protocol error.
    await c.send_deflated(0x1, json.dumps({"t": "ping", "id": 9}).encode())
    await c.expect_bye(4000)
    assert gw.metric("edgegate_ws_deflate_compressions_total") == 0


@pytest.mark.parametrize("enc", ["json", "bin"])
async def test_a_fanned_out_message_is_compressed_once_per_shard(gateway, enc):
    gw = gateway(EDGEGATE_SHARDS__COUNT="1")
    room = f"room:{new_user('z')}"
    pub = await raw(gw, new_user("pub"), extensions=None, enc=enc)
    zs = [await raw(gw, new_user("z"), enc=enc) for _ in range(12)]
    plain = [await raw(gw, new_user("p"), extensions=None, enc=enc) for _ in range(3)]
    for c in zs + plain:
        assert c.deflate == (c in zs)
        await c.sub(room)
    before = deflate_metrics(gw)
    ack = await pub.call("pub", ch=room, d=CHAT)
    assert ack["t"] == "ok", ack
    for c in zs + plain:
        m = await c.expect("msg", ch=room, d=CHAT)
        assert m["from"] == pub.user
    after = deflate_metrics(gw)
    # Compressed once, for all twelve; each got the same compressed frame.
    assert after["runs"] - before["runs"] == 1, (before, after)
    z_frames = [c.data_frames[-1] for c in zs]
    assert all(rsv1 for rsv1, _ in z_frames), z_frames
    assert len({n for _, n in z_frames}) == 1, z_frames
    (_, z_len), = set(z_frames)
    plain_frames = [c.data_frames[-1] for c in plain]
    assert not any(rsv1 for rsv1, _ in plain_frames), plain_frames
    (_, raw_len), = set(plain_frames)
    assert after["out_z"] - before["out_z"] == 12 * z_len
    assert after["out_raw"] - before["out_raw"] == 12 * raw_len
    print(f"\n{enc}: a {raw_len}-byte message is {z_len} bytes compressed ({raw_len / z_len:.2f}x)")
    assert z_len < raw_len
    # The publisher's small ack, under compression_min_bytes, was not compressed.
    for c in zs + plain + [pub]:
        await c.close()


async def test_short_messages_and_limited_windows_go_uncompressed(gateway):
    gw = gateway(EDGEGATE_SHARDS__COUNT="1")
    room = f"room:{new_user('w')}"
    limited = await raw(gw, new_user("lim"), extensions="permessage-deflate; server_max_window_bits=9")
    full = await raw(gw, new_user("full"))
    for c in (limited, full):
        await c.sub(room)
    pub = await raw(gw, new_user("pub"))
    await pub.call("pub", ch=room, d="hi")              # short: under the minimum
    for c in (limited, full):
        await c.expect("msg", d="hi")
        assert c.data_frames[-1][0] is False
    await pub.call("pub", ch=room, d=CHAT)
    for c in (limited, full):
        await c.expect("msg", d=CHAT)
    assert full.data_frames[-1][0] is True
    # Its window is smaller than the shard's compressor's: sent plain.
    assert limited.data_frames[-1][0] is False
    # Yet its own compressed messages are inflated.
    await limited.send_deflated(0x1, json.dumps({"t": "pub", "id": 77, "ch": room, "d": CHAT}).encode())
    ack = await limited.recv_until(lambda e: e["t"] in ("ok", "err") and e.get("id") == 77)
    assert ack["t"] == "ok", ack
    await full.expect("msg", d=CHAT, **{"from": limited.user})
    for c in (limited, full, pub):
        await c.close()


async def test_a_recovery_replay_is_compressed_as_one_batch(gateway):
    """Replayed messages are this connection's alone: batched with the `ok`
    and compressed together (far better than one by one), not framed one
    per message as a fanned-out message is."""
    gw = gateway(EDGEGATE_SHARDS__COUNT="1")
    room = f"room:{new_user('rec')}"
    pub = await raw(gw, new_user("pub"), extensions=None)
    for i in range(10):
        assert (await pub.call("pub", ch=room, d={**CHAT, "n": i}))["t"] == "ok"
    c = await raw(gw, new_user("late"))
    frames_before = len(c.data_frames)
    runs = gw.metric("edgegate_ws_deflate_compressions_total")
    ok = await c.call("sub", ch=room, meta={"since": {"seq": 0}})
    assert ok["t"] == "ok" and ok["meta"]["recovered"] is True, ok
    got = [await c.expect("msg", ch=room) for _ in range(10)]
    assert [m["d"]["n"] for m in got] == list(range(10))
    frames = c.data_frames[frames_before:]
    assert len(frames) == 1 and frames[0][0], frames
    assert gw.metric("edgegate_ws_deflate_compressions_total") - runs == 1
    raw_len = sum(len(json.dumps(m, separators=(",", ":"))) for m in got)
    print(f"\nreplay of 10: ~{raw_len} bytes of JSON in one {frames[0][1]}-byte compressed frame")
    assert frames[0][1] * 3 < raw_len
    for x in (c, pub):
        await x.close()


async def test_compressed_input_is_bounded_and_checked(gateway):
    gw = gateway(EDGEGATE_LIMITS__MAX_FRAME_BYTES="65536")
    # Inflates past max_frame_bytes: 4006, like a plain frame that big, and
    # the gateway stops inflating at the limit (2 MiB of zeros is ~2 KiB).
    c = await raw(gw, new_user())
    bomb = json.dumps({"t": "pub", "id": 1, "ch": "room:x", "d": "0" * (2 << 20)}).encode()
    z = RawWs.deflate_payload(bomb)
    assert len(z) < 16384
    await c.send_frame(0x1, z, rsv=4)
    await c.expect_bye(4006)
    # Not deflate data at all: 4000 with a reason.
    c = await raw(gw, new_user())
    await c.send_frame(0x1, b"\xff\xff\xff\xff not deflate", rsv=4)
    bye = await c.expect_bye(4000)
    assert "deflate" in bye.get("reason", ""), bye
    # Inflated text that is not UTF-8: 4000 too, never a panic.
    c = await raw(gw, new_user())
    await c.send_deflated(0x1, b"\xff\xfe\xfd" * 100)
    await c.expect_bye(4000)
    # RSV1 on a continuation frame.
    c = await raw(gw, new_user())
    await c.send_frame(0x1, b'{"t":"ping",', fin=False)
    await c.send_frame(0x0, b'"id":1}', rsv=4)
    await c.expect_bye(4000)
    # A compressed, fragmented message inflates once complete.
    c = await raw(gw, new_user())
    z = RawWs.deflate_payload(json.dumps({"t": "req", "id": 5, "ch": "svc:echo", "d": CHAT}).encode())
    await c.send_frame(0x1, z[:10], fin=False, rsv=4)
    await c.send_frame(0x9, b"between")
    await c.send_frame(0x0, z[10:])
    r = await c.recv_until(lambda e: e["t"] != "pong" and e.get("id") == 5)
    assert r["t"] == "reply" and r["d"] == CHAT, r
    await c.close()
    m = deflate_metrics(gw)
    assert m["in_raw"] > m["in_z"] > 0, m


async def test_the_websockets_library_round_trips_compressed(gateway):
    """An independent permessage-deflate client (Python `websockets`) in
    both encodings: it compresses what it sends and inflates what it gets."""
    gw = gateway()
    room = f"room:{new_user('lib')}"
    a = await WsClient.connect(gw.ws_url, compression="deflate")
    b = await WsClient.connect(gw.ws_url, enc="bin", compression="deflate")
    assert a.ws.response.headers.get("Sec-WebSocket-Extensions") == BOTH
    await a.hello(new_user("a"))
    await b.hello(new_user("b"))
    for c in (a, b):
        await c.sub(room)
    before = deflate_metrics(gw)
    for i in range(20):
        assert (await a.call("pub", ch=room, d={**CHAT, "n": i}))["t"] == "ok"
    for c in (a, b):
        for i in range(20):
            await c.recv_until(lambda e: e["t"] == "msg" and e["d"].get("n") == i)
    after = deflate_metrics(gw)
    assert after["in_z"] > before["in_z"], "the library's messages arrived compressed"
    assert after["out_z"] > before["out_z"], "and ours went out compressed"
    for c in (a, b):
        await c.close()


def test_check_config_names_the_compression_keys(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[ws]\nlisten = "127.0.0.1:1"\ncompression = "brotli"\n')
    r = subprocess.run([str(BIN), "check-config", "--config", str(cfg)], capture_output=True, text=True)
    assert r.returncode != 0 and "ws.compression" in r.stderr, r.stderr
    cfg.write_text('[ws]\nlisten = "127.0.0.1:1"\ncompression_min_bytes = 99999999\n')
    r = subprocess.run([str(BIN), "check-config", "--config", str(cfg)], capture_output=True, text=True)
    assert r.returncode != 0 and "ws.compression_min_bytes" in r.stderr, r.stderr
