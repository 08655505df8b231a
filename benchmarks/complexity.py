"""Size and branch count of functions: ``python benchmarks/complexity.py FILE NAME...``.

Counts lines, branches (if, for, while, try, except, conditional expressions) and the extra
operands of boolean operators of each named function (every definition with that name).
Used for the closing note of the "every exit is a decision" work: deliver() before and after.
"""

from __future__ import annotations

import ast
import sys

BRANCHES = (ast.If, ast.For, ast.While, ast.ExceptHandler, ast.IfExp, ast.Try)


def main(argv: list[str]) -> int:
    path, names = argv[0], set(argv[1:])
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in names:
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            branches = sum(isinstance(n, BRANCHES) for n in ast.walk(node))
            boolops = sum(len(n.values) - 1 for n in ast.walk(node) if isinstance(n, ast.BoolOp))
            print(f"{node.name}:{node.lineno} lines={lines} branches={branches} boolean_operands={boolops}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
