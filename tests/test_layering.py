"""The package layout is a promise: rooms in pipeline order, compute apart from IO, prediction apart from extraction.

Imports are read from the source (``ast``), resolved down to the module that defines each imported name (a room's
``__init__`` only re-exports), and checked against the rules below; a bundle-only prediction is also run to see what it
actually loads.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cnncodes"

#: room -> rooms it may import (besides the shared base: errors, _compat, _versions)
ALLOWED = {
    "images": set(),
    "network": {"images"},
    "store": set(),
    "extraction": {"images", "network", "store"},
    "probing": set(),
    "deploy": {"images", "network", "probing"},
    "sweeps": {"store", "network", "probing"},  # network: what each tap costs
    "training": {"images", "network", "store", "extraction", "probing", "deploy", "sweeps"},
    "adapter": {"images", "network"},
}
BASE = {"errors", "_compat", "_versions", "_fsutil", "_labels", "_figures"}  # may import nothing but each other
#: compute works on arrays and tensors only
COMPUTE = {"network._graph", "network._layout", "network._pooling", "network._taps", "network._extractor",
           "images._preprocess", "probing._linear", "probing._probes", "probing._results", "probing._search",
           "probing._streaming", "probing._scoring", "probing._knn", "probing._fewshot", "probing._multilabel", "probing._concat", "probing._stats", "probing._transfer", "probing._triage", "network._top"}  # fmt: skip
#: modules that read or write files of images, codes, bundles or reports
#: neither: they load models or run compute over images (checked by the room rules only)
RUNNERS = {"network._backbones", "network._encode", "network._cost", "deploy._predict", "adapter", "training._feeds",
           "training._finetune"}  # fmt: skip
IO = {"images._sources", "store._format", "store._reader", "store._writer", "store._merge", "extraction._run",
      "extraction._plan", "deploy._bundle", "deploy._export", "sweeps._report", "sweeps._run", "sweeps._compare", "training._run", "training._depth", "training._saved"}  # fmt: skip


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, level: int, target: str | None) -> str:
    base = module.split(".") if module else []
    is_package = MODULES.get(module, Path()).name == "__init__.py"
    parts = base if is_package else base[:-1]
    parts = parts[: len(parts) - (level - 1)] if level > 1 else parts
    return ".".join([*parts, *(target.split(".") if target else [])])


@cache
def _edges(module: str) -> frozenset[str]:
    """Package modules that ``module`` imports, anywhere in its body, resolved through room re-exports and the lazy
    top-level names; dynamic imports of package modules are refused outright."""
    tree = ast.parse(MODULES[module].read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _dynamic_import(node) and module != "":
            pytest.fail(f"cnncodes.{module} imports a package module dynamically (line {node.lineno}); the layering "
                        "rules cannot see that: import it statically.")  # fmt: skip
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and not (node.module or "").startswith("cnncodes"):
                continue
            target = (
                _resolve(module, node.level, node.module)
                if node.level
                else node.module.removeprefix("cnncodes").lstrip(".")
            )
            for alias in node.names:
                found.add(_defining(target, alias.name))
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("cnncodes.") for a in node.names if a.name.startswith("cnncodes."))
    found.discard("")
    return frozenset(m for m in found if m != module)


def _dynamic_import(call: ast.Call) -> bool:
    func = call.func
    named = (isinstance(func, ast.Name) and func.id == "__import__") or (
        isinstance(func, ast.Attribute) and func.attr == "import_module"
    )
    text = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return named and (not text or any(t.startswith(("cnncodes", ".")) for t in text))


@cache
def _lazy_names() -> dict[str, str]:
    """The top-level package's lazy public names -> the room that defines them (``cnncodes._LAZY``)."""
    for node in ast.parse(MODULES[""].read_text()).body:
        if isinstance(node, ast.AnnAssign | ast.Assign) and "_LAZY" in ast.unparse(node).split("=")[0]:
            return ast.literal_eval(node.value)
    raise AssertionError("cnncodes/__init__.py has no _LAZY table")


