"""The package's shape, read from its own source: imports flow one way and nothing grows past a reader.

README's "Layout" section describes the flow these tests hold: the CLI at the edge, the model below
everything that trains or stores, data below the model's users. Every import counts, function-level
ones included: a lazy import is still a dependency a reader has to follow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "src" / "smoltrain"
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 250
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in MODULES.items()}


def imported(name: str) -> set[str]:
    """The smoltrain modules `name` imports (absolute or relative, at any depth of its code)."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != "smoltrain"}
    return found - {name}


GRAPH = {name: imported(name) for name in MODULES}


def reachable(start: str) -> set[str]:
    seen = set()
    todo = [start]
    while todo:
        for dep in GRAPH[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_no_import_cycle():
    cycles = sorted(name for name in MODULES if name in reachable(name))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_the_cli_is_the_edge():
    """argparse only in smoltrain.cli; nothing but `python -m smoltrain` imports the CLI."""
    for name, tree in TREES.items():
        in_cli = name == "smoltrain.cli" or name.startswith("smoltrain.cli.")
        if not in_cli:
            assert "argparse" not in {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                                      for alias in node.names}, f"{name} imports argparse"
            if name != "smoltrain.__main__":
                assert not any(dep.startswith("smoltrain.cli") for dep in GRAPH[name]), f"{name} imports the CLI"


CORE = {"smoltrain", "smoltrain.errors", "smoltrain.config", "smoltrain.domain",
        "smoltrain.presets", "smoltrain.device", "smoltrain.storage", "smoltrain.distributed", "smoltrain.faults",
        "smoltrain.history", "smoltrain.runinfo", "smoltrain.recipefile",
        "smoltrain.containment"}
# what each package may import besides itself and the core modules (the core may also import the
# architecture's dataclass, smoltrain.model.config, a leaf: the recipe's `model:` section is one)
MAY_IMPORT = {
    "core": ("smoltrain.model.config",),
    "smoltrain.model": (),
    "smoltrain.data": (),
    "smoltrain.hf": ("smoltrain.model", "smoltrain.data", "smoltrain.checkpoint.discovery"),
    "smoltrain.eval": ("smoltrain.model", "smoltrain.data", "smoltrain.hf", "smoltrain.checkpoint.discovery"),
    "smoltrain.checkpoint": ("smoltrain.model", "smoltrain.data", "smoltrain.hf"),
    "smoltrain.train": ("smoltrain.model", "smoltrain.data", "smoltrain.hf", "smoltrain.eval", "smoltrain.checkpoint"),
    "smoltrain.app": ("smoltrain.model", "smoltrain.data", "smoltrain.hf", "smoltrain.eval", "smoltrain.checkpoint",
                      "smoltrain.train"),
}


def package_of(name: str) -> str:
    if name == "smoltrain.__main__":  # `python -m smoltrain`: the CLI's door
        return "smoltrain.cli"
    if name in CORE:
        return "core"
    return ".".join(name.split(".")[:2])


def test_every_module_has_a_home():
    """Every module is a core module or lives in one of the packages above (or the CLI)."""
    homeless = sorted(n for n in MODULES if package_of(n) not in MAY_IMPORT and package_of(n) != "smoltrain.cli")
    assert not homeless, f"modules outside the layout: {homeless}"


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_each_package_imports_only_below_it(package):
    """One rule per package (README "Layout"): the model knows no data or files, data no model, the HF
    formats no checkpoints or training, checkpoints and evaluation no training, nothing the app or CLI."""
    allowed = MAY_IMPORT[package]
    for name in (n for n in MODULES if package_of(n) == package):
        bad = sorted(dep for dep in GRAPH[name] if package_of(dep) not in ("core", package)
                     and not any(dep == a or dep.startswith(a + ".") for a in allowed))
        assert not bad, f"{name} imports {bad}"


def test_every_package_says_what_it_holds():
    for name, path in MODULES.items():
        if path.name == "__init__.py" and name != "smoltrain":
            doc = ast.get_docstring(TREES[name])
            assert doc and "import" in doc.lower(), f"{name}: its docstring must say what lives there and what it may import"


def test_sizes():
    """Modules, classes and functions a newcomer can read in one sitting."""
    too_big = []
    for name, tree in TREES.items():
        lines = len(MODULES[name].read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES:
            too_big.append(f"module {name}: {lines} lines")
        for node in ast.walk(tree):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef) and size > MAX_CLASS_LINES:
                too_big.append(f"class {name}.{node.name}: {size} lines")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and size > MAX_FUNCTION_LINES:
                too_big.append(f"function {name}.{node.name}: {size} lines")
    assert not too_big, "; ".join(too_big)


def test_the_layout_checker_sees_imports():
    """The graph is not empty by accident: known edges are found, relative and lazy ones included."""
    assert "smoltrain.errors" in GRAPH["smoltrain.cli"]
    assert "smoltrain.train.trainer" in GRAPH["smoltrain.cli.runs"]  # a function-level import
    assert "smoltrain.data.shards" in GRAPH["smoltrain.data.loader"]
    assert len(MODULES) > 30


def _reads(value: ast.AST, target: ast.AST, source: str) -> bool:
    """Whether `value` reads `target` (a name, or the source text of an attribute / subscript)."""
    if isinstance(target, ast.Name):
        return any(isinstance(n, ast.Name) and n.id == target.id for n in ast.walk(value))
    return ast.get_source_segment(source, target) in ast.get_source_segment(source, value)


def test_one_assignment_per_statement():
    """`a, b = x, y` of independent values reads as two statements squeezed into one; only a
    simultaneous assignment (a value reads another target, as in a swap) keeps the tuple form."""
    squeezed = []
    for name, tree in TREES.items():
        source = MODULES[name].read_text(encoding="utf-8")
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Tuple)
                    and isinstance(node.value, ast.Tuple)):
                continue
            targets = node.targets[0].elts
            values = node.value.elts
            dependent = any(_reads(v, t, source) for t in targets for v in values if v is not values[targets.index(t)])
            if not dependent:
                squeezed.append(f"{name}:{node.lineno}")
    assert not squeezed, f"split these into one assignment per line: {squeezed}"


def test_where_files_live_is_decided_in_one_place():
    """Only checkpoint.layout (and the lock in rundir that it asks) knows whether nodes share a run dir:
    the one-process save path reads without a multi-node flag."""
    knows = sorted(name for name, path in MODULES.items()
                   if "sees_main_dir" in path.read_text(encoding="utf-8"))
    assert knows == ["smoltrain.checkpoint.layout", "smoltrain.checkpoint.rundir"], knows
