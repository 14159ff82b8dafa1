"""Import direction (DESIGN.md): db imports only settings; node never imports workers."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def project_imports(package: str) -> dict[str, set[str]]:
    out = {}
    for py in (REPO / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        out[str(py.relative_to(REPO))] = {n for n in names if n.split(".")[0] in {"node", "db", "workers", "plugins"}}
    return out


def test_db_imports_only_db_and_settings():
    for path, names in project_imports("db").items():
        assert all(n.startswith("db") or n == "node.settings" for n in names), (path, names)


def test_node_never_imports_workers():
    for path, names in project_imports("node").items():
        assert not any(n.startswith("workers") for n in names), (path, names)


def test_plugins_do_not_import_the_core():
    for path, names in project_imports("plugins").items():
        assert not any(n.split(".")[0] in {"node", "db", "workers"} for n in names), (path, names)
