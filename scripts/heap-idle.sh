#!/usr/bin/env bash
# What an idle connection holds, by allocation site: the gateway (built with
# glibc malloc so that heaptrack sees every allocation) under heaptrack, N idle
# connections of one transport from the bundled harness, then SIGTERM; the
# heap at its peak (all N connections up, the drain just begun) is split by
# allocation site and divided by N, the close path left out
# (scripts/heap_peak.py). docs/bench-notes.md, "What an idle connection holds".
#
# usage: scripts/heap-idle.sh ws|wss|tcp|quic N OUTDIR
#   IDLE_ARGS="--rooms 20 --members 10": more arguments for `loadtest idle`
#   (each connection joined to rooms: what a subscription holds)
#   needs: heaptrack (apt), openssl, curl, and
#   CARGO_TARGET_DIR=target/sysalloc cargo build --release --bin edgegate --features system-alloc
#   cargo build --release -p edgegate-loadtest
# Ports 28080 (ws), 27000 (tcp), 27443/udp (quic), 29090 (admin) on 127.0.0.1.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
tr=${1:?transport}; n=${2:?connections}; out=${3:?outdir}
gw=${GW_BIN:-$here/target/sysalloc/release/edgegate}
lt=${LT_BIN:-$here/target/release/loadtest}
mkdir -p "$out"
"$here/scripts/test-certs.sh" "$out"
export EDGEGATE_TLS__CERT_CHAIN=$out/leaf.pem EDGEGATE_TLS__KEY=$out/leaf.key
export EDGEGATE_WS__LISTEN=127.0.0.1:28080 EDGEGATE_TCP__LISTEN=127.0.0.1:27000 EDGEGATE_ADMIN__LISTEN=127.0.0.1:29090
case $tr in
  ws)   args=(--transport ws --target 127.0.0.1:28080) ;;
  wss)  export EDGEGATE_WS__TLS=true; args=(--transport ws --tls --ca "$out/ca.pem" --target 127.0.0.1:28080) ;;
  tcp)  args=(--transport tcp --target 127.0.0.1:27000) ;;
  quic) export EDGEGATE_QUIC__LISTEN=127.0.0.1:27443; args=(--transport quic --ca "$out/ca.pem" --target 127.0.0.1:27443) ;;
  *) echo "heap-idle: transport ws, wss, tcp or quic" >&2; exit 2 ;;
esac
rm -f "$out/heap-$tr".*
heaptrack -o "$out/heap-$tr" "$gw" run > "$out/gateway-$tr.log" 2>&1 &
ht=$!
for _ in $(seq 100); do curl -sf http://127.0.0.1:29090/readyz >/dev/null && break; sleep 0.2; done
# heaptrack's own child, never another edgegate on this machine (a test
# suite's, say): only what this script started is signalled.
pid=$(pgrep -P "$ht" -x edgegate) || { echo "heap-idle: no edgegate under heaptrack ($ht)" >&2; kill "$ht"; exit 1; }
"$lt" idle "${args[@]}" --connections "$n" --rate 300 --hold-secs 6 --quiet \
    --source-ips 127.0.0.2-127.0.0.50 ${IDLE_ARGS:-} > "$out/harness-$tr.log" 2>&1 &
h=$!
sleep $(( n / 300 + 4 ))
kill -TERM "$pid"
wait "$h" || true
wait "$ht" || true
grep "connected / failed" "$out/harness-$tr.log"
heaptrack_print -f "$out/heap-$tr".zst -F "$out/peak-$tr.stacks" --flamegraph-cost-type peak > /dev/null
python3 "$here/scripts/heap_peak.py" "$out/peak-$tr.stacks" "$n"
