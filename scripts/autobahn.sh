#!/usr/bin/env bash
# Runs the Autobahn|Testsuite fuzzingclient (every case, 12.* and 13.*
# permessage-deflate included) against edgegate's WebSocket echo endpoint,
# and fails unless every case's behavior is OK, NON-STRICT or INFORMATIONAL
# (UNIMPLEMENTED fails: the gateway must accept each deflate offer).  Writes a summary to target/autobahn/summary.md (never a
# tracked file); AUTOBAHN_SUMMARY=docs/autobahn.md regenerates the committed doc.
#
#   ./scripts/autobahn.sh                    start target/debug/edgegate (or $EDGEGATE_BIN) and test it
#   AUTOBAHN_URL=ws://host:port/path ./scripts/autobahn.sh    test an already running server
#
# Environment: AUTOBAHN_CASES (JSON list, default ["*"]), AUTOBAHN_EXCLUDE
# (JSON list, default []), AUTOBAHN_SUMMARY
# (output file, default target/autobahn/summary.md), AUTOBAHN_AGENT (name in the report),
# AUTOBAHN_DIR (work dir, default target/autobahn), PY2 (python 2.7 interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
AB_DIR=${AUTOBAHN_DIR:-$ROOT/target/autobahn}
PY2=${PY2:-/root/.pyenv/versions/2.7.18/bin/python}
VENV=$AB_DIR/venv-py2
REQ=$ROOT/tests/python/autobahn-py2-requirements.txt
SUMMARY=${AUTOBAHN_SUMMARY:-$AB_DIR/summary.md}
CASES=${AUTOBAHN_CASES:-'["*"]'}
EXCLUDE=${AUTOBAHN_EXCLUDE:-'[]'}
AGENT=${AUTOBAHN_AGENT:-edgegate}
PY3=python3
[ -x "$ROOT/.venv/bin/python" ] && PY3=$ROOT/.venv/bin/python
mkdir -p "$AB_DIR" "$(dirname "$SUMMARY")"

# ---------------------------------------------------------------- wstest (Python 2 virtualenv)
want=$(sha256sum "$REQ" | cut -d' ' -f1)
if [ ! -x "$VENV/bin/wstest" ] || [ "$(cat "$VENV/.req.sha256" 2>/dev/null || true)" != "$want" ]; then
    [ -x "$PY2" ] || { echo "autobahn: Python 2.7 not found at $PY2 (set PY2)" >&2; exit 1; }
    if ! "$PY2" -m virtualenv --version >/dev/null 2>&1; then
        echo "==> installing virtualenv for Python 2 (user site)"
        "$PY2" -m pip install -q --user 'virtualenv==20.15.1'
    fi
    rm -rf "$VENV"
    echo "==> creating $VENV"
    "$PY2" -m virtualenv -q "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQ" 2>&1 | grep -v DEPRECATION || true
    "$VENV/bin/wstest" -a >/dev/null
    echo "$want" > "$VENV/.req.sha256"
fi
WSTEST_VERSION=$("$VENV/bin/wstest" -a 2>/dev/null | tr '\n' ' ')

