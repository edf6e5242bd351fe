#!/usr/bin/env bash
# Server API and hook benchmarks (docs/benchmarks.md, "Server API and hooks").
#
#   scripts/bench-api.sh publish [CONNS] [SECS]   API publish requests/s, keep-alive
#                                                 clients, messages reaching subscribers
#   scripts/bench-api.sh hook [RATE] [SECS]       the latency a publish hook adds at RATE
#                                                 publishes/s: two gateways side by side,
#                                                 one without and one with the hook
#
# env: GW (gateway binary, default target/release/edgegate), AB (bench binary,
# default target/release/api_bench), OUT (logs, default /tmp/bench-api).
# Ports on 127.0.0.1: 3808x/3708x (ws/tcp), 3908x (admin), 3918x (api), 3928x (hook).
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
GW=${GW:-$here/target/release/edgegate}
AB=${AB:-$here/target/release/api_bench}
OUT=${OUT:-/tmp/bench-api}
KEY=bench-key-0123456789abcdef
mkdir -p "$OUT"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; wait "$p" 2>/dev/null; done; }
trap cleanup EXIT

# start_gw N [ENV=VALUE...]: gateway N on ports 38080+N (ws), 37080+N (tcp), 39080+N (admin), 39180+N (api)
start_gw() {
    local n=$1; shift
    env EDGEGATE_WS__LISTEN=127.0.0.1:$((38080 + n)) EDGEGATE_TCP__LISTEN=127.0.0.1:$((37080 + n)) \
        EDGEGATE_ADMIN__LISTEN=127.0.0.1:$((39080 + n)) EDGEGATE_API__LISTEN=127.0.0.1:$((39180 + n)) \
        EDGEGATE_API__KEYS=$KEY EDGEGATE_LIMITS__CONN_MSGS_PER_S=0 RUST_LOG=warn "$@" \
        "$GW" run > "$OUT/gateway-$n.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do curl -sf 127.0.0.1:$((39080 + n))/readyz >/dev/null && return 0; sleep 0.1; done
    echo "gateway $n not ready" >&2; cat "$OUT/gateway-$n.log" >&2; exit 1
}

case ${1:-} in
  publish)
    start_gw 0
    "$AB" publish --api 127.0.0.1:39180 --key $KEY --tcp 127.0.0.1:37080 \
        --conns "${2:-32}" --rooms 16 --subs 1 --secs "${3:-10}"
    curl -s 127.0.0.1:39080/metrics | grep -E '^edgegate_api_(requests|errors)_total\{method="publish"'
    ;;
  hook)
    start_gw 0
    start_gw 1 EDGEGATE_SERVICES__HOOK__URL=http://127.0.0.1:39280/ EDGEGATE_HOOKS__PUBLISH=hook
    "$AB" hook-latency --target 127.0.0.1:37080 --target 127.0.0.1:37081 \
        --rate "${2:-5000}" --clients 20 --secs "${3:-10}" --hook-port 39280
    curl -s 127.0.0.1:39081/metrics | grep -E '^edgegate_hook_calls_total\{.*hook="publish".*outcome="(asked|allowed)"' | awk '{s+=$2} END {print "gateway 1 hook calls (asked+allowed):", s}'
    ;;
  *) echo "usage: scripts/bench-api.sh publish [CONNS] [SECS] | hook [RATE] [SECS]" >&2; exit 2 ;;
esac
