"""The import layering of DESIGN.md §1, checked from the source (ast).

Layers, each importing only downward: kernels (L0) < ops (L1) < nn (L2) < models (L3) < engine
(L4) < cli (L5). Besides the layer order: no layer below the CLI imports the package root (whose
``__init__`` re-exports the models: ``from msflow_fast import MSFlow`` would bypass every rule);
the library never imports benchmarks/ or tests/; the engine reaches models only through the
modules ``models.base`` and ``models.checkpoint`` (never names re-exported by ``models``) and
never ``ops`` internals or kernels; the shared parts of ``models/`` never import a model's
folder, and no model folder imports another's; nn uses only the public ops; no module-level
import circle anywhere. ``integrations/`` (bridges to other frameworks) are leaves: nothing else in
the library imports them, they import neither the CLI nor the package root, and a framework they
bridge (anomalib) is imported nowhere but in its own subpackage. Every rule is a function of the source tree, so
:func:`test_the_rules_catch_the_leaks_they_are_for` can run them on a doctored copy.
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
ENGINE_MAY_IMPORT_FROM_MODELS = ("msflow_fast.models.base", "msflow_fast.models.checkpoint")
OUTSIDE = ("benchmarks", "tests", "conftest", "helpers")
INTEGRATIONS = "msflow_fast.integrations"
FRAMEWORKS = ("anomalib",)
"""Frameworks imported only in ``msflow_fast/integrations/<framework>/``."""


def _module_name(path: Path, root: Path = ROOT) -> str:
    package = root / "msflow_fast"
    if path.is_relative_to(package):
        parts = ["msflow_fast", *path.relative_to(package).with_suffix("").parts]
    else:
        parts = ["msflow_fast", "kernels", *path.relative_to(root / "kernels").with_suffix("").parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(name: str, root: Path = ROOT) -> bool:
    """Whether the dotted name is a module or package of this source tree."""
    parts = name.split(".")
    if parts[0] != "msflow_fast":
        return False
    base = root / "kernels" if parts[1:2] == ["kernels"] else root / "msflow_fast"
    rest = parts[2:] if parts[1:2] == ["kernels"] else parts[1:]
    target = base.joinpath(*rest) if rest else base
    return target.with_suffix(".py").is_file() or (target / "__init__.py").is_file() or name in ("msflow_fast._C",)


def _imports(path: Path, module_level_only: bool = False, root: Path = ROOT) -> set[str]:
    """The modules ``path`` imports (``from X import name`` counts ``X.name`` when that is a module, else ``X``)."""
    module = _module_name(path, root)
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
                out.add(full if _is_module(full, root) else prefix)
    return out


def _files(layer: str | None = None, root: Path = ROOT) -> list[Path]:
    if layer is None:
        return sorted((root / "msflow_fast").rglob("*.py")) + sorted((root / "kernels").rglob("*.py"))
    folder = root / "kernels" if layer == "kernels" else root / "msflow_fast" / layer
    return sorted(folder.rglob("*.py"))


def _hits(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _violations(rule: str, root: Path = ROOT) -> list[str]:
    """The imports that break ``rule`` in the tree at ``root``, as ``"file imports name"``."""
    bad = []

    def report(path: Path, name: str) -> None:
        bad.append(f"{path.relative_to(root)} imports {name}")

    if rule in LAYERS:
        for path in _files(rule, root):
            for name in _imports(path, root=root):
                if _hits(name, FORBIDDEN[rule]):
                    report(path, name)
    elif rule == "root":
        for layer in LAYERS[:-1]:
            for path in _files(layer, root):
                for name in _imports(path, root=root):
                    if name == "msflow_fast":
                        report(path, name)
    elif rule == "ops-root":
        for path in _files("ops", root):
            for name in _imports(path, root=root):
                if name.startswith("msflow_fast") and not _hits(name, ("msflow_fast.ops", "msflow_fast.kernels", "msflow_fast._C")):
                    report(path, name)
    elif rule == "outside":
        for path in _files(root=root):
            for name in _imports(path, root=root):
                if name.split(".")[0] in OUTSIDE:
                    report(path, name)
    elif rule == "engine-models":
        for path in _files("engine", root):
            for name in _imports(path, root=root):
                if _hits(name, ("msflow_fast.models",)) and name not in ENGINE_MAY_IMPORT_FROM_MODELS:
                    report(path, name)
                if name.startswith("msflow_fast.ops.") and name.split(".")[2].startswith("_"):
                    report(path, name)
    elif rule == "model-folders":
        models = root / "msflow_fast" / "models"
        folders = sorted(p.name for p in models.iterdir() if (p / "__init__.py").is_file())
        for path in _files("models", root):
            rel = path.relative_to(models)
            own = rel.parts[0] if len(rel.parts) > 1 else None
            if own is None and rel.name == "__init__.py":
                continue  # the package registers every model
            for name in _imports(path, root=root):
                if any(f != own and _hits(name, (f"msflow_fast.models.{f}",)) for f in folders):
                    report(path, name)
    elif rule == "nn-public-ops":
        for path in _files("nn", root):
            for name in _imports(path, root=root):
                if name.startswith("msflow_fast.ops.") and name.split(".")[2].startswith("_"):
                    report(path, name)
    elif rule == "integrations":
        integrations = root / "msflow_fast" / "integrations"
        for path in _files(root=root):
            inside = path.is_relative_to(integrations)
            for name in _imports(path, root=root):
                if not inside and _hits(name, (INTEGRATIONS,)):
                    report(path, name)
                if inside and (name == "msflow_fast" or _hits(name, ("msflow_fast.cli",))):
                    report(path, name)
    elif rule == "frameworks":
        integrations = root / "msflow_fast" / "integrations"
        for path in _files(root=root):
            for name in _imports(path, root=root):
                framework = name.split(".")[0]
                if framework in FRAMEWORKS and not path.is_relative_to(integrations / framework):
                    report(path, name)
    elif rule == "circles":
        graph = {
            _module_name(p, root): {n for n in _imports(p, module_level_only=True, root=root) if n.startswith("msflow_fast")} - {_module_name(p, root)}
            for p in _files(root=root)
        }
        state: dict[str, int] = {}

        def visit(node: str, stack: list[str]) -> None:
            state[node] = 1
            for nxt in sorted(graph.get(node, ())):
                # importing a submodule runs its parent package first: not an edge back to the parent
                if nxt not in graph or node.startswith(nxt + "."):
                    continue
                if state.get(nxt) == 1:
                    bad.append(" -> ".join(stack[stack.index(nxt):] + [nxt]) if nxt in stack else f"{node} -> {nxt}")
                elif nxt not in state:
                    visit(nxt, stack + [nxt])
            state[node] = 2

        for module in sorted(graph):
            if module not in state:
                visit(module, [module])
    else:
        raise ValueError(rule)
    return bad


RULES = {
    "root": "no layer below the CLI imports the package root",
    "ops-root": "ops imports nothing of the package but ops, kernels and _C",
    "outside": "the library never imports benchmarks/ or tests/",
    "engine-models": "the engine imports models.base / models.checkpoint only, and no ops internals",
    "model-folders": "model folders are independent; the shared parts of models/ know none",
    "nn-public-ops": "nn uses only the public ops",
    "circles": "no module-level import circle",
    "integrations": "integrations are leaves: no other part imports them; they import neither the CLI nor the package root",
    "frameworks": "a bridged framework (anomalib) is imported only in its integrations/ subpackage",
}


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_point_downward_only(layer):
    bad = _violations(layer)
    assert not bad, "layering violated:\n" + "\n".join(bad)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_import_rule(rule):
    bad = _violations(rule)
    assert not bad, f"{RULES[rule]}:\n" + "\n".join(bad)


def test_reference_imports_nothing_from_the_package():
    names = _imports(PACKAGE / "ops" / "reference.py")
    assert not [n for n in names if n.startswith("msflow_fast")], names


def test_the_rules_catch_the_leaks_they_are_for(tmp_path):
    """On a copy of the tree with one leak per rule planted, every rule fires (the real tree is untouched)."""
    import shutil

    shutil.copytree(PACKAGE, tmp_path / "msflow_fast", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copytree(ROOT / "kernels", tmp_path / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    package = tmp_path / "msflow_fast"
    probes = {
        "ops": ("ops/_probe0.py", "from ..nn import AllInOneBlock\n"),
        "ops-root": ("ops/_probe.py", "from .._build import extension_info\n"),  # the old extension loader
        "outside": ("cli/_probe.py", "def f():\n    from benchmarks import run\n"),  # the old `bench` command
        "root": ("nn/_probe.py", "from .. import MSFlow\n"),
        "engine-models": ("engine/_probe.py", "from ..models import MSFlow\n"),
        "model-folders": ("models/_probe.py", "from .msflow import MSFlow\n"),
        "nn-public-ops": ("nn/_probe2.py", "from ..ops._backend import resolve\n"),
        "nn": ("nn/_probe3.py", "from ..models import base\n"),
        "engine": ("engine/_probe2.py", "from ..cli import commands\n"),
        "circles": ("ops/_circle_a.py", "from . import _circle_b\n"),
        "integrations": ("engine/_probe3.py", "def f():\n    from ..integrations.anomalib import lightning\n"),
        "frameworks": ("models/_probe2.py", "def f():\n    from anomalib.models import Fastflow\n"),
    }
    (package / "ops" / "_circle_b.py").write_text("from ._circle_a import x\n")
    for rule, (relative, text) in probes.items():
        (package / relative).write_text(text)
    for rule in probes:
        assert _violations(rule, tmp_path), f"rule {rule!r} did not fire on its planted leak"
    assert (ROOT / "msflow_fast" / "ops" / "_probe.py").exists() is False


def test_kernels_package_is_not_top_level():
    import msflow_fast.kernels as k

    assert Path(k.__file__).resolve().parent == ROOT / "kernels"
