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


def test_plugin_contract_imports_nothing_from_the_project_nor_dicom_writers():
    imports = project_imports("plugins")
    assert imports["plugins/base.py"] == set()
    for py in (REPO / "plugins").rglob("*.py"):
        text = py.read_text()
        for forbidden in ("import pynetdicom", "import highdicom", "from pynetdicom", "from highdicom"):
            assert forbidden not in text, (py, forbidden)
    for name in ("base.py", "registry.py"):  # manifests are read by the node without loading models
        assert "import torch" not in (REPO / "plugins" / name).read_text()


def test_manifests_import_without_torch():
    import subprocess
    import sys

    code = "import sys; import plugins.registry as r; r.discover(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)
