"""Imports run one way (DEVELOPERS.md, layout): pipelines -> magnet -> data_prep, the model code
knows nothing of Prefect, Ray or MLflow, and pipelines/ has no import cycle: entry points
(cli, commands, demo) -> flows -> drivers and services -> magnet, data_prep.

Every import counts, the ones inside functions too (they hide a cycle, they do not remove it);
only ``if TYPE_CHECKING:`` blocks are left out, since they never run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("data_prep", "magnet", "pipelines")
ORCHESTRATION = ("prefect", "ray", "mlflow")
# Who may import a flow: the entry points above the flows, and the flows themselves.
FLOW_IMPORTERS = ("pipelines.cli", "pipelines.commands", "pipelines.demo", "pipelines.flows")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
    _module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
}


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for child in ast.iter_child_nodes(node):
        if _is_type_checking(child):
            continue
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        yield from _import_nodes(child)


def imported_modules(name: str) -> set[str]:
    """Every module ``name`` imports, at module level or inside a function: the project's own by
    their module name (``from pipelines import tracking`` is pipelines.tracking), others as written."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            found.add(submodule if submodule in MODULES else base)
    found.discard(name)
    return found


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(f"{prefix}.") for prefix in prefixes)


def test_data_prep_imports_nothing_above_it() -> None:
    wrong = {
        (name, target)
        for name in MODULES
        if _top(name) == "data_prep"
        for target in imported_modules(name)
        if _top(target) in ("magnet", "pipelines")
    }
    assert not wrong, sorted(wrong)


def test_magnet_imports_neither_pipelines_nor_orchestration() -> None:
    wrong = {
        (name, target)
        for name in MODULES
        if _top(name) == "magnet"
        for target in imported_modules(name)
        if _top(target) in ("pipelines", *ORCHESTRATION)
    }
    assert not wrong, sorted(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return components


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_the_project() -> None:
    graph = {name: {t for t in imported_modules(name) if t in MODULES} for name in MODULES}
    assert not _cycles(graph)


def test_flows_are_imported_only_by_entry_points() -> None:
    wrong = {
        (name, target)
        for name in MODULES
        if not _within(name, FLOW_IMPORTERS)
        for target in imported_modules(name)
        if _within(target, ("pipelines.flows",))
    }
    assert not wrong, sorted(wrong)


def test_every_module_imports_first_in_a_fresh_interpreter() -> None:
    """Each module imported with none of the project's modules loaded yet (third-party ones stay
    loaded, for speed): an import cycle fails here whichever module comes first."""
    script = f"""
import importlib, sys, traceback
failed = []
for name in {sorted(MODULES)!r}:
    for loaded in [m for m in sys.modules if m.split(".", 1)[0] in {PACKAGES!r}]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc(limit=-3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]


def test_no_module_imports_another_modules_private_name() -> None:
    """A name with a leading underscore is its module's own: another module needing it means it
    wants a public home."""
    wrong = {
        (name, f"{node.module}.{alias.name}")
        for name, path in MODULES.items()
        for node in _import_nodes(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.ImportFrom) and _top(node.module or "") in PACKAGES
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    }
    assert not wrong, sorted(wrong)


def test_the_shard_writer_knows_nothing_of_the_synthetic_generator() -> None:
    """Preparation is for any refer-format data; the generator's kinds file is read by data_prep.refer."""
    assert not {"data_prep.synth", "data_prep.synthetic_shards"} & imported_modules("data_prep.shards")
