#!/usr/bin/env bash
# Side by side: two gateway builds (old vs new), the same harness binary ($LT).
# Recorded in docs/bench-notes.md, "Redesign of the middle (issue 9)".
# usage: run.sh LABEL GATEWAY_BIN SCENARIO
set -u
label=$1; bin=$2; scen=$3
LT=${LT:-/tmp/old-bin/loadtest}
mkdir -p ${OUT:-/tmp/bench}
out=${OUT:-/tmp/bench}/$label-$scen
start_gw() {  # $1 = shard count, $2 = cpu list for taskset
    EDGEGATE_WS__LISTEN=127.0.0.1:18580 EDGEGATE_TCP__LISTEN=127.0.0.1:17500 \
    EDGEGATE_ADMIN__LISTEN=127.0.0.1:19590 EDGEGATE_SHARDS__COUNT=$1 \
    EDGEGATE_LIMITS__ACCEPT_PER_S=100000 RUST_LOG=warn \
    taskset -c $2 $bin run > $out.gw.log 2>&1 &
    GW=$!
    for _ in $(seq 100); do curl -sf 127.0.0.1:19590/readyz >/dev/null && return; sleep 0.1; done
    echo "gateway not ready"; cat $out.gw.log
}
stop_gw() { kill -TERM $GW; wait $GW 2>/dev/null; sleep 1; }
case $scen in
idle)
    EDGEGATE_WS__LISTEN=127.0.0.1:18580 EDGEGATE_TCP__LISTEN=127.0.0.1:17500 \
    EDGEGATE_ADMIN__LISTEN=127.0.0.1:19590 RUST_LOG=warn $bin run > $out.gw.log 2>&1 &
    GW=$!
    for _ in $(seq 100); do curl -sf 127.0.0.1:19590/readyz >/dev/null && break; sleep 0.1; done
    $LT idle --transport ws --connections 15000 --rate 1800 --hold-secs 20 \
      --target 127.0.0.1:18580 --admin 127.0.0.1:19590 --gateway-pid $GW \
      --source-ips 127.0.0.2-127.0.0.50 --quiet --json $out.json > $out.txt 2>&1
    stop_gw ;;
fan100)
    start_gw 1 0
    taskset -c 1 $LT fanout --subscribers 100 --publishers 10 --rate 2000 --duration 10 --size 64 \
      --transport ws --encoding json --target 127.0.0.1:18580 --admin 127.0.0.1:19590 \
      --gateway-pid $GW --source-ips 127.0.0.2-127.0.0.50 --quiet --json $out.json > $out.txt 2>&1
    stop_gw ;;
fan1000-*)
    rate=${scen#fan1000-}
    start_gw 1 0
    taskset -c 1 $LT fanout --subscribers 1000 --publishers 1 --rate $rate --duration 10 \
      --transport ws --encoding json --target 127.0.0.1:18580 --admin 127.0.0.1:19590 \
      --gateway-pid $GW --source-ips 127.0.0.2-127.0.0.50 --quiet --json $out.json > $out.txt 2>&1
    stop_gw ;;
esac
echo "== $label $scen"; cat $out.txt | grep -E "per conn|RSS|latency|lost|deliveries|gateway CPU|harness CPU|disconnects|offered" 
