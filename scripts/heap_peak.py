#!/usr/bin/env python3
"""Splits heaptrack's peak-heap stacks (heaptrack_print -F ... --flamegraph-cost-type
peak) by allocation site (the innermost frame of edgegate, glommio, quinn,
rustls, ring or tokio) and divides by the connection count. Stacks through the
close path are left out: scripts/heap-idle.sh takes the peak at the start of
the drain, when each closing connection has just boxed its close state.
Sites that are node-wide (the shards' channels, rings, endpoints) show up
divided by N too: read them as fixed cost, not per connection.

usage: heap_peak.py STACKS N [ROWS]"""
import collections
import re
import sys

SITE = re.compile(r"quinn|rustls|edgegate|glommio|ring::|tokio|slab")
CLOSE = re.compile(r"transport::finish|Connection::close|drain|shutdown|::bye")


def clean(frame: str) -> str:
    frame = re.sub(r"::h[0-9a-f]{16}", "", frame)
    frame = re.sub(r" \(.*\)$", "", frame)
    for a, b in (("_$u7b$$u7b$closure$u7d$$u7d$", "{closure}"), ("$LT$", "<"), ("$GT$", ">"),
                 ("$u20$", " "), ("$C$", ","), ("..", "::")):
        frame = frame.replace(a, b)
    return frame


def main() -> None:
    path, n = sys.argv[1], int(sys.argv[2])
    rows = int(sys.argv[3]) if len(sys.argv) > 3 else 25
    sites: collections.Counter = collections.Counter()
    closing = 0
    for line in open(path, encoding="utf-8", errors="replace"):
        stack, _, cost = line.rstrip().rpartition(" ")
        if not cost.isdigit() or int(cost) == 0:
            continue
        frames = [clean(f) for f in stack.strip(";").split(";") if f]
        if any(CLOSE.search(f) for f in frames):
            closing += int(cost)
            continue
        site = next((f for f in reversed(frames)
                     if SITE.search(f) and not f.startswith(("alloc::", "core::", "std::"))), "?")
        sites[site] += int(cost)
    print(f"heap at the peak, per connection (N = {n}); close path left out: {closing / n:.0f} B")
    for site, cost in sites.most_common(rows):
        if cost / n >= 20:
            print(f"{cost / n:8.0f} B  {site[:150]}")


if __name__ == "__main__":
    main()
