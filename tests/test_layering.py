"""The import layering of DESIGN.md §1, checked from the source (ast)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "msflow_fast"

# layer -> the package-internal prefixes it must never import
FORBIDDEN = {
    "kernels": ("msflow_fast.ops", "msflow_fast.nn", "msflow_fast.model", "msflow_fast.engine", "msflow_fast.cli"),
    "ops": ("msflow_fast.nn", "msflow_fast.model", "msflow_fast.engine", "msflow_fast.cli"),
    "nn": ("msflow_fast.model", "msflow_fast.engine", "msflow_fast.cli", "msflow_fast.kernels", "msflow_fast._C"),
    "model": ("msflow_fast.engine", "msflow_fast.cli", "msflow_fast.kernels", "msflow_fast._C"),
    "engine": ("msflow_fast.cli", "msflow_fast.kernels", "msflow_fast._C"),
}


def _absolute_imports(path: Path) -> set[str]:
    if path.is_relative_to(PACKAGE):
        module_parts = ["msflow_fast", *path.relative_to(PACKAGE).with_suffix("").parts]
    else:
        module_parts = ["msflow_fast", "kernels", *path.relative_to(ROOT / "kernels").with_suffix("").parts]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module_parts[: len(module_parts) - node.level]
                prefix = ".".join(base + ([node.module] if node.module else []))
                names.add(prefix)
                names.update(f"{prefix}.{alias.name}" for alias in node.names)
            elif node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _files(layer: str) -> list[Path]:
    folder = ROOT / "kernels" if layer == "kernels" else PACKAGE / layer
    return sorted(folder.rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_downward_only(layer):
    bad = []
    for path in _files(layer):
        for name in _absolute_imports(path):
            if any(name == p or name.startswith(p + ".") for p in FORBIDDEN[layer]):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "layering violated:\n" + "\n".join(bad)


def test_reference_imports_nothing_from_the_package():
    names = _absolute_imports(PACKAGE / "ops" / "reference.py")
    assert not [n for n in names if n.startswith("msflow_fast")], names


def test_nn_uses_only_the_public_ops():
    bad = []
    for path in _files("nn"):
        for name in _absolute_imports(path):
            if name.startswith("msflow_fast.ops.") and name.split(".")[2].startswith("_"):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_kernels_package_is_not_top_level():
    import msflow_fast.kernels as k

    assert Path(k.__file__).resolve().parent == ROOT / "kernels"
