#!/usr/bin/env python3
"""The dependency graph of smartgate's top-level modules, from `crate::` paths in src/.

Fails (exit 1) when the graph has a cycle, printing it: the modules must form layers, from
main and server down to config, fhir and the leaf helpers, so that each can be read (and
tested) knowing only what is below it. Test code (`#[cfg(test)]` modules, tests.rs files)
is left out: a test may reach anywhere.

Usage: tools/modgraph.py [--dot]
"""

import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def module_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    if len(rel.parts) == 1:
        return rel.stem
    return rel.parts[0]


def strip_tests(text: str) -> str:
    """The file without its `#[cfg(test)] mod … { … }` blocks and comments."""
    text = re.sub(r"//[^\n]*", "", text)
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i : m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def graph():
    edges = {}
    for path in sorted(SRC.rglob("*.rs")):
        if path.name == "tests.rs" or path.name in ("main.rs", "lib.rs"):
            continue
        src = module_of(path)
        text = strip_tests(path.read_text())
        targets = set(re.findall(r"\bcrate::([a-z_0-9]+)", text))
        # `use crate::{a, b::c}` groups.
        for group in re.findall(r"\bcrate::\{([^}]*)\}", text):
            targets |= set(re.findall(r"(?:^|,)\s*([a-z_0-9]+)", group))
        # `super::` from a submodule stays within its module.
        edges.setdefault(src, set()).update(t for t in targets if t != src)
    return edges


def cycles(edges):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main():
    edges = graph()
    if "--dot" in sys.argv:
        print("digraph smartgate {")
        for a in sorted(edges):
            for b in sorted(edges[a]):
                print(f'  "{a}" -> "{b}";')
        print("}")
        return
    for a in sorted(edges):
        print(f"{a:10} -> {', '.join(sorted(edges[a])) or '-'}")
    found = cycles(edges)
    if found:
        for comp in found:
            inner = {a: sorted(edges[a] & set(comp)) for a in comp}
            print(f"CYCLE among {', '.join(comp)}: {inner}")
        sys.exit(1)
    print("no cycles")


if __name__ == "__main__":
    main()
