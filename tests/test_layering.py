"""The import layering of DESIGN.md §1, checked from the source (ast).

Layers, each importing only downward: kernels (L0) < ops (L1) < nn (L2) < models (L3) < engine
(L4) < cli (L5). Besides the layer order: ops never imports the package root; the library never
imports benchmarks/ or tests/; the engine reaches models only through ``models.base`` and
``models.checkpoint`` and never ``ops`` internals or kernels; the shared parts of ``models/``
never import a model's folder, and no model folder imports another's; nn uses only the public
ops; no module-level import circle anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "msflow_fast"

LAYERS = ("kernels", "ops", "nn", "models", "engine", "cli")
# layer -> the package-internal prefixes it must never import (everything above it, plus the extension)
FORBIDDEN = {
    layer: tuple(f"msflow_fast.{upper}" for upper in LAYERS[i + 1 :])
    + (("msflow_fast._C",) if layer not in ("ops",) else ())
    + (("msflow_fast.kernels",) if layer not in ("kernels", "ops") else ())
    for i, layer in enumerate(LAYERS)
}
ENGINE_MAY_IMPORT_FROM_MODELS = ("msflow_fast.models", "msflow_fast.models.base", "msflow_fast.models.checkpoint")
OUTSIDE = ("benchmarks", "tests", "conftest", "helpers")


def _module_name(path: Path) -> str:
    if path.is_relative_to(PACKAGE):
        parts = ["msflow_fast", *path.relative_to(PACKAGE).with_suffix("").parts]
    else:
        parts = ["msflow_fast", "kernels", *path.relative_to(ROOT / "kernels").with_suffix("").parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(name: str) -> bool:
    """Whether the dotted name is a module or package of this source tree."""
    parts = name.split(".")
    if parts[0] != "msflow_fast":
        return False
    base = ROOT / "kernels" if parts[1:2] == ["kernels"] else PACKAGE
    rest = parts[2:] if parts[1:2] == ["kernels"] else parts[1:]
    target = base.joinpath(*rest) if rest else base
    return target.with_suffix(".py").is_file() or (target / "__init__.py").is_file() or name in ("msflow_fast._C",)


def _imports(path: Path, module_level_only: bool = False) -> set[str]:
    """The modules ``path`` imports (``from X import name`` counts ``X.name`` when that is a module, else ``X``)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            for alias in node.names:
                full = f"{prefix}.{alias.name}"
                out.add(full if _is_module(full) else prefix)
    return out


def _files(layer: str | None = None) -> list[Path]:
    if layer is None:
        return sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
    folder = ROOT / "kernels" if layer == "kernels" else PACKAGE / layer
    return sorted(folder.rglob("*.py"))


def _hits(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_point_downward_only(layer):
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _files(layer)
        for name in _imports(path)
        if _hits(name, FORBIDDEN[layer])
    ]
    assert not bad, "layering violated:\n" + "\n".join(bad)


def test_ops_never_import_the_package_root():
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _files("ops")
        for name in _imports(path)
        if name.startswith("msflow_fast") and not _hits(name, ("msflow_fast.ops", "msflow_fast.kernels", "msflow_fast._C"))
    ]
    assert not bad, "\n".join(bad)


def test_the_library_never_imports_benchmarks_or_tests():
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _files()
        for name in _imports(path)
        if name.split(".")[0] in OUTSIDE
    ]
    assert not bad, "\n".join(bad)


def test_engine_knows_models_through_base_and_checkpoint_only():
    bad = []
    for path in _files("engine"):
        for name in _imports(path):
            if _hits(name, ("msflow_fast.models",)) and name not in ENGINE_MAY_IMPORT_FROM_MODELS:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
            if name.startswith("msflow_fast.ops.") and name.split(".")[2].startswith("_"):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_model_folders_are_independent_and_shared_parts_know_none():
    folders = sorted(p.name for p in (PACKAGE / "models").iterdir() if (p / "__init__.py").is_file())
    assert "msflow" in folders
    bad = []
    for path in _files("models"):
        rel = path.relative_to(PACKAGE / "models")
        own = rel.parts[0] if len(rel.parts) > 1 else None
        if own is None and rel.name == "__init__.py":
            continue  # the package registers every model
        for name in _imports(path):
            for folder in folders:
                if folder != own and _hits(name, (f"msflow_fast.models.{folder}",)):
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_reference_imports_nothing_from_the_package():
    names = _imports(PACKAGE / "ops" / "reference.py")
    assert not [n for n in names if n.startswith("msflow_fast")], names


def test_nn_uses_only_the_public_ops():
    bad = []
    for path in _files("nn"):
        for name in _imports(path):
            if name.startswith("msflow_fast.ops.") and name.split(".")[2].startswith("_"):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_no_module_level_import_circle():
    graph = {_module_name(p): {n for n in _imports(p, module_level_only=True) if n.startswith("msflow_fast") and n != _module_name(p)} for p in _files()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            # importing a submodule runs its parent package first: not an edge back to the parent
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_rules_catch_the_leaks_they_are_for(tmp_path, monkeypatch):
    """The ast reader sees the two leaks the rules were written for (an ops module importing the
    package root's extension loader, the CLI importing benchmarks/)."""
    ops_file = PACKAGE / "ops" / "_leak_probe.py"
    cli_file = PACKAGE / "cli" / "_leak_probe.py"
    circle_a, circle_b = PACKAGE / "ops" / "_circle_a.py", PACKAGE / "ops" / "_circle_b.py"
    try:
        ops_file.write_text("from .._build import extension_info\n")
        cli_file.write_text("def f():\n    from benchmarks import run\n")
        circle_a.write_text("from . import _circle_b\n")
        circle_b.write_text("from ._circle_a import x\n")
        assert "msflow_fast._build" in _imports(ops_file)
        assert "benchmarks" in _imports(cli_file)
        for rule in (test_ops_never_import_the_package_root, test_the_library_never_imports_benchmarks_or_tests, test_no_module_level_import_circle):
            with pytest.raises(AssertionError):
                rule()
    finally:
        for probe in (ops_file, cli_file, circle_a, circle_b):
            probe.unlink(missing_ok=True)


def test_kernels_package_is_not_top_level():
    import msflow_fast.kernels as k

    assert Path(k.__file__).resolve().parent == ROOT / "kernels"
