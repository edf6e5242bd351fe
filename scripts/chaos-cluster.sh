#!/usr/bin/env bash
# The chaos scenario on the production topology (issue 11): two gateway
# nodes with history on JetStream (replicas 3) on a three-node NATS cluster
# (scripts/nats-cluster.sh), clients spread over both gateways by the
# harness's proxy and reconnecting to either, and the faults: connections
# cut, readers stopped, SIGKILL + restart of the NATS server a gateway is
# connected to, SIGKILL + restart of a gateway, SIGTERM drain of a gateway.
# Every acked message is accounted for at every member.
#
# usage: scripts/chaos-cluster.sh CLIENTS RATE SECONDS [extra loadtest chaos options]
#   e.g. scripts/chaos-cluster.sh 1000 5000 120 --json chaos.json --svg chaos.svg
# Env: LT (loadtest binary), GWBIN (edgegate binary), KEEP=1 keeps the work dir.
# Ports: NATS 15222..15224 (routes 16222.., monitoring 19222..), gateways
# 28580/28680 (WebSocket), 29590/29690 (admin), all on loopback.
set -euo pipefail
clients=${1:?usage: chaos-cluster.sh CLIENTS RATE SECONDS [options]}
rate=${2:?usage: chaos-cluster.sh CLIENTS RATE SECONDS [options]}
secs=${3:?usage: chaos-cluster.sh CLIENTS RATE SECONDS [options]}
shift 3
root=$(cd "$(dirname "$0")/.." && pwd)
LT=${LT:-$root/target/release/loadtest}
GWBIN=${GWBIN:-$root/target/release/edgegate}
dir=$(mktemp -d /tmp/eg-chaos-cluster.XXXXXX)
cleanup() {
    "$root/scripts/nats-cluster.sh" stop "$dir/nats" >/dev/null 2>&1 || true
    [ "${KEEP:-0}" = 1 ] && echo "work dir: $dir" || rm -rf "$dir"
}
trap cleanup EXIT

"$root/scripts/nats-cluster.sh" start "$dir/nats" 15222 >/dev/null
urls=$("$root/scripts/nats-cluster.sh" urls "$dir/nats")
rooms=$(( clients / 2 ))
# A fault every restart_every seconds, taking turns: drain, kill, nats-kill
# (each at least twice in 120 s), alternating between the two gateways.
every=$(awk -v s="$secs" 'BEGIN { e = s / 8; if (e < 5) e = 5; printf "%.1f", e }')

"$LT" chaos --transport ws --clients "$clients" --rooms "$rooms" --rooms-per-client 1 \
    --rate "$(( rate * 9 / 10 ))" --dm-rate "$(( rate / 10 ))" --duration "$secs" \
    --faults cut,slow,drain,kill,nats-kill --cut-rate 5 --slow-every-secs 20 \
    --restart-every-secs "$every" --persistent-history \
    --gateway-cmd "$GWBIN run" --gateway-log "$dir/gw-a.log" \
    --gateway-env EDGEGATE_BACKBONE__KIND=nats \
    --gateway-env "EDGEGATE_BACKBONE__NATS__URLS=$urls" \
    --gateway-env EDGEGATE_BACKBONE__NATS__HISTORY=jetstream \
    --gateway-env EDGEGATE_BACKBONE__NATS__REPLICAS=3 \
    --gateway-env EDGEGATE_BACKBONE__NATS__REQUEST_TIMEOUT_MS=2000 \
    --gateway-env EDGEGATE_BACKBONE__NATS__RECONNECT_CAP_MS=1000 \
    --gateway-env EDGEGATE_DRAIN__WINDOW_MS=1000 \
    --gateway-env EDGEGATE_LIMITS__ACCEPT_PER_S=5000 \
    --gateway-env EDGEGATE_BACKBONE__NODE_ID=ga \
    --gateway-env EDGEGATE_WS__LISTEN=127.0.0.1:28580 \
    --gateway-env EDGEGATE_TCP__LISTEN= \
    --gateway-env EDGEGATE_ADMIN__LISTEN=127.0.0.1:29590 \
    --target 127.0.0.1:28580 --admin 127.0.0.1:29590 \
    --gateway2-env EDGEGATE_BACKBONE__NODE_ID=gb \
    --gateway2-env EDGEGATE_WS__LISTEN=127.0.0.1:28680 \
    --gateway2-env EDGEGATE_ADMIN__LISTEN=127.0.0.1:29690 \
    --target2 127.0.0.1:28680 --admin2 127.0.0.1:29690 \
    --nats-kill-cmd "$root/scripts/nats-cluster.sh kill $dir/nats {n}" \
    --nats-restart-cmd "$root/scripts/nats-cluster.sh restart $dir/nats {n}" \
    --nats-mon 127.0.0.1:19222 --nats-mon 127.0.0.1:19223 --nats-mon 127.0.0.1:19224 \
    "$@"
