"""Self-tests of the independent Python codec (no server needed)."""

import base64

import pytest

from egproto import (DecodeError, bin_batch, decode_bin, decode_json, encode_bin,
                     encode_json, leb128_decode, leb128_encode, split_bin_batch, tcp_frame)


@pytest.mark.parametrize("n,b", [(0, b"\x00"), (1, b"\x01"), (127, b"\x7f"), (128, b"\x80\x01"),
                                 (300, b"\xac\x02"), (2**64 - 1, b"\xff" * 9 + b"\x01")])
def test_leb128_vectors(n, b):
    assert leb128_encode(n) == b
    assert leb128_decode(b, 0) == (n, len(b))


def test_leb128_truncated():
    with pytest.raises(DecodeError):
        leb128_decode(b"\x80", 0)


def test_binary_vector_by_hand():
    # pub id=7 ch="room:a" d={"x":1}
    e = encode_bin("pub", id=7, ch="room:a", d={"x": 1})
    assert e == bytes([4, 0x01 | 0x02 | 0x40, 7, 6]) + b"room:a" + b'{"x":1}'
    # bye 4001 reason "x" meta {}
    e = encode_bin("bye", code=4001, reason="x", meta={})
    assert e == bytes([69, 0x10 | 0x20]) + leb128_encode(4001) + b"\x01x" + b"\x02{}"


def test_binary_roundtrip_all_fields():
    e = encode_bin("msg", id=2**40, ch="user:bob", seq=9, frm="alice", code=3, reason="r",
                   meta={"a": [1]}, raw=b"\x00\xff")
    d = decode_bin(e)
    assert d["t"] == "msg" and d["id"] == 2**40 and d["ch"] == "user:bob" and d["seq"] == 9
    assert d["from"] == "alice" and d["code"] == 3 and d["reason"] == "r" and d["meta"] == {"a": [1]}
    assert d["raw"] == b"\x00\xff" and "d" not in d


def test_binary_err_code_names():
    assert decode_bin(encode_bin("err", id=1, code="bad_channel"))["code"] == "bad_channel"


def test_binary_rejects():
    for bad in [b"", b"\x04", bytes([99, 0]), bytes([4, 0x80]), bytes([4, 0x02, 5, 0x61]),
                bytes([4, 0x40]) + b"{", bytes([4, 0x20, 2]) + b"[]"]:
        with pytest.raises(DecodeError):
            decode_bin(bad)


def test_batches_and_frames():
    a, b = encode_bin("ping", id=1), encode_bin("pong")
    assert split_bin_batch(bin_batch(a, b)) == [a, b]
    assert tcp_frame(a) == len(a).to_bytes(4, "big") + a
    with pytest.raises(DecodeError):
        split_bin_batch(bin_batch(a)[:-1])


def test_json_envelopes():
    assert decode_json(encode_json("pub", id=1, ch="room:x", d={"k": "v"})) == \
        {"t": "pub", "id": 1, "ch": "room:x", "d": {"k": "v"}}
    j = decode_json(encode_json("pub", id=1, ch="room:x", raw=b"\x01\x02"))
    assert j["db"] == base64.b64encode(b"\x01\x02").decode() and j["raw"] == b"\x01\x02"
