"""The package's import graph (read from the source, nothing imported): no circles, every layer imports only
downward (the order is in benchmarks/import_graph.py and docs/architecture.md)."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "benchmarks" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["import_graph"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_no_import_circles_and_no_upward_imports():
    tool = _tool()
    graph = tool.build_graph(ROOT / "src")
    assert len(graph.modules) > 50 and graph.edges  # the whole package was read
    result = tool.check(graph, lazy=True)  # imports inside functions count too
    upward = [f"{e.source}:{e.line} -> {e.target}" for e in result.upward]
    assert result.module_cycles == [], result.module_cycles
    assert result.layer_cycles == [], result.layer_cycles
    assert upward == [], upward


def test_the_check_finds_a_circle_and_an_upward_import(tmp_path):
    tool = _tool()
    pkg = tmp_path / "medvq"
    (pkg / "data").mkdir(parents=True)
    (pkg / "engine").mkdir()
    for f in ("__init__.py", "data/__init__.py", "engine/__init__.py"):
        (pkg / f).write_text("")
    (pkg / "data" / "a.py").write_text("from medvq.data import b\n")
    (pkg / "data" / "b.py").write_text("def f():\n    from medvq.data.a import x\n    from medvq.engine.run import y\n")
    (pkg / "engine" / "run.py").write_text("y = 1\n")
    graph = tool.build_graph(tmp_path)
    eager, lazy = tool.check(graph, lazy=False), tool.check(graph, lazy=True)
    assert eager.clean
    assert lazy.module_cycles == [["medvq.data.a", "medvq.data.b"]]
    assert lazy.layer_cycles == []
    assert [(e.source, e.target, e.lazy) for e in lazy.upward] == [("medvq.data.b", "medvq.engine.run", True)]
