#!/usr/bin/env bash
# Runs each cargo-fuzz target of edgegate-proto for N seconds (default 30).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). libFuzzer needs nightly-only
# rustc flags (-Zsanitizer=address, sancov); on a stable toolchain
# RUSTC_BOOTSTRAP=1 unlocks them, which this script sets unless already set.
# Corpora are kept in fuzz/corpus/<target>, crashes in fuzz/artifacts/<target>.
set -euo pipefail
secs="${1:-30}"
shift || true
cd "$(dirname "$0")/.."
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(decode_json decode_binary frames ws_frames ws_extensions http sse)
fi
export RUSTC_BOOTSTRAP="${RUSTC_BOOTSTRAP:-1}"
for t in "${targets[@]}"; do
    echo "== fuzz target $t for ${secs}s"
    cargo fuzz run "$t" -- -max_total_time="$secs" -print_final_stats=1
done
