#!/usr/bin/env python3
"""Import cycles among the gateway's modules (src/), as a reader can check.

Every `crate::<module>` path in a file of src/ is an edge from the file's
top-level module to <module> (submodules count as their parent, e.g.
src/shard/subs.rs is `shard`; `super::` stays inside its module). Prints
each cycle and exits 1 if there is one; prints the module map otherwise.

    python3 scripts/modcycles.py
"""
import pathlib
import re
import sys

src = pathlib.Path(__file__).resolve().parent.parent / "src"
edges: dict[str, set[str]] = {}
for f in sorted(src.rglob("*.rs")):
    rel = f.relative_to(src).parts
    if rel[0] in ("lib.rs", "main.rs"):
        continue
    me = rel[0].removesuffix(".rs")
    text = f.read_text()
    # Drop comments and test modules: a doc link is not a dependency.
    text = re.sub(r"//[^\n]*", "", text)
    text = text.split("#[cfg(test)]")[0]
    deps = set(re.findall(r"\bcrate::([a-z_]+)", text))
    # `use crate::{a, b::c}` groups
    for group in re.findall(r"\bcrate::\{([^}]*)\}", text):
        deps |= {p.strip().split("::")[0] for p in group.split(",") if p.strip()}
    edges.setdefault(me, set()).update(d for d in deps if d != me)

# Tarjan's strongly connected components.
index, low, stack, on, sccs = {}, {}, [], set(), []
def visit(v, counter=[0]):
    index[v] = low[v] = counter[0]; counter[0] += 1
    stack.append(v); on.add(v)
    for w in edges.get(v, ()):
        if w not in index:
            visit(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            sccs.append(sorted(comp))
for v in sorted(edges):
    if v not in index:
        visit(v)
if sccs:
    for c in sccs:
        print("import cycle among:", " ".join(c))
    sys.exit(1)
for m in sorted(edges):
    print(f"{m:10} -> {' '.join(sorted(edges[m])) or '-'}")
print("no import cycle among", len(edges), "modules")
