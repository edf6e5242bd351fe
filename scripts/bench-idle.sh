#!/usr/bin/env bash
# RSS per idle connection: a fresh gateway (default config: 2 shards), N idle
# connections of one transport from the bundled harness, held 10 s; prints
# the harness's "RSS per connection" line. Recorded in docs/bench-notes.md
# ("Issue 13 in one session"; the same method as "QUIC idle memory").
# usage: scripts/bench-idle.sh ws|wss|quic|sse N GATEWAY_BIN
# env: LT (loadtest binary, default target/release/loadtest), OUT (default /tmp/bench-idle)
# Ports 28080 (ws), 27443/udp (quic), 29090 (admin) on 127.0.0.1.
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
tr=${1:?transport}; n=${2:?connections}; bin=${3:?gateway binary}
LT=${LT:-$here/target/release/loadtest}
OUT=${OUT:-/tmp/bench-idle}
"$here/scripts/test-certs.sh" "$OUT" || exit 1
case $tr in
  ws)   tls=false; args=(--transport ws --target 127.0.0.1:28080) ;;
  wss)  tls=true;  args=(--transport ws --tls --ca "$OUT/ca.pem" --target 127.0.0.1:28080) ;;
  quic) tls=false; args=(--transport quic --ca "$OUT/ca.pem" --target 127.0.0.1:27443) ;;
  sse)  tls=false; args=(--transport sse --target 127.0.0.1:28080) ;;
  *) echo "bench-idle: transport ws, wss, quic or sse" >&2; exit 2 ;;
esac
EDGEGATE_TLS__CERT_CHAIN=$OUT/leaf.pem EDGEGATE_TLS__KEY=$OUT/leaf.key EDGEGATE_WS__TLS=$tls \
EDGEGATE_QUIC__LISTEN=127.0.0.1:27443 EDGEGATE_WS__LISTEN=127.0.0.1:28080 \
EDGEGATE_TCP__LISTEN=127.0.0.1:27000 EDGEGATE_ADMIN__LISTEN=127.0.0.1:29090 RUST_LOG=warn \
    "$bin" run > "$OUT/gateway-$tr.log" 2>&1 &
GW=$!
for _ in $(seq 100); do curl -sf 127.0.0.1:29090/readyz >/dev/null && break; sleep 0.1; done
"$LT" idle "${args[@]}" --connections "$n" --rate 400 --hold-secs 10 --admin 127.0.0.1:29090 \
    --gateway-pid $GW --source-ips 127.0.0.2-127.0.0.50 --quiet --json "$OUT/idle-$tr.json" 2>&1 |
    grep -E 'per conn|connected'
kill -TERM $GW; wait $GW 2>/dev/null; sleep 1
