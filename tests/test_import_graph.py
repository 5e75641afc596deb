"""The import graph of ``custom/it3d`` runs one way: read with ``ast`` (module-level imports and the
imports inside functions, relative imports resolved), nothing is imported or run.

* the component packages form no cycle (package-level graph);
* ``core`` imports no other it3d package at module level (and none at all, see below);
* the back-running imports issue 12 names stay gone.
"""
from __future__ import annotations

import ast
import os
import sys
from typing import Dict, List, NamedTuple, Set

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "custom", "it3d")
COMPONENTS = ("core", "data", "preprocess", "builders", "guidance", "prompts", "renderers", "exporters", "geometry",
              "materials", "background", "encodings")


class Edge(NamedTuple):
    src: str  # importing module, dotted ("it3d.data.single_image")
    dst: str  # imported module or package, dotted
    in_function: bool
    where: str  # file:line
    entry: bool = False  # in an entry script: a ``__main__.py`` or an ``if __name__ == "__main__":`` block


def module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def imports_of(path: str) -> List[Edge]:
    """Every ``it3d`` import in the file at ``path`` (``from . import x`` counts as importing ``pkg.x``)."""
    mod = module_name(path)
    package = mod.split(".") if path.endswith("__init__.py") else mod.split(".")[:-1]
    edges: List[Edge] = []
    where = os.path.relpath(path, os.path.dirname(os.path.dirname(ROOT)))

    def is_main_guard(node: ast.AST) -> bool:
        t = node.test if isinstance(node, ast.If) else None
        return (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == "__name__"
                and len(t.comparators) == 1 and isinstance(t.comparators[0], ast.Constant)
                and t.comparators[0].value == "__main__")

    def visit(node: ast.AST, in_function: bool, entry: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            in_entry = entry or is_main_guard(child)
            if isinstance(child, ast.Import):
                edges.extend(Edge(mod, a.name, inner, f"{where}:{child.lineno}", entry) for a in child.names
                             if a.name.split(".")[0] == "it3d")
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package[: len(package) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] == "it3d":
                    for a in child.names:  # "from ..core import cameras" imports the module it3d.core.cameras
                        sub = os.path.join(os.path.dirname(ROOT), *target.split("."), a.name)
                        is_module = os.path.isdir(sub) or os.path.isfile(sub + ".py")
                        edges.append(Edge(mod, f"{target}.{a.name}" if is_module else target, inner,
                                          f"{where}:{child.lineno}", entry))
            visit(child, inner, in_entry)

    visit(ast.parse(open(path, encoding="utf-8").read(), path), False, os.path.basename(path) == "__main__.py")
    return list(dict.fromkeys(edges))  # "from .x import a, b": one edge


def all_edges() -> List[Edge]:
    out: List[Edge] = []
    for folder, _, files in os.walk(ROOT):
        out.extend(e for f in sorted(files) if f.endswith(".py") for e in imports_of(os.path.join(folder, f)))
    return out


def package(mod: str) -> str:
    """``it3d.data.single_image`` -> ``data``; ``it3d.run`` -> ``run``; the root ``it3d`` -> ``it3d``."""
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "it3d"


def package_graph(edges: List[Edge], module_level_only: bool = False) -> Dict[str, Set[str]]:
    """Package -> the packages it imports. Entry scripts (``__main__.py``, ``if __name__ == "__main__":``
    blocks) are left out: they run only as the top of a process, like launch.py, and no import reaches them."""
    graph: Dict[str, Set[str]] = {}
    for e in edges:
        a, b = package(e.src), package(e.dst)
        if a != b and "it3d" not in (a, b) and not e.entry and not (module_level_only and e.in_function):
            graph.setdefault(a, set()).add(b)
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one package (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(set(graph) | {w for ws in graph.values() for w in ws}):
        if v not in index:
            strong(v)
    return sorted(found)


@pytest.fixture(scope="module")
def edges() -> List[Edge]:
    return all_edges()


# ----------------------------------------------------------------------------- the reader itself
def fake_tree(tmp_path, monkeypatch, files: Dict[str, str]):
    """A made-up ``it3d`` package (``{relative path: source}``) that the reader reads instead of the real one."""
    for rel, text in files.items():
        path = tmp_path / "it3d" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path / "it3d"))
    return tmp_path / "it3d"


def test_reader_resolves_relative_and_function_level_imports(tmp_path, monkeypatch):
    pkg = fake_tree(tmp_path, monkeypatch, {
        "core/cameras.py": "", "data/__init__.py": "from . import single\n",
        "data/single.py": "import os\nfrom ..core import cameras\nfrom .base import X\n"
                          "def f():\n    from ..preprocess.entry import g\n"
                          "from it3d.core.image import read_image\nimport it3d.eval.metrics\n"}) / "data"
    got = sorted((e.dst, e.in_function) for e in imports_of(str(pkg / "single.py")))
    assert got == [("it3d.core.cameras", False), ("it3d.core.image", False), ("it3d.data.base", False),
                   ("it3d.eval.metrics", False), ("it3d.preprocess.entry", True)]
    assert [e.dst for e in imports_of(str(pkg / "__init__.py"))] == ["it3d.data.single"]
    g = package_graph(imports_of(str(pkg / "single.py")))
    assert g == {"data": {"core", "eval", "preprocess"}}
    assert package_graph(imports_of(str(pkg / "single.py")), module_level_only=True) == {"data": {"core", "eval"}}


