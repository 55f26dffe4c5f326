"""summary.json, a sample's json member and a checkpoint's meta.json are parsed only by their one
reader (data_prep.contract, magnet.checkpoint), so that a field changes, and an older or broken
file is reported, in one place. Any other JSON parse of what names one of them fails here.

What counts as naming the file: the contract's constants (SUMMARY, META_FILE, META_MEMBER), a
literal ``summary.json`` / ``meta.json``, and any variable a function assigns from those (a URL, an
open handle, the bytes read from it)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("data_prep", "magnet", "pipelines", "tests", "benchmarks", "scripts")
READERS = ("data_prep/contract.py", "magnet/checkpoint.py")
CONTRACT_NAMES = {"SUMMARY", "META_FILE", "META_MEMBER"}
CONTRACT_FILE = re.compile(r"(^|/)(summary|meta)\.json$")
JSON_READERS = re.compile(r"^_?(read|load)_json$")


def _mentions(node: ast.AST, tainted: set[str]) -> bool:
    for child in ast.walk(node):
        if isinstance(child, ast.Name) and child.id in CONTRACT_NAMES | tainted:
            return True
        if isinstance(child, ast.Attribute) and child.attr in CONTRACT_NAMES:
            return True
        if (
            isinstance(child, ast.Constant)
            and isinstance(child.value, str)
            and CONTRACT_FILE.search(child.value)
        ):
            return True
    return False


def _bound(node: ast.AST) -> list[tuple[ast.AST, ast.AST]]:
    """(target, value) pairs a statement binds: assignments, ``with ... as``, ``for ... in``."""
    if isinstance(node, ast.Assign):
        return [(target, node.value) for target in node.targets]
    if isinstance(node, ast.AnnAssign | ast.AugAssign | ast.NamedExpr) and node.value is not None:
        return [(node.target, node.value)]
    if isinstance(node, ast.With | ast.AsyncWith):
        return [(item.optional_vars, item.context_expr) for item in node.items if item.optional_vars]
    if isinstance(node, ast.For | ast.comprehension):
        return [(node.target, node.iter)]
    return []


def _is_json_parse(call: ast.Call) -> bool:
    func = call.func
    if isinstance(func, ast.Attribute):
        is_json_module = isinstance(func.value, ast.Name) and func.value.id == "json"
        return (is_json_module and func.attr in ("load", "loads")) or bool(JSON_READERS.match(func.attr))
    return isinstance(func, ast.Name) and bool(JSON_READERS.match(func.id))


def _own_nodes(scope: ast.AST) -> list[ast.AST]:
    """The nodes of a module or function outside the functions and classes defined in it."""
    nodes, stack = [], list(ast.iter_child_nodes(scope))
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            continue
        nodes.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return nodes


def hand_parses(source: str) -> list[int]:
    """Lines of ``source`` that parse a contract file as JSON themselves."""
    tree = ast.parse(source)
    found: set[int] = set()
    scopes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))]
    for scope in scopes:
        nodes = _own_nodes(scope)
        tainted: set[str] = set()
        while True:  # names assigned from a contract name, or from names so assigned
            before = len(tainted)
            for node in nodes:
                for target, value in _bound(node):
                    if _mentions(value, tainted):
                        tainted |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
            if len(tainted) == before:
                break
        found |= {
            node.lineno
            for node in nodes
            if isinstance(node, ast.Call)
            and _is_json_parse(node)
            and any(_mentions(arg, tainted) for arg in [*node.args, *(k.value for k in node.keywords)])
        }
    return sorted(found)


def test_the_guard_finds_the_ways_a_contract_file_was_parsed_by_hand() -> None:
    by_hand = [
        "json.loads((root / SUMMARY).read_text())",
        "with fsspec.open(f'{root}/{SUMMARY}', 'rb') as handle:\n    raw = handle.read()\njson.loads(raw)",
        "summary = shards / SUMMARY\nstale = summary.stat()\njson.loads(summary.read_text())",
        "settings = _read_json(f'{shards}/{SUMMARY}').get('settings', {})",
        "meta = json.loads(raw[contract.META_MEMBER])",
        "json.loads((checkpoint / 'meta.json').read_text())",
        "def reports(path):\n    with fs.open_input_stream(f'{path}/{META_FILE}') as stream:\n"
        "        return json.loads(stream.read())",
    ]
    for source in by_hand:
        assert hand_parses(source), source
    assert not hand_parses("objects = json.loads(raw[OBJECTS_MEMBER])\nsummary = read_summary(root)")
    assert not hand_parses("json.loads((workdir / 'demo-summary.json').read_text())")


def test_contract_files_are_parsed_only_by_their_reader() -> None:
    files = [path for folder in SCANNED for path in sorted((ROOT / folder).rglob("*.py"))]
    wrong = {
        f"{path.relative_to(ROOT)}:{line}"
        for path in files
        if path.relative_to(ROOT).as_posix() not in READERS
        for line in hand_parses(path.read_text())
    }
    assert not wrong, sorted(wrong)
