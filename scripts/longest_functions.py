"""Print the longest functions in a package (lines from `def` to the function's last line).

    python scripts/longest_functions.py            # deltatune/, the 10 longest
    python scripts/longest_functions.py deltatune 20 --max 80   # exit 1 if any is longer than 80 lines
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def functions(root: Path) -> list[tuple[int, str]]:
    """(length in lines, "path:line name") for every function and method below `root`."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                found.append((node.end_lineno - start + 1, f"{path}:{node.lineno} {node.name}"))
    return sorted(found, reverse=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default="deltatune")
    parser.add_argument("count", nargs="?", type=int, default=10)
    parser.add_argument("--max", type=int, help="exit 1 if a function is longer than this many lines")
    args = parser.parse_args()
    found = functions(Path(args.root))
    for length, where in found[: args.count]:
        print(f"{length:5d}  {where}")
    return 1 if args.max and found and found[0][0] > args.max else 0


if __name__ == "__main__":
    sys.exit(main())
