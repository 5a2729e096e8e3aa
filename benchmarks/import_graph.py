"""The import graph of src/medvq, read from the source (AST, nothing is imported).

Prints the import circles (strongly connected components, Tarjan) between modules and between layers, and
every import that points upward against the layer order below. Imports inside functions (lazy imports)
are counted as well, but reported apart: a lazy import hides a circle from Python, not from the design.

    python benchmarks/import_graph.py            # the report; exit status 1 when there is a circle or an upward import
    python benchmarks/import_graph.py --src DIR  # another checkout's src/

The layer of a module is the first entry of LAYERS whose prefix it starts with; docs/architecture.md
explains the order.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "medvq"

# Lowest first: a module may import its own layer and the layers before it, never a later one.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("medvq.errors", "medvq.io", "medvq.progress", "medvq.version")),
    ("data", ("medvq.data",)),
    ("maps", ("medvq.maps",)),
    ("models", ("medvq.models",)),
    ("config", ("medvq.config",)),
    ("scoring", ("medvq.scoring",)),
    ("report", ("medvq.report",)),
    ("engine", ("medvq.engine", "medvq.detector")),
    ("evaluation", ("medvq.evaluation",)),
    ("apps", ("medvq.inference", "medvq.explain", "medvq.export", "medvq.onnx_runtime", "medvq.sampling", "medvq.volume_outputs")),
    ("cli", ("medvq.cli", "medvq.demo", "medvq")),
]
LAYER_NAMES = [name for name, _ in LAYERS]


def layer_of(module: str) -> str:
    for name, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes if p != PACKAGE):
            return name
    if module == PACKAGE:
        return LAYERS[-1][0]
    raise ValueError(f"{module}: no layer in LAYERS; add its prefix there (benchmarks/import_graph.py)")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    lazy: bool  # inside a function body


@dataclass
class Graph:
    modules: set[str] = field(default_factory=set)
    edges: list[Edge] = field(default_factory=list)


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool, modules: set[str]) -> list[str]:
    """The medvq modules one ``from X import a, b`` names: X itself, or X.a where a is a submodule."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not (target == PACKAGE or target.startswith(PACKAGE + ".")):
        return []
    found = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        found.append(sub if sub in modules else target)
    return found


def _function_lines(tree: ast.AST) -> set[int]:
    """Line numbers of import statements that sit inside a function (or method) body."""
    lazy: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    lazy.add(id(inner))
    return lazy


def _type_checking_imports(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    skip.add(id(inner))
    return skip


def build_graph(src: Path) -> Graph:
    files = sorted((src / PACKAGE).rglob("*.py"))
    graph = Graph(modules={module_name(f, src) for f in files})
    for f in files:
        module = module_name(f, src)
        tree = ast.parse(f.read_text(), filename=str(f))
        lazy = _function_lines(tree)
        typing_only = _type_checking_imports(tree)  # annotations only: no import at run time
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name == PACKAGE or a.name.startswith(PACKAGE + ".")]
            elif isinstance(node, ast.ImportFrom):
                targets = _resolve(node, module, f.name == "__init__.py", graph.modules)
            else:
                continue
            for target in dict.fromkeys(targets):  # one edge per statement and module
                while target not in graph.modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target != module:
                    graph.edges.append(Edge(module, target, node.lineno, id(node) in lazy))
    return graph


def strongly_connected(nodes: set[str], edges: set[tuple[str, str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); only the components with more than one node, each sorted."""
    succ: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in sorted(edges):
        succ[a].append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            for j in range(i, len(succ[node])):
                nxt = succ[node][j]
                if nxt not in index:
                    work.append((node, j + 1))
                    work.append((nxt, 0))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
    return sorted(found)


@dataclass
class Check:
    module_cycles: list[list[str]]
    layer_cycles: list[list[str]]
    upward: list[Edge]

    @property
    def clean(self) -> bool:
        return not (self.module_cycles or self.layer_cycles or self.upward)


def check(graph: Graph, lazy: bool) -> Check:
    """Circles and upward imports among the module-level imports (lazy=False) or among all of them (lazy=True)."""
    edges = [e for e in graph.edges if lazy or not e.lazy]
    module_edges = {(e.source, e.target) for e in edges}
    layer_edges = {(layer_of(e.source), layer_of(e.target)) for e in edges} - {(n, n) for n in LAYER_NAMES}
    rank = {name: i for i, name in enumerate(LAYER_NAMES)}
    upward = [e for e in edges if rank[layer_of(e.target)] > rank[layer_of(e.source)]]
    return Check(
        module_cycles=strongly_connected(graph.modules, module_edges),
        layer_cycles=strongly_connected(set(LAYER_NAMES), layer_edges),
        upward=sorted(upward, key=lambda e: (e.source, e.line)),
    )


def report(graph: Graph) -> bool:
    clean = True
    module_level = check(graph, lazy=False)
    everything = check(graph, lazy=True)
    lazy_edges = sum(e.lazy for e in graph.edges)
    print(f"{len(graph.modules)} modules, {len(graph.edges)} imports of medvq modules ({lazy_edges} inside functions)")
    print("layers, lowest first: " + " -> ".join(LAYER_NAMES))
    for title, result in (("module-level imports", module_level), ("all imports, functions' included", everything)):
        print(f"\n== {title}")
        print(f"module circles: {len(result.module_cycles)}")
        for cycle in result.module_cycles:
            print("  " + " <-> ".join(cycle))
        print(f"layer circles: {len(result.layer_cycles)}")
        for cycle in result.layer_cycles:
            print("  " + " <-> ".join(cycle))
        print(f"upward imports: {len(result.upward)}")
        for e in result.upward:
            where = " (in a function)" if e.lazy else ""
            print(f"  {e.source}:{e.line} [{layer_of(e.source)}] -> {e.target} [{layer_of(e.target)}]{where}")
        clean = clean and result.clean
    return clean


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "src")
    args = parser.parse_args()
    return 0 if report(build_graph(args.src)) else 1


if __name__ == "__main__":
    sys.exit(main())
