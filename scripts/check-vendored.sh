#!/usr/bin/env bash
# Checks that each vendored crate under third_party/ is exactly the crate
# published on crates.io, less the upstream files its drop list names, plus
# its patch: third_party/patches/<crate>-<version>.patch (a unified diff a
# reviewer reads) and third_party/patches/<crate>-<version>.dropped (upstream
# paths not vendored: tests, benches, examples, packaging markers). Byte for
# byte, on the files git tracks under third_party/<crate>; nothing else is
# ignored. Run by scripts/test.sh.
#
# usage: scripts/check-vendored.sh           check every vendored crate
#        scripts/check-vendored.sh --write   rewrite the patch files from the
#                                            vendored trees (after changing
#                                            them, or after an upgrade:
#                                            third_party/README.md)
#
# The published crate comes through cargo's own registry client: a throwaway
# Cargo project depends on `=<version>` and `cargo fetch`es it, and the
# `.crate` archive (checked by cargo against the index's checksum) is read
# from $CARGO_HOME/registry/cache. Needs cargo, tar, diff and patch.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
mode=check
case "${1:-}" in
    "") ;;
    --write) mode=write ;;
    *) echo "usage: $0 [--write]" >&2; exit 2 ;;
esac

# crate directory under third_party/, crates.io name, version
CRATES=(
    "glommio glommio 0.9.0"
    "quinn quinn 0.11.12"
    "quinn-proto quinn-proto 0.11.19"
)

CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# fetch NAME VERSION: prints the path of the published .crate archive.
fetch() {
    local name=$1 version=$2 found
    found=$(ls "$CARGO_HOME"/registry/cache/*/"$name-$version.crate" 2>/dev/null | head -n1 || true)
    if [ -z "$found" ]; then
        local proj=$tmp/fetch-$name
        mkdir -p "$proj/src"
        : > "$proj/src/lib.rs"
        cat > "$proj/Cargo.toml" <<EOF
[package]
name = "fetch-vendored-upstream"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
$name = { version = "=$version", default-features = false }

[workspace]
EOF
        local host
        host=$(rustc -vV | sed -n 's/^host: //p')
        (cd "$proj" && cargo fetch --quiet --target "$host") >&2
        found=$(ls "$CARGO_HOME"/registry/cache/*/"$name-$version.crate" 2>/dev/null | head -n1 || true)
    fi
    [ -n "$found" ] || { echo "check-vendored: cannot fetch $name $version from crates.io" >&2; return 1; }
    echo "$found"
}

# the upstream tree less the drop list, as directory $2 (from archive $1)
upstream_tree() {
    local archive=$1 out=$2 name=$3 version=$4 dropped=$5
    mkdir -p "$tmp/x"
    tar -xzf "$archive" -C "$tmp/x"
    mv "$tmp/x/$name-$version" "$out"
    local path
    while IFS= read -r path || [ -n "$path" ]; do
        case "$path" in ''|'#'*) continue ;; esac
        if [ ! -e "$out/$path" ]; then
            echo "check-vendored: $dropped names $path, which $name $version does not have" >&2
            return 1
        fi
        rm -rf "${out:?}/$path"
    done < "$dropped"
}

# the tracked files of third_party/$1, copied to directory $2
vendored_tree() {
    local dir=$1 out=$2 f
    mkdir -p "$out"
    while IFS= read -r -d '' f; do
        mkdir -p "$out/$(dirname "${f#third_party/$dir/}")"
        cp "$ROOT/$f" "$out/${f#third_party/$dir/}"
    done < <(git -C "$ROOT" ls-files -z "third_party/$dir")
}

failed=0
for entry in "${CRATES[@]}"; do
    read -r dir name version <<< "$entry"
    base=third_party/patches/$name-$version
    work=$tmp/$name
    mkdir -p "$work"
    archive=$(fetch "$name" "$version")
    upstream_tree "$archive" "$work/a" "$name" "$version" "$base.dropped"
    vendored_tree "$dir" "$work/b"
    if [ "$mode" = write ]; then
        # diff exits 1 when the trees differ; timestamps are left out so the
        # file only changes when the patch does.
        (cd "$work" && diff -ruN a b || [ $? -eq 1 ]) \
            | sed -E 's/^((---|\+\+\+) [^\t]+)\t.*$/\1/' > "$base.patch"
        echo "wrote $base.patch ($(grep -c '^diff ' "$base.patch") files)"
        continue
    fi
    # check: upstream + patch must be the vendored tree, file for file.
    if ! patch -d "$work/a" -p1 --fuzz=0 --no-backup-if-mismatch -s -f < "$base.patch" > "$work/patch.log" 2>&1; then
        echo "FAIL $dir: $base.patch does not apply to $name $version from crates.io:" >&2
        cat "$work/patch.log" >&2
        failed=1
        continue
    fi
    # patch leaves empty files where it deleted one: remove them.
    find "$work/a" -type f -empty -delete
    find "$work/b" -type f -empty -delete
    if ! diff -r "$work/a" "$work/b" > "$work/diff.log"; then
        echo "FAIL $dir: third_party/$dir is not $name $version + $base.patch:" >&2
        sed 's#'"$work"'/a#upstream+patch#g; s#'"$work"'/b#third_party/'"$dir"'#g' "$work/diff.log" | head -40 >&2
        echo "(after changing the vendored crate: scripts/check-vendored.sh --write)" >&2
        failed=1
        continue
    fi
    echo "ok   $dir = $name $version from crates.io + $base.patch ($(grep -c '^diff ' "$base.patch") files changed)"
done
exit $failed
