"""Import direction (DESIGN.md, README "Layout"), checked on the source with `ast`:

    entry points  node.cli, node.service, node.api, node.demo, workers
         |
    steps         node.ingest, node.route, node.pipeline, node.dispatch, node.queueing (never each other)
         |
    shared        node.dicom, node.imaging, node.results (no db, SQLAlchemy or Celery)
         |
    foundation    node (version), node.settings, node.logs, node.metrics, node.files, node.process
         |
    db, plugins   db imports only db and node.settings; plugins import nothing of the core

No import circles; node never names a plugin package; only node.queueing and workers import Celery.
`python tests/test_architecture.py` prints the module graph's size (modules, floors, arrows) per package.
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("node", "db", "workers", "plugins")

ENTRY = ("node.cli", "node.service", "node.api", "node.demo", "node.ups.performer", "workers")
STEPS = ("node.ingest", "node.route", "node.pipeline", "node.dispatch", "node.queueing", "node.monitor")
WORKLIST = ("node.ups",)  # the UPS worklist (provider): the receivers and the API both serve it
SHARED = ("node.dicom", "node.imaging", "node.results")
FOUNDATION = ("node", "node.settings", "node.logs", "node.metrics", "node.files", "node.process")


def module_name(py: Path) -> str:
    parts = list(py.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(py): py for pkg in PACKAGES for py in sorted((REPO / pkg).rglob("*.py"))
            if "migrations" not in py.parts}


@cache
def raw_imports(name: str) -> frozenset[str]:
    """Every module name imported anywhere in the module (top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(modules()[name].read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{a.name}" for a in node.names} & modules().keys()
            names |= submodules  # `from node import metrics` imports node.metrics
            if len(submodules) < len(node.names):
                names.add(node.module)
    return frozenset(names)


@cache
def imports(name: str) -> frozenset[str]:
    """The project modules `name` imports (each import resolved to the longest known module)."""
    out = set()
    for imported in raw_imports(name):
        while imported and imported not in modules():
            imported = imported.rpartition(".")[0]
        if imported and imported != name:
            out.add(imported)
    return frozenset(out)


def within(name: str, groups: tuple[str, ...]) -> bool:
    return any(name == g or name.startswith(g + ".") for g in groups if g != "node") or (
        "node" in groups and name == "node")


def layer(name: str) -> str:
    for label, groups in (("entry", ENTRY), ("step", STEPS), ("worklist", WORKLIST), ("shared", SHARED),
                          ("foundation", FOUNDATION)):
        if within(name, groups):
            return label
    return name.split(".")[0]


def step_of(name: str) -> str:
    return next(g for g in STEPS if within(name, (g,)))


def plugin_packages() -> set[str]:
    return {f"plugins.{d.name}" for d in (REPO / "plugins").iterdir() if (d / "__init__.py").is_file()}


def graph_summary(package: str) -> tuple[int, int, int]:
    """(modules, floors, arrows) of the import graph inside `package`: a floor is a step of the longest
    chain of imports; an arrow is one module importing another."""
    inside = {m for m in modules() if m == package or m.startswith(package + ".")}
    arrows = {(a, b) for a in inside for b in imports(a) if b in inside}
    floor: dict[str, int] = {}

    def height(m: str, seen: tuple[str, ...] = ()) -> int:
        if m not in floor:
            below = [b for a, b in arrows if a == m and b not in seen]
            floor[m] = 1 + max((height(b, (*seen, m)) for b in below), default=0)
        return floor[m]

    return len(inside), max(height(m) for m in inside), len(arrows)


def cycles() -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in imports(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for m in sorted(modules()):
        if m not in index:
            visit(m)
    return out


def violations() -> list[str]:
    out = []
    named_plugins = plugin_packages()
    for m in sorted(modules()):
        top, where = m.split(".")[0], layer(m)
        for dep in sorted(imports(m)):
            dep_layer = layer(dep)
            if top == "db" and not (dep.startswith("db") or dep == "node.settings"):
                out.append(f"{m} -> {dep}: db imports only db and node.settings")
            if top == "plugins" and dep.split(".")[0] in {"node", "db", "workers"}:
                out.append(f"{m} -> {dep}: plugins import nothing of the core")
            if top == "node" and dep.startswith("workers"):
                out.append(f"{m} -> {dep}: node never imports workers (it enqueues by task name)")
            if top in {"node", "workers"} and any(dep == p or dep.startswith(p + ".") for p in named_plugins):
                out.append(f"{m} -> {dep}: core code never names a plugin")
            if where == "step" and dep_layer in {"entry"}:
                out.append(f"{m} -> {dep}: a step never imports an entry point")
            if where == "step" and dep_layer == "step" and step_of(dep) != step_of(m):
                out.append(f"{m} -> {dep}: steps do not import each other")
            if where == "worklist" and dep_layer in {"entry", "step"}:
                out.append(f"{m} -> {dep}: the worklist imports no step or entry point")
            if where == "shared" and dep_layer in {"entry", "step", "db"}:
                out.append(f"{m} -> {dep}: shared code imports no step, entry point or db")
            if where == "foundation" and dep_layer in {"entry", "step", "shared"}:
                out.append(f"{m} -> {dep}: the foundation imports only itself, db and plugins")
        third_party = {n.split(".")[0] for n in raw_imports(m)}
        if where == "shared" and third_party & {"sqlalchemy", "celery", "kombu"}:
            out.append(f"{m}: shared code imports {sorted(third_party & {'sqlalchemy', 'celery', 'kombu'})}")
        if "celery" in third_party and not (m.startswith("node.queueing") or m.startswith("workers")):
            out.append(f"{m}: only node.queueing and workers import Celery")
    return out


def test_every_module_sits_on_a_known_floor():
    unknown = [m for m in modules() if m.startswith("node") and layer(m) == "node" and m != "node"]
    assert not unknown, f"add these to a layer in tests/test_architecture.py and README Layout: {unknown}"


def test_import_direction():
    assert violations() == []


def test_no_import_circles():
    assert cycles() == []


def test_plugin_contract_imports_nothing_from_the_project_nor_dicom_writers():
    assert imports("plugins.base") == frozenset()
    for py in (REPO / "plugins").rglob("*.py"):
        text = py.read_text()
        for forbidden in ("import pynetdicom", "import highdicom", "from pynetdicom", "from highdicom"):
            assert forbidden not in text, (py, forbidden)
    for name in ("base.py", "registry.py"):  # manifests are read by the node without loading models
        assert "import torch" not in (REPO / "plugins" / name).read_text()


def test_manifests_import_without_torch():
    import subprocess

    code = "import sys; import plugins.registry as r; r.discover(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_the_checks_can_fail(monkeypatch):
    """The rules above see a forbidden arrow and a circle when one is there."""
    real = imports.__wrapped__

    def patched(name: str) -> frozenset[str]:
        extra = {"node.imaging": {"node.route.router"}, "node.route.router": {"node.imaging"}}.get(name, set())
        return real(name) | extra

    monkeypatch.setattr(sys.modules[__name__], "imports", patched)
    assert any("node.imaging -> node.route.router" in v for v in violations())
    assert any({"node.imaging", "node.route.router"} <= set(c) for c in cycles())


if __name__ == "__main__":
    for package in ("node", "db", "workers", "plugins"):
        count, floors, arrows = graph_summary(package)
        print(f"{package:8} {count:3} modules  {floors:2} floors  {arrows:3} arrows")
    units = {m: ".".join(m.split(".")[:2]) for m in modules() if m.startswith("node")}  # node.<package or module>
    between = {(units[a], units[b]) for a in units for b in imports(a) if b in units and units[a] != units[b]}
    print(f"node/ as {len(set(units.values()))} packages and top-level modules: {len(between)} arrows between them")
    for unit in sorted(set(units.values())):
        print(f"  {unit:15} -> {', '.join(sorted(b for a, b in between if a == unit)) or '-'}")
    print(f"circles: {cycles() or 'none'}")
    for v in violations():
        print("violation:", v)
