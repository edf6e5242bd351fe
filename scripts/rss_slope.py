#!/usr/bin/env python3
"""RSS per connection as the slope of the gateway's RSS over open connections
during a `loadtest idle` ramp, from its JSON report's time series.

The before/after difference of `loadtest idle` divides by N a baseline that
jitters by about 1 MB between gateway starts; the slope over the ramp does not
depend on it. docs/bench-notes.md, "`Conn` in mimalloc's 224-byte class".

usage: scripts/rss_slope.py REPORT.json [...]   (fits 20-93 % of the ramp)
"""
import bisect
import json
import sys


def slope(path):
    r = json.load(open(path))
    n = r["params"]["connections"]
    series = {(s["panel"], s["name"]): s["points"] for s in r["timeseries"]["series"]}
    conns = series[("connections", "open (harness)")]
    rss = series[("gateway RSS (MiB)", "gateway RSS")]
    times = [p[0] for p in conns]
    pts = []
    for t, mib in rss:
        i = bisect.bisect_left(times, t)
        if i < len(conns) and 0.2 * n <= conns[i][1] <= 0.93 * n:
            pts.append((conns[i][1], mib * 1024))
    if len(pts) < 2:
        raise SystemExit(f"{path}: too few samples on the ramp")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    return sxy / sxx, len(pts)


for f in sys.argv[1:]:
    s, k = slope(f)
    print(f"{f}: {s:.3f} KiB per connection ({k} samples)")