def _defining(target: str, name: str) -> str:
    """The module that defines ``name`` imported from ``target`` (a submodule, or what a room's __init__ re-exports)."""
    if f"{target}.{name}".strip(".") in MODULES:
        return f"{target}.{name}".strip(".")
    if target == "" and name in _lazy_names():
        return _defining(_lazy_names()[name], name)
    path = MODULES.get(target)
    if path is None or path.name != "__init__.py" or target == "":
        return target
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and any(a.name == name for a in node.names):
            return _defining(f"{target}.{node.module}", name)
    return target


def _room(module: str) -> str:
    return module.split(".")[0]


def _closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for nxt in _edges(todo.pop()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_rules_cover_every_module():
    rooms = {_room(m) for m in MODULES if m} - BASE - {"cli", "__main__"}
    assert rooms == set(ALLOWED), "a new room needs a line in ALLOWED (and in the README's layout table)"
    for m in COMPUTE | IO | RUNNERS:
        assert m in MODULES, f"{m} is listed but does not exist"
    inner = {m for m in MODULES if _room(m) in ALLOWED and MODULES[m].name != "__init__.py"}
    unclassified = inner - COMPUTE - IO - RUNNERS
    assert not unclassified, f"say whether {sorted(unclassified)} is compute, IO or a runner"


@pytest.mark.parametrize("module", sorted(BASE))
def test_the_shared_base_imports_only_itself(module):
    for dep in _edges(module):
        assert _room(dep) in BASE, f"cnncodes.{module} imports {dep}; the base every room uses must stay at the bottom"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m and _room(m) in ALLOWED))
def test_rooms_import_only_the_rooms_before_them(module):
    room = _room(module)
    for dep in _edges(module):
        other = _room(dep)
        assert other == room or other in BASE or other in ALLOWED[room], (
            f"{module} imports {dep}: {room} may not use {other}"
        )


def test_no_import_cycles_between_rooms_or_modules():
    graph = {m: {d for d in _edges(m) if d in MODULES} for m in MODULES if m not in ("", "cli", "__main__")}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(d) :], d]) if d in path else d)
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("module", sorted(COMPUTE))
def test_compute_never_imports_io(module):
    assert not _closure(module) & IO, f"{module} reaches {sorted(_closure(module) & IO)}"


def test_prediction_reaches_neither_the_store_nor_the_extraction_run():
    reached = _closure("deploy._predict") | _closure("deploy._export")
    assert not {m for m in reached if _room(m) in ("store", "extraction", "sweeps")}, sorted(reached)


@pytest.mark.slow
def test_a_bundle_only_predict_loads_neither_the_store_writer_nor_the_extraction_run(tmp_path):
    """Run it: save a bundle, then in a fresh interpreter load it and predict, and list what got imported."""
    from helpers import tiny_bundle

    bundle, images = tiny_bundle(tmp_path)
    code = (
        "import sys, json, cnncodes\n"
        "from helpers import TinyNet, TINY_PRE\n"
        "import torch\n"
        "torch.manual_seed(0)\n"
        f"probe = cnncodes.load_bundle({str(bundle)!r}, backbone=cnncodes.load_backbone(TinyNet(), preprocessing=TINY_PRE))\n"
        f"probe.predict({str(images)!r})\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('cnncodes'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent, check=True
    )
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert "cnncodes.deploy._predict" in loaded
    assert not {m for m in loaded if m.startswith(("cnncodes.store", "cnncodes.extraction", "cnncodes.sweeps"))}, loaded


def test_the_readme_layout_table_matches_the_folders():
    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme.split("<!-- layout -->")[1].split("<!-- /layout -->")[0]
    named = {line.split("`")[1].rstrip("/").removeprefix("cnncodes/").removesuffix(".py")
             for line in table.splitlines() if line.startswith("| `")}  # fmt: skip
    on_disk = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    on_disk |= {p.stem for p in PACKAGE.glob("*.py") if not p.name.startswith("_")}
    assert named == on_disk
