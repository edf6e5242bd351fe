#!/usr/bin/env bash
# Fan-out on one core: the gateway pinned to CPU 0 with one shard, the
# harness pinned to CPU 1. Recorded in docs/bench-notes.md ("The harness
# outruns the gateway (issue 13)").
# usage: scripts/bench-fanout.sh LABEL GATEWAY_BIN RECEIVER K P RATE [EXTRA LOADTEST ARGS...]
#   e.g. scripts/bench-fanout.sh new target/release/edgegate lean 100 10 2000
# A GATEWAY_BIN named nats-server runs the same fan-out against its WebSocket
# listener (pinned the same way; the harness speaks --dialect nats):
#   scripts/bench-fanout.sh nats .venv/bin/nats-server lean 100 10 2000
# A GATEWAY_BIN named sockudo (cargo install sockudo) runs it on the Pusher
# dialect: subscribers over its WebSocket, publishers through its HTTP API,
# an app "app-id:app-key:app-secret" with limits raised, no Redis:
#   scripts/bench-fanout.sh sockudo ~/.cargo/bin/sockudo lean 100 10 2000
# env: LT (loadtest binary, default target/release/loadtest), OUT (default /tmp/bench),
#      SECS (publishing seconds, default 10), SIZE (payload padding bytes, default 64),
#      TLS=1: WSS (a throwaway CA and localhost certificate in $OUT/certs; the
#      lean receivers and the publishers speak TLS; edgegate only)
#      QUIC=1: QUIC instead (the same certificate; receivers and publishers
#      over QUIC on 127.0.0.1:17443/udp; edgegate only)
set -u
label=$1; bin=$2; recv=$3; k=$4; p=$5; rate=$6; shift 6
LT=${LT:-target/release/loadtest}
OUT=${OUT:-/tmp/bench}
mkdir -p "$OUT"
out=$OUT/$label-$recv-k$k-p$p-r$rate
if [ "$(basename "$bin")" = nats-server ]; then
    printf 'port: 14222\nwebsocket {\n  port: 18880\n  no_tls: true\n}\n' > "$out.nats.conf"
    taskset -c 0 "$bin" -c "$out.nats.conf" > "$out.gw.log" 2>&1 &
    GW=$!
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/18880) 2>/dev/null && break; sleep 0.1; done
    server=(--dialect nats --target 127.0.0.1:18880)
elif [ "$(basename "$bin")" = sockudo ]; then
    HOST=127.0.0.1 PORT=18680 ADAPTER_DRIVER=local CACHE_DRIVER=memory QUEUE_DRIVER=memory \
    APP_MANAGER_DRIVER=memory RATE_LIMITER_ENABLED=false RATE_LIMITER_DRIVER=memory \
    METRICS_ENABLED=false SOCKUDO_DEFAULT_APP_ID=app-id SOCKUDO_DEFAULT_APP_KEY=app-key \
    SOCKUDO_DEFAULT_APP_SECRET=app-secret SOCKUDO_DEFAULT_APP_MAX_CONNECTIONS=1000000 \
    SOCKUDO_DEFAULT_APP_MAX_BACKEND_EVENTS_PER_SECOND=100000000 \
    SOCKUDO_DEFAULT_APP_MAX_EVENT_BATCH_SIZE=10 SOCKUDO_MAX_CONNECTIONS=1000000 \
        taskset -c 0 "$bin" > "$out.gw.log" 2>&1 &
    GW=$!
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/18680) 2>/dev/null && break; sleep 0.1; done
    server=(--dialect pusher --target 127.0.0.1:18680)
else
    via=(--target 127.0.0.1:18580)
    quic=
    if [ "${TLS:-0}" = 1 ] || [ "${QUIC:-0}" = 1 ]; then
        "$(dirname "$0")/test-certs.sh" "$OUT/certs"
        export EDGEGATE_TLS__CERT_CHAIN=$OUT/certs/leaf.pem EDGEGATE_TLS__KEY=$OUT/certs/leaf.key
        if [ "${QUIC:-0}" = 1 ]; then
            quic=127.0.0.1:17443
            via=(--transport quic --target $quic --ca "$OUT/certs/ca.pem")
        else
            export EDGEGATE_WS__TLS=true
            via=(--target 127.0.0.1:18580 --tls --ca "$OUT/certs/ca.pem")
        fi
    fi
    EDGEGATE_WS__LISTEN=127.0.0.1:18580 EDGEGATE_TCP__LISTEN=127.0.0.1:17500 \
    EDGEGATE_ADMIN__LISTEN=127.0.0.1:19590 EDGEGATE_QUIC__LISTEN=$quic \
    EDGEGATE_SHARDS__COUNT=1 EDGEGATE_SHARDS__CPUS=0 RUST_LOG=warn \
        taskset -c 0 "$bin" run > "$out.gw.log" 2>&1 &
    GW=$!
    for _ in $(seq 100); do curl -sf 127.0.0.1:19590/readyz >/dev/null && break; sleep 0.1; done
    server=(--admin 127.0.0.1:19590 "${via[@]}")
fi
taskset -c 1 "$LT" fanout --subscribers "$k" --publishers "$p" --rate "$rate" \
    --duration "${SECS:-10}" --size "${SIZE:-64}" --receiver "$recv" "${server[@]}" \
    --gateway-pid $GW --source-ips 127.0.0.2-127.0.0.50 \
    --quiet --json "$out.json" "$@" > "$out.txt" 2>&1
kill -TERM $GW; wait $GW 2>/dev/null
python3 - "$out.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
l = r["latency"]
print(f'{r["params"].get("dialect", "edgegate"):8} {r["params"]["receiver"]:6} K={r["params"]["subscribers"]} P={r["params"]["publishers"]} '
      f'{r["deliveries_per_sec"]:>10.0f} deliv/s  lost {r["lost"]}  disc {r["disconnects"]}  '
      f'p50 {l["p50_ms"]:.3f} p99 {l["p99_ms"]:.3f} p99.9 {l["p999_ms"]:.3f} ms  '
      f'gw {r["gateway_cpu_pct"]:.1f}% {r["gateway_cpu_us_per_delivery"]:.3f} us/d '
      f'(user {r["gateway_cpu_user_us_per_delivery"]:.3f} sys {r["gateway_cpu_sys_us_per_delivery"]:.3f})  '
      f'harness {r["harness_cpu_pct"]:.1f}% {r["harness_cpu_us_per_delivery"]:.3f} us/d'
      + (f'  env/write {r["gateway_envelopes_per_write"]:.2f}' if r.get("gateway_envelopes_per_write") else '')
      + (f'  steady p50 {r["latency_steady"]["p50_ms"]:.3f} p99 {r["latency_steady"]["p99_ms"]:.3f} ms'
         if "latency_steady" in r else ''))
PY
sleep 1
