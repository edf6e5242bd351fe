#!/usr/bin/env bash
# The chat features' cost with the bundled harness's `chat` scenario, a
# fresh gateway (default config: 2 shards, embedded backbone) per run:
#
#   memory  USERS ROOMS MEMBERS   RSS per (room, user): presence on and
#           watched (sub with meta.presence), on and not watched, and off
#           ([presence] enabled = false), each run alternated twice
#   join    N...                  one room that N users join within 10 s,
#           every one watching its presence: members envelopes sent, their
#           names, gateway CPU while the room fills (linear in N, or not)
#   traffic USERS ROOMS MEMBERS   a chat: messages, typing, churn, for 30 s
#
# usage: scripts/bench-chat.sh memory 4000 20 10
#        scripts/bench-chat.sh join 1000 2000 5000
#        scripts/bench-chat.sh traffic 2000 5 10
# env: BIN (gateway, default target/release/edgegate), LT (loadtest,
#      default target/release/loadtest), OUT (default /tmp/bench-chat)
# Ports 28080 (ws) and 29090 (admin) on 127.0.0.1.
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$here/target/release/edgegate}
LT=${LT:-$here/target/release/loadtest}
OUT=${OUT:-/tmp/bench-chat}
mkdir -p "$OUT"
mode=${1:?memory|join|traffic}; shift

# run NAME GATEWAY_ENV... -- LOADTEST_ARGS...
run() {
    local name=$1; shift
    local envs=()
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    env EDGEGATE_WS__LISTEN=127.0.0.1:28080 EDGEGATE_TCP__LISTEN=127.0.0.1:27000 \
        EDGEGATE_ADMIN__LISTEN=127.0.0.1:29090 EDGEGATE_LIMITS__ACCEPT_PER_S=20000 \
        EDGEGATE_LIMITS__IP_CONNECTS_PER_S=100000 RUST_LOG=warn "${envs[@]}" \
        "$BIN" run > "$OUT/gateway-$name.log" 2>&1 &
    local gw=$!
    for _ in $(seq 100); do curl -sf 127.0.0.1:29090/readyz >/dev/null && break; sleep 0.1; done
    echo "== $name"
    "$LT" chat --target 127.0.0.1:28080 --admin 127.0.0.1:29090 --gateway-pid $gw \
        --source-ips 127.0.0.2-127.0.0.50 --quiet --json "$OUT/$name.json" "$@" 2>&1 |
        grep -E 'users / rooms|connect|join|members|deliveries|latency|CPU'
    kill -TERM $gw; wait $gw 2>/dev/null; sleep 1
}

case $mode in
memory)
    users=${1:?users}; rooms=${2:?rooms per user}; members=${3:?members}
    common=(--users "$users" --rooms-per-user "$rooms" --members "$members"
            --rate 0 --typing 0 --churn 0 --duration 1 --join-secs 5 --connect-rate 1000)
    for round in 1 2; do
        run "mem-watched-$round" -- "${common[@]}"
        run "mem-tracked-$round" -- "${common[@]}" --no-presence
        run "mem-off-$round" EDGEGATE_PRESENCE__ENABLED=false -- "${common[@]}" --no-presence
    done
    ;;
join)
    for n in "$@"; do
        run "join-$n" -- --users "$n" --rooms-per-user 1 --members "$n" \
            --rate 0 --typing 0 --churn 0 --duration 1 --join-secs 10 --connect-rate 1000
    done
    ;;
traffic)
    users=${1:?users}; rooms=${2:?rooms per user}; members=${3:?members}
    run "traffic-$users" -- --users "$users" --rooms-per-user "$rooms" --members "$members" \
        --rate 0.2 --typing 0.4 --churn 2 --duration 30 --join-secs 5
    ;;
*) echo "bench-chat: memory, join or traffic" >&2; exit 2 ;;
esac
