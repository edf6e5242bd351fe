#!/usr/bin/env bash
# systemd-analyze verify on systemd/edgegate.service.
#
# verify checks that ExecStart's binary exists, and the unit names its
# installed path (/usr/local/bin/edgegate). When nothing is installed there,
# the freshly built binary is linked in for the check and the link removed
# afterwards (never replacing a real installation).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${EDGEGATE_BIN:-$PWD/target/debug/edgegate}
TARGET=/usr/local/bin/edgegate
linked=0
if [ ! -e "$TARGET" ]; then
    ln -s "$BIN" "$TARGET"
    linked=1
fi
trap '[ "$linked" = 1 ] && rm -f "$TARGET"' EXIT
systemd-analyze verify systemd/edgegate.service
echo "systemd-analyze verify: systemd/edgegate.service OK"
