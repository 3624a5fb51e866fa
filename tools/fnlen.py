#!/usr/bin/env python3
"""Lengths of the functions in src/ (lines from `fn` to its closing brace), longest
first. With --max N, fails listing those longer than N lines, except generated tables
(src/fhir/generated.rs) and test code.

Usage: tools/fnlen.py [--max N] [--top K]
"""

import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
# Functions that are tables (one definition per metric), not logic.
TABLES = {"src/metrics.rs:new"}
FN = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?(?:const\s+)?(?:async\s+)?(?:unsafe\s+)?fn\s+(\w+)")


def functions(path):
    lines = path.read_text().split("\n")
    in_test = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if re.match(r"\s*#\[cfg\(test\)\]", line):
            in_test = True
        m = FN.match(line)
        if m:
            # Find the opening brace (signature may span lines), then its match.
            depth, j, opened = 0, i, False
            while j < len(lines):
                code = re.sub(r'"(?:\\.|[^"\\])*"|//.*', "", lines[j])
                code = re.sub(r"'(?:\\.|[^'\\])'", "", code)
                for ch in code:
                    if ch == "{":
                        depth += 1
                        opened = True
                    elif ch == "}":
                        depth -= 1
                if opened and depth <= 0:
                    break
                if not opened and code.rstrip().endswith(";"):
                    break
                j += 1
            if opened:
                yield m.group(1), i + 1, j - i + 1, in_test
            i = j + 1 if opened else i + 1
            continue
        i += 1


def main():
    args = sys.argv[1:]
    limit = int(args[args.index("--max") + 1]) if "--max" in args else None
    top = int(args[args.index("--top") + 1]) if "--top" in args else 15
    rows = []
    for path in sorted(SRC.rglob("*.rs")):
        if path.name in ("generated.rs", "tests.rs"):
            continue
        for name, line, length, in_test in functions(path):
            if not in_test:
                rows.append((length, f"{path.relative_to(SRC.parent)}:{line}", name))
    rows.sort(reverse=True)
    for length, where, name in rows[:top]:
        print(f"{length:5}  {name:32} {where}")
    if limit is not None:
        over = [r for r in rows if r[0] > limit and f"{r[1].rsplit(':', 1)[0]}:{r[2]}" not in TABLES]
        if over:
            print(f"{len(over)} function(s) over {limit} lines")
            sys.exit(1)
        print(f"no function over {limit} lines")


if __name__ == "__main__":
    main()
