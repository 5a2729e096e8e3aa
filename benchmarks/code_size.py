"""The largest files and functions of src/medvq, in lines (AST, nothing is imported).

    python benchmarks/code_size.py [--src DIR] [--top N]

A function's lines run from its `def` (decorators excluded) to its last statement, docstring included;
a file's lines are all its lines.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def sizes(src: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    files, functions = [], []
    for path in sorted((src / "medvq").rglob("*.py")):
        text = path.read_text()
        name = path.relative_to(src).as_posix()
        files.append((len(text.splitlines()), name))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{name}:{node.lineno} {node.name}"))
    return sorted(files, reverse=True), sorted(functions, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "src")
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args()
    files, functions = sizes(args.src)
    print("largest files (lines):")
    for n, name in files[: args.top]:
        print(f"  {n:5d}  {name}")
    print("largest functions (lines):")
    for n, name in functions[: args.top]:
        print(f"  {n:5d}  {name}")
    over = [f for f in functions if f[0] > 60]
    print(f"functions over 60 lines: {len(over)}")


if __name__ == "__main__":
    main()
