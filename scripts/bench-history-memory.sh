#!/usr/bin/env bash
# The history's real memory against its budget, with the harness's `fill`
# scenario on a fresh gateway per mix (default config: 2 shards, embedded
# backbone, history.shard_bytes 64 MiB: a 128 MiB budget in all). Mixes:
#
#   wide    one message in each of 400 000 rooms, round after round of new rooms
#   deep    1 000 messages in each of 400 rooms, round after round
#   nokeys  the wide mix published without ids (no deduplication keys)
#
# usage: scripts/bench-history-memory.sh [BIN] [MIX...]   (default: all three)
# env: LT (loadtest, default target/release/loadtest), OUT (default
#      /tmp/bench-history-memory), SHARD_BYTES (history.shard_bytes),
#      ROUNDS (default 3)
# Ports 28080 (ws) and 29090 (admin) on 127.0.0.1.
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$here/target/release/edgegate}
shift || true
mixes=("$@")
[ ${#mixes[@]} -eq 0 ] && mixes=(wide deep nokeys)
LT=${LT:-$here/target/release/loadtest}
OUT=${OUT:-/tmp/bench-history-memory}
SHARD_BYTES=${SHARD_BYTES:-67108864}
ROUNDS=${ROUNDS:-3}
mkdir -p "$OUT"
budget_mib=$(python3 -c "print(2 * $SHARD_BYTES / 1048576)")
for mix in "${mixes[@]}"; do
    case $mix in
      wide)   args=(--rooms 400000 --messages 1) ;;
      deep)   args=(--rooms 400 --messages 1000) ;;
      nokeys) args=(--rooms 400000 --messages 1 --no-ids) ;;
      *) echo "bench-history-memory: mix wide, deep or nokeys" >&2; exit 2 ;;
    esac
    env EDGEGATE_WS__LISTEN=127.0.0.1:28080 EDGEGATE_TCP__LISTEN=127.0.0.1:27000 \
        EDGEGATE_ADMIN__LISTEN=127.0.0.1:29090 EDGEGATE_LIMITS__CONN_MSGS_PER_S=1000000 \
        EDGEGATE_LIMITS__CONN_MSGS_BURST=1000000 EDGEGATE_HISTORY__SHARD_BYTES=$SHARD_BYTES \
        RUST_LOG=warn "$BIN" run > "$OUT/gateway-$mix.log" 2>&1 &
    gw=$!
    for _ in $(seq 100); do curl -sf 127.0.0.1:29090/readyz >/dev/null && break; sleep 0.1; done
    echo "== $mix"
    "$LT" fill --target 127.0.0.1:28080 --admin 127.0.0.1:29090 --gateway-pid $gw \
        --budget-mib "$budget_mib" --rounds "$ROUNDS" --quiet --json "$OUT/$mix.json" "${args[@]}" 2>&1 |
        grep -E 'fill|start|round'
    kill -TERM $gw; wait $gw 2>/dev/null; sleep 1
done
