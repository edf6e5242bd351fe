# Regenerates binary.json from the cases below with an independent (third)
# encoder: python3 proto/vectors/gen.py. Rust (proto/tests/vectors.rs) and the
# TypeScript SDK (client-js/test/codec.test.mjs) must both agree with it.
import json, base64
TYPES=dict(hello=1,sub=2,unsub=3,pub=4,req=5,ping=6,pong=7,presence=8,history=9,welcome=64,ok=65,err=66,msg=67,reply=68,bye=69,members=70)
ERR=["bad_request","unauthorized","forbidden","bad_channel","no_service","timeout","rate_limited","too_large","not_subscribed","backbone_unavailable","internal"]
def leb(v):
    out=b""
    while v>=0x80: out+=bytes([(v&0x7f)|0x80]); v>>=7
    return out+bytes([v])
def s(x): b=x.encode(); return leb(len(b))+b
def enc(text):
    o=json.loads(text)
    bits=0; body=b""
    if "id" in o: bits|=1; body+=leb(o["id"])
    if "ch" in o: bits|=2; body+=s(o["ch"])
    if "seq" in o: bits|=4; body+=leb(o["seq"])
    if "from" in o: bits|=8; body+=s(o["from"])
    if "code" in o:
        bits|=16; c=o["code"]; c=ERR.index(c)+1 if isinstance(c,str) else c
        body+=leb(c)+s(o.get("reason",""))
    if "meta" in o: bits|=32; body+=s(json.dumps(o["meta"],separators=(",",":"),ensure_ascii=False))
    if "d" in o: bits|=64; body+=json.dumps(o["d"],separators=(",",":"),ensure_ascii=False).encode()
    elif "db" in o: body+=base64.b64decode(o["db"])
    return bytes([TYPES[o["t"]],bits])+body
