#!/usr/bin/env bash
# Idle memory per transport and fan-out, two gateway builds side by side in
# one session (rows alternated), nats-server's WebSocket listener beside them
# for the fan-out rows. The current figures are in docs/bench-notes.md; the
# run that introduced this script (then named bench-issue13.sh) is in
# docs/bench-notes.md, "Issue 13 in one session".
# usage: scripts/bench-compare.sh BEFORE_BIN AFTER_BIN [NATS_SERVER_BIN]
#   e.g. git worktree add /tmp/before d1b6b9b && (cd /tmp/before &&
#        CARGO_TARGET_DIR=/tmp/before-target cargo build --release -p edgegate)
#        scripts/bench-compare.sh /tmp/before-target/release/edgegate target/release/edgegate .venv/bin/nats-server
# env: LT (loadtest binary), OUT (default /tmp/bench-compare). About 30 minutes.
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
B=${1:?before}; A=${2:?after}; N=${3:-$here/.venv/bin/nats-server}
export LT=${LT:-$here/target/release/loadtest}
OUT=${OUT:-/tmp/bench-compare}
mkdir -p "$OUT"; log=$OUT/results.txt
say() { echo "$(date -u +%H:%M:%S) $*" | tee -a "$log"; }
idle_ws() {   # goal 2: 15 000 idle WebSockets, RSS per connection and the ramp's slope
    OUT=$OUT/idle "$here/scripts/bench-redesign.sh" "$1" "$2" idle | grep 'per conn' | sed "s/^/$1 ws 15000: /" | tee -a "$log"
    python3 "$here/scripts/rss_slope.py" "$OUT/idle/$1-idle.json" | tail -1 | sed "s/^/$1 slope: /" | tee -a "$log"
}
idle() { OUT=$OUT/idle "$here/scripts/bench-idle.sh" "$2" "$3" "$4" | sed "s/^/$1 $2 $3: /" | tee -a "$log"; }
fan() { OUT=$OUT/fan "$here/scripts/bench-fanout.sh" "$1" "$2" "$3" "$4" "$5" "$6" | sed "s/^/$1 /" | tee -a "$log"; }
say "start, load $(cut -d' ' -f1-3 /proc/loadavg)"
for i in 1 2; do idle_ws before$i "$B"; idle_ws after$i "$A"; done                  # goal 2
for i in 1 2; do idle before$i wss 5000 "$B"; idle after$i wss 5000 "$A"; done      # goal 2
for i in 1 2; do idle before$i quic 5000 "$B"; idle after$i quic 5000 "$A"; done    # goal 1
for i in 1 2 3; do fan b200k$i "$B" lean 100 10 2000; fan a200k$i "$A" lean 100 10 2000; done   # goal 3
for i in 1 2; do fan n200k$i "$N" lean 100 10 2000; done
for i in 1 2 3; do fan b2m$i "$B" lean 100 10 20000; fan a2m$i "$A" lean 100 10 20000; done    # goals 3, 5
for i in 1 2; do fan n2m$i "$N" lean 100 10 20000; done
for r in 1000 3000 6000; do                                                         # goal 4
    fan bk1000r$r "$B" lean 1000 1 $r; fan ak1000r$r "$A" lean 1000 1 $r
done
fan ak1000r7000 "$A" lean 1000 1 7000
for r in 1000 1500 2000 2200 2500; do fan nk1000r$r "$N" lean 1000 1 $r; done
for i in 1 2; do fan a2mclient$i "$A" client 100 10 20000; done                    # goal 5: the old receivers
say "done, load $(cut -d' ' -f1-3 /proc/loadavg)"
