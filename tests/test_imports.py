"""The library's import graph, read statically (ast, no import runs): nanochat never imports jobs, and no
two nanochat modules import each other, directly or through others. Imports inside functions count: a
lazy import hides a circle from the interpreter at load time, not from a reader, and it bites the first
time the two modules are imported in the other order."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "nanochat"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def runtime_nodes(tree: ast.AST):
    """Every node of `tree` except those under `if TYPE_CHECKING:`: an import there only names a type for
    a reader and a checker, it never runs (so it cannot make a circle at import time)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imported_names(tree: ast.AST, package: str) -> list[str]:
    """Every module name an import statement in `tree` names, with `from a import b` giving a and a.b
    (b may be a module). Relative imports are resolved against `package`."""
    names = []
    for node in runtime_nodes(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.append(node.args[0].value)
    return names


def library_graph() -> dict[str, set[str]]:
    """module -> the nanochat modules it imports (a package's parents count: importing a.b runs a/__init__)."""
    files = {module_name(p): p for p in LIBRARY.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for imported in imported_names(ast.parse(path.read_text(), str(path)), package):
            parts = imported.split(".")
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                if target in files and target != name and target != "nanochat":
                    edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_library_never_imports_jobs():
    offenders = []
    for path in sorted(LIBRARY.rglob("*.py")):
        for imported in imported_names(ast.parse(path.read_text(), str(path)), module_name(path)):
            if imported == "jobs" or imported.startswith("jobs."):
                offenders.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert not offenders, "nanochat/ must not import jobs/: " + "; ".join(offenders)


def test_no_import_cycle_inside_the_library():
    graph = library_graph()
    assert len(graph) > 20 and "nanochat.gpt" in graph    # the walk found the library
    found = cycles(graph)
    assert not found, "import cycles in nanochat/: " + "; ".join(" <-> ".join(c) for c in found)


def test_imports_under_type_checking_are_not_edges_but_lazy_imports_are():
    code = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from nanochat.a import A\n"
            "def f():\n    import nanochat.b\n")
    assert [n for n in imported_names(ast.parse(code), "nanochat") if n.startswith("nanochat")] == ["nanochat.b"]


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_errors_and_files_import_no_torch():
    # the orchestration's commands that never compute (status, cancel, --help) read these modules
    import subprocess
    import sys
    code = ("import sys, nanochat.errors, nanochat.files, nanochat.device, nanochat.distributed; "
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_one_line_keeps_the_first_line_and_names_the_type_unless_the_message_names_the_key():
    from nanochat.errors import ONE_LINE_LIMIT, ConfigError, one_line
    assert one_line(ConfigError("x.yaml: stages.a.args.b: unknown key\nmore")) == "x.yaml: stages.a.args.b: unknown key"
    assert one_line(OSError(28, "No space left on device", "/w/f")) == "[Errno 28] No space left on device: '/w/f'"
    assert one_line(RuntimeError("boom\ntraceback")) == "RuntimeError: boom"
    assert one_line(KeyError()) == "KeyError:"
    assert len(one_line(ValueError("v" * 10_000))) == ONE_LINE_LIMIT


def test_the_stage_kinds_are_the_recipes_one_to_one():
    from jobs.spec import KINDS
    recipes = {p.stem for p in (LIBRARY / "recipes").glob("*.py") if p.stem != "__init__"}
    library_kinds = {kind: module for kind, (module, _cls) in KINDS.items() if module.startswith("nanochat.")}
    assert set(library_kinds) == recipes
    assert all(module == f"nanochat.recipes.{kind}" for kind, module in library_kinds.items())