cases=[
 ("hello with user, instance and since", '{"t":"hello","id":1,"meta":{"user":"alice","instance":"tab-1","since":{"epoch":"","seq":0}}}'),
 ("sub with since", '{"t":"sub","id":2,"ch":"room:lobby","meta":{"since":{"seq":41,"epoch":"e1"}}}'),
 ("unsub", '{"t":"unsub","id":3,"ch":"room:lobby"}'),
 ("pub, JSON payload, two-byte id", '{"t":"pub","id":300,"ch":"room:lobby","d":{"text":"hi"}}'),
 ("pub, binary payload", '{"t":"pub","id":4,"ch":"user:bob","db":"AAEC/w=="}'),
 ("req", '{"t":"req","id":5,"ch":"svc:echo","d":[1,2,3]}'),
 ("ping without id", '{"t":"ping"}'),
 ("ping with id", '{"t":"ping","id":9}'),
 ("pong with id", '{"t":"pong","id":9}'),
 ("welcome", '{"t":"welcome","id":1,"meta":{"conn":"n1-0-1","user":"alice","node":"n1","shard":0,"hb_ms":25000,"max_frame":65536}}'),
 ("welcome with stream", '{"t":"welcome","id":1,"meta":{"conn":"n1-1-7","user":"bob","node":"n1","shard":1,"hb_ms":25000,"max_frame":65536,"stream":{"epoch":"k3x","recovered":true,"seq":12}}}'),
 ("ok to pub, duplicate", '{"t":"ok","id":4,"seq":17,"meta":{"duplicate":true}}'),
 ("ok to sub, not recovered", '{"t":"ok","id":2,"seq":41,"meta":{"epoch":"e1","recovered":false,"reason":"expired","oldest":7}}'),
 ("ok, plain", '{"t":"ok","id":3}'),
 ("err with a named code", '{"t":"err","id":6,"code":"forbidden","reason":"room not granted"}'),
 ("err, last named code", '{"t":"err","id":7,"code":"internal"}'),
 ("err, a number the protocol names not", '{"t":"err","code":99}'),
 ("err, escapes in reason", '{"t":"err","code":"bad_request","reason":"quote \\" backslash \\\\ newline \\n control \\u0001"}'),
 ("msg, the largest safe seq", '{"t":"msg","id":300,"ch":"room:lobby","seq":9007199254740991,"from":"alice","d":{"text":"hi"}}'),
 ("msg, binary payload", '{"t":"msg","ch":"user:bob","seq":5,"from":"svc","db":"3q2+7w=="}'),
 ("msg, UTF-8 strings", '{"t":"msg","ch":"room:a","seq":1,"from":"zoë","d":"héllo 😀"}'),
 ("reply, null payload", '{"t":"reply","id":5,"d":null}'),
 ("bye with retry_ms", '{"t":"bye","code":1001,"reason":"going away","meta":{"retry_ms":2345}}'),
 ("bye kicked", '{"t":"bye","code":4005,"reason":"kicked"}'),
 ("sub with presence", '{"t":"sub","id":10,"ch":"room:lobby","meta":{"presence":true}}'),
 ("ephemeral pub", '{"t":"pub","id":11,"ch":"room:lobby","meta":{"ephemeral":true},"d":{"typing":true}}'),
 ("ephemeral msg, no seq", '{"t":"msg","id":11,"ch":"room:lobby","from":"alice","meta":{"ephemeral":true},"d":{"typing":true}}'),
 ("presence query", '{"t":"presence","id":12,"ch":"room:lobby","meta":{"limit":100,"after":"alice"}}'),
 ("history query", '{"t":"history","id":13,"ch":"room:lobby","meta":{"limit":50,"before":1234}}'),
 ("members", '{"t":"members","ch":"room:lobby","meta":{"present":12,"join":["alice"],"leave":["bob"]}}'),
 ("reply to history", '{"t":"reply","id":13,"d":{"epoch":"e1","top":3,"messages":[{"seq":3,"from":"alice","d":{"text":"hi"}}],"more":true}}'),
]
vecs=[{"name":n,"json":j,"bin":enc(j).hex()} for n,j in cases]
batch=[cases[3][1],cases[11][1]]
bb=b"".join(leb(len(enc(j)))+enc(j) for j in batch)
bad_bin=[
 ("empty","") ,("unknown type code 10","0a00"),("reserved bit","4180"),
 ("id bit with no id","4101"),("LEB128 id over u64","4101ffffffffffffffffffff01"),
 ("truncated LEB128","410180"),("ch not UTF-8","430202c328"),("ch longer than the frame","430205616263"),
 ("meta not an object","4120025b5d"),("JSON bit, payload not JSON","44407b"),("JSON bit, empty payload","4440"),
]
bad_json=[
 ("unknown type",'{"t":"nope"}'),("no type",'{"id":1}'),("not an object","[1]"),("not JSON","{"),
 ("both d and db",'{"t":"pub","d":1,"db":"AA=="}'),("unknown err name",'{"t":"err","code":"nope"}'),
 ("negative id",'{"t":"ok","id":-1}'),("fractional id",'{"t":"ok","id":1.5}'),("meta an array",'{"t":"ok","meta":[1]}'),
 ("ch a number",'{"t":"ok","ch":5}'),("db not base64",'{"t":"pub","db":"!!"}'),
]
out={"about":"Shared test vectors for the binary and JSON envelope codecs (docs/protocol.md section 2). "
 "For each of 'envelopes': binary decode of bin equals JSON decode of json, binary encode of it is bin, "
 "and JSON encode of it is json. 'ws_binary_batch' is one WebSocket binary message (LEB128-length-prefixed "
 "envelopes). Every 'bad_bin' / 'bad_json' input must fail to decode. Used by proto/tests/vectors.rs and "
 "client-js/test/codec.test.mjs.",
 "envelopes":vecs,
 "ws_binary_batch":{"bin":bb.hex(),"json":batch},
 "bad_bin":[{"name":n,"bin":h} for n,h in bad_bin],
 "bad_json":[{"name":n,"json":j} for n,j in bad_json]}
open(__import__("os").path.join(__import__("os").path.dirname(__file__),"binary.json"),"w").write(json.dumps(out,indent=1,ensure_ascii=False)+"\n")
