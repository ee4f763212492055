"""Data flows one way: slide -> ssl/train -> embed -> eval; ``model`` is shared; only ``cli`` sees all."""

from __future__ import annotations

import ast
from pathlib import Path

import openpluto

PKG = Path(openpluto.__file__).parent
CORE = {"config", "errors", "io", "jobs", "distributed", "progress"}
ALLOWED = {
    "slide": CORE,
    "model": CORE,
    "ssl": CORE | {"model"},
    "train": CORE | {"model", "ssl"},
    "embed": CORE | {"model", "slide"},
    "eval": CORE | {"model", "slide", "embed"},
}


def _imported_packages(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "openpluto" and len(parts) > 1:
                out.add(parts[1])
    return out


def test_no_package_imports_downstream():
    bad = []
    for pkg, allowed in ALLOWED.items():
        for path in sorted((PKG / pkg).rglob("*.py")):
            for dep in _imported_packages(path) - allowed - {pkg}:
                bad.append(f"{path.relative_to(PKG)} imports openpluto.{dep}")
    assert not bad, "\n".join(bad)