# ---------------------------------------------------------------- server under test
GW_PID=""
cleanup() {
    if [ -n "$GW_PID" ] && kill -0 "$GW_PID" 2>/dev/null; then
        kill -TERM "$GW_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$GW_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$GW_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

free_port() { "$PY3" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

if [ -n "${AUTOBAHN_URL:-}" ]; then
    URL=$AUTOBAHN_URL
    SERVER_DESC="external server at $URL"
else
    BIN=${EDGEGATE_BIN:-$ROOT/target/debug/edgegate}
    [ -x "$BIN" ] || { echo "autobahn: $BIN not built (cargo build)" >&2; exit 1; }
    WS_PORT=$(free_port); TCP_PORT=$(free_port); ADMIN_PORT=$(free_port)
    URL="ws://127.0.0.1:$WS_PORT/echo"
    LOG=$AB_DIR/edgegate.stderr
    # 9.* sends messages up to 16 MiB: allow them on the echo endpoint
    EDGEGATE_WS__LISTEN=127.0.0.1:$WS_PORT EDGEGATE_TCP__LISTEN=127.0.0.1:$TCP_PORT \
    EDGEGATE_ADMIN__LISTEN=127.0.0.1:$ADMIN_PORT EDGEGATE_QUIC__LISTEN= \
    EDGEGATE_WS__ECHO_PATH=/echo EDGEGATE_SHARDS__COUNT=2 \
    EDGEGATE_LIMITS__MAX_FRAME_BYTES=16777216 EDGEGATE_LIMITS__OUTBOUND_QUEUE_BYTES=67108864 \
        "$BIN" run 2>"$LOG" >/dev/null &
    GW_PID=$!
    ready=0
    for _ in $(seq 1 300); do
        if ! kill -0 "$GW_PID" 2>/dev/null; then echo "autobahn: edgegate exited:" >&2; tail -20 "$LOG" >&2; exit 1; fi
        if "$PY3" -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:$ADMIN_PORT/readyz',timeout=1).status==200 else 1)" 2>/dev/null; then ready=1; break; fi
        sleep 0.1
    done
    [ "$ready" = 1 ] || { echo "autobahn: edgegate not ready" >&2; tail -20 "$LOG" >&2; exit 1; }
    SERVER_DESC="$("$BIN" --version 2>/dev/null || echo edgegate) (${BIN#"$ROOT"/}), shards=2, max_frame=16 MiB"
fi

# ---------------------------------------------------------------- run
# wstest is one Python 2 process and the bottleneck (the gateway idles at
# ~20 % of a core): the default run is split in two jobs of about equal
# length (13.2-13.7, and everything else), run at once against the same
# gateway, and their reports merged.
REPORTS=$AB_DIR/reports
rm -rf "$REPORTS" "$AB_DIR"/reports-*
SPLIT='["13.2.*", "13.3.*", "13.4.*", "13.5.*", "13.6.*", "13.7.*"]'
if [ "$CASES" = '["*"]' ] && [ "${AUTOBAHN_JOBS:-2}" = 2 ]; then
    JOBS=("$CASES|$("$PY3" -c 'import json,sys; print(json.dumps(json.loads(sys.argv[1]) + json.loads(sys.argv[2])))' "$EXCLUDE" "$SPLIT")"
          "$SPLIT|$EXCLUDE")
else
    JOBS=("$CASES|$EXCLUDE")
fi
echo "==> wstest fuzzingclient against $URL (cases $CASES, excluding $EXCLUDE; ${#JOBS[@]} job(s))"
t0=$(date +%s)
pids=()
for j in "${!JOBS[@]}"; do
    cat > "$AB_DIR/fuzzingclient-$j.json" <<JSON
{
  "outdir": "$AB_DIR/reports-$j",
  "servers": [{"agent": "$AGENT", "url": "$URL"}],
  "cases": ${JOBS[$j]%%|*},
  "exclude-cases": ${JOBS[$j]#*|},
  "exclude-agent-cases": {}
}
JSON
    ( cd "$AB_DIR" && timeout 1500 "$VENV/bin/wstest" -m fuzzingclient -s "fuzzingclient-$j.json" ) > "$AB_DIR/wstest-$j.log" 2>&1 &
    pids+=($!)
done
for j in "${!pids[@]}"; do
    wait "${pids[$j]}" || {
        echo "autobahn: wstest job $j failed (rc $?); tail of $AB_DIR/wstest-$j.log:" >&2; tail -20 "$AB_DIR/wstest-$j.log" >&2; exit 1; }
done
secs=$(( $(date +%s) - t0 ))
mkdir -p "$REPORTS"
"$PY3" - "$REPORTS/index.json" "$AB_DIR"/reports-*/index.json <<'PY'
import json, sys
merged = {}
for f in sys.argv[2:]:
    for agent, cases in json.load(open(f)).items():
        merged.setdefault(agent, {}).update(cases)
json.dump(merged, open(sys.argv[1], "w"))
PY
if [ -n "$GW_PID" ] && ! kill -0 "$GW_PID" 2>/dev/null; then
    echo "autobahn: edgegate died during the run" >&2; tail -20 "$AB_DIR/edgegate.stderr" >&2; exit 1
fi

# ---------------------------------------------------------------- verdict + summary
"$PY3" - "$REPORTS/index.json" "$AGENT" "$SUMMARY" "$secs" "$WSTEST_VERSION" "$SERVER_DESC" "$URL" <<'PY'
import collections, datetime, json, sys
index_path, agent, summary, secs, wstest_version, server, url = sys.argv[1:]
index = json.load(open(index_path))
cases = index[agent]
ALLOWED = {"OK", "NON-STRICT", "INFORMATIONAL"}

def key(c):
    return [int(x) for x in c.split(".")]

by_beh = collections.Counter(v["behavior"] for v in cases.values())
by_close = collections.Counter(v["behaviorClose"] for v in cases.values())
groups = collections.defaultdict(collections.Counter)
for cid, v in cases.items():
    groups[cid.split(".")[0]][v["behavior"]] += 1
bad = sorted((c for c, v in cases.items() if v["behavior"] not in ALLOWED), key=key)
behs = sorted(by_beh)
lines = [
    "# Autobahn|Testsuite results",
    "",
    "Generated by `scripts/autobahn.sh` (fuzzingclient, every case, 12.* and 13.*",
    "permessage-deflate included). Pass = every case's behavior is OK,",
    "NON-STRICT or INFORMATIONAL.",
    "",
    f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
    f"- server: {server}, endpoint `{url}`",
    f"- test suite: {wstest_version.strip()} (Python 2.7)",
    f"- cases: {len(cases)}, run time: {secs} s",
    f"- verdict: **{'PASS' if not bad else 'FAIL'}**",
    "",
    "## Behavior",
    "",
    "| behavior | cases |", "|---|---|",
] + [f"| {b} | {n} |" for b, n in sorted(by_beh.items())] + [
    "", "## Close behavior", "", "| behaviorClose | cases |", "|---|---|",
] + [f"| {b} | {n} |" for b, n in sorted(by_close.items())] + [
    "", "## Per case group", "",
    "| group | " + " | ".join(behs) + " |",
    "|---|" + "---|" * len(behs),
] + [f"| {g} | " + " | ".join(str(groups[g].get(b, 0)) for b in behs) + " |"
     for g in sorted(groups, key=int)]
accepted = sorted((c for c, v in cases.items() if v["behavior"] in ALLOWED - {"OK"}), key=key)
if accepted:
    lines += ["", "## Accepted cases that are not OK", "", "| case | behavior | close | remote close code |", "|---|---|---|---|"]
    lines += [f"| {c} | {cases[c]['behavior']} | {cases[c]['behaviorClose']} | {cases[c].get('remoteCloseCode')} |" for c in accepted]
if bad:
    lines += ["", "## Failing cases", "", "| case | behavior | close | remote close code |", "|---|---|---|---|"]
    lines += [f"| {c} | {cases[c]['behavior']} | {cases[c]['behaviorClose']} | {cases[c].get('remoteCloseCode')} |" for c in bad]
open(summary, "w").write("\n".join(lines) + "\n")
print("\n".join(lines[13:]))
if bad:
    print(f"autobahn: {len(bad)} case(s) failed: {' '.join(bad[:40])}", file=sys.stderr)
    sys.exit(1)
print(f"autobahn: all {len(cases)} cases OK/NON-STRICT/INFORMATIONAL in {secs} s; summary in {summary}")
PY