def test_reader_marks_entry_script_imports(tmp_path, monkeypatch):
    pkg = fake_tree(tmp_path, monkeypatch, {
        "batch/cli.py": "", "eval/metrics.py": "",
        "eval/runner.py": "from . import metrics\nif __name__ == '__main__':\n    from it3d.batch import cli\n",
        "eval/__main__.py": "from it3d.batch import cli\n"}) / "eval"
    got = imports_of(str(pkg / "runner.py")) + imports_of(str(pkg / "__main__.py"))
    assert sorted((e.dst, e.entry) for e in got) == [("it3d.batch.cli", True), ("it3d.batch.cli", True),
                                                     ("it3d.eval.metrics", False)]
    assert package_graph(got) == {}


def test_no_package_cycle_at_all(edges):
    """Issue 12's goal: no import cycle among all packages (runner, systems, eval, batch, app included)."""
    assert cycles(package_graph(edges)) == []


def test_cycle_finder():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}}) == []
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}) == [["a", "b"], ["c", "d"]]


# ----------------------------------------------------------------------------- the tree
def test_reader_sees_known_imports(edges):
    """The graph is the real one: a few imports known to exist are in it (so an empty graph cannot pass)."""
    have = {(e.src, e.dst) for e in edges}
    assert ("it3d.renderers.point_rasterizer", "it3d.core.cameras") in have
    assert ("it3d.data.random_views", "it3d.core.cameras") in have  # from ..core import cameras
    assert ("it3d.data.single_image", "it3d.core.image") in have
    assert ("it3d.preprocess.entry", "it3d.core.image") in have
    assert len(edges) > 200


def test_component_packages_have_no_cycle(edges):
    graph = package_graph(edges)
    sub = {a: {b for b in bs if b in COMPONENTS} for a, bs in graph.items() if a in COMPONENTS}
    assert cycles(sub) == []


def test_running_is_above_the_systems(edges):
    """it3d.runner (CLI glue, stage pipeline, stage state, text-to-image) drives the systems; no system, no
    component and no evaluation module imports it (the old run.py <-> systems/pipeline.py cycle)."""
    up = sorted({f"{e.src} -> {e.dst}" for e in edges if package(e.dst) in ("runner", "run")
                 and package(e.src) not in ("runner", "run", "app", "batch", "testing")})
    assert not up, up
    assert not [c for c in cycles(package_graph(edges)) if {"runner", "systems"} & set(c)]


def test_core_imports_no_other_package(edges):
    """core is the floor: at module level it imports no other it3d package (nor inside functions)."""
    up = [e for e in edges if package(e.src) == "core" and package(e.dst) not in ("core", "it3d")]
    assert [e for e in up if not e.in_function] == []
    assert up == []


@pytest.mark.parametrize("src, dst", [
    ("it3d.core", "it3d.testing"),  # the ${tiny:...} resolver is registered by it3d.testing
    ("it3d.systems", "it3d.eval"),  # refine's reference PSNR comes from it3d.core.metrics
    ("it3d.builders", "it3d.preprocess"),  # SamSegmenter lives in it3d.core.segment
    ("it3d.data.dreambooth_data", "it3d.preprocess"),  # class_from_caption lives in it3d.core.caption
    ("it3d.data", "it3d.preprocess"),  # datamodules load the preprocessing record (it3d.core.prepared), never run it
    ("it3d.preprocess", "it3d.data"),  # image helpers live in it3d.core.image, cameras in it3d.core.cameras
    ("it3d.renderers", "it3d.data"), ("it3d.guidance", "it3d.data"), ("it3d.builders", "it3d.data"),
    ("it3d.exporters", "it3d.data"), ("it3d.testing", "it3d.data"),
])
def test_no_back_running_import(edges, src, dst):
    def under(mod: str, prefix: str) -> bool:
        return mod == prefix or mod.startswith(prefix + ".")

    back = [e.where for e in edges if under(e.src, src) and under(e.dst, dst)]
    assert back == [], f"{src} imports {dst}: {back}"


@pytest.mark.parametrize("src", ["core", "data"])
def test_core_and_data_know_nothing_of_the_floors_above(edges, src):
    """DESIGN.md: no import runs up a floor; core and data know nothing of testing, eval, systems or runner."""
    up = [(e.where, e.dst) for e in edges
          if package(e.src) == src and package(e.dst) in ("testing", "eval", "systems", "runner", "run", "app", "batch")]
    assert up == []


def test_old_module_paths_are_gone():
    for rel in ("data/cameras.py", "data/images.py", "preprocess/sam.py", "run.py", "systems/pipeline.py",
                "systems/stage_state.py", "systems/text_to_image.py"):
        assert not os.path.exists(os.path.join(ROOT, rel)), rel


def test_tiny_resolver_still_resolves(tmp_path, monkeypatch):
    """``${tiny:...}`` (configs/tiny) still works with the resolver registered from it3d.testing."""
    from omegaconf import OmegaConf

    import it3d  # noqa: F401  (the package imports it3d.testing, which registers the resolver)
    from it3d import testing

    monkeypatch.setenv("IT3D_TINY_DIR", str(tmp_path))
    testing.tiny_builder("graph-probe")(lambda out: open(os.path.join(out, "model_index.json"), "w").write("{}"))
    try:
        cfg = OmegaConf.create({"path": "${tiny:graph-probe}"})
        assert cfg.path == os.path.join(str(tmp_path), f"graph-probe-v{testing._VERSION}")
        assert os.path.isfile(os.path.join(cfg.path, "model_index.json"))
    finally:
        testing._BUILDERS.pop("graph-probe", None)


def report() -> str:
    """The package-level cycles of the whole tree (run / runner / systems included), for the notes."""
    edges = all_edges()
    lines = [f"package cycles (all packages): {cycles(package_graph(edges))}",
             f"package cycles (module-level imports only): {cycles(package_graph(edges, True))}"]
    graph = package_graph(edges)
    lines += [f"{a} -> {', '.join(sorted(bs))}" for a, bs in sorted(graph.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
