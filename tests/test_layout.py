"""The package's shape as checked rules: the layers contract, no import cycles, small modules and functions."""

import ast
from pathlib import Path

from importlinter.cli import lint_imports

PACKAGE = Path(__file__).resolve().parents[1] / "workbench"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
MAX_PARAMETERS = 8
# numba kernels take their arrays and scalars one by one: a jitted function cannot take a config object
KERNELS = {"palettes/_kmeans_numba.py"}


def _modules() -> dict[str, ast.Module]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = ast.parse(path.read_text(), filename=str(path))
    return modules


def _imported(module: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Every workbench module `module` imports, at any depth (function-level and TYPE_CHECKING imports too)."""
    out = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and node.module
            and node.module.startswith("workbench")
        ):
            for alias in node.names:  # `from workbench.cli import train` imports the module workbench.cli.train
                full = f"{node.module}.{alias.name}"
                out.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("workbench"))
    return {m for m in out if m in known and m != module}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
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


def test_the_layers_contract_holds():
    pyproject = PACKAGE.parent / "pyproject.toml"
    assert lint_imports(config_filename=str(pyproject), no_cache=True) == 0


def test_no_import_cycles_counting_function_level_imports():
    modules = _modules()
    graph = {name: _imported(name, tree, set(modules)) for name, tree in modules.items()}
    # a package's __init__ re-exporting its modules is an edge down, not a cycle: leave parents out of the graph
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_modules_and_functions_stay_small():
    too_big = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_big.append(f"{rel}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            lines = node.end_lineno - node.lineno + 1
            args = node.args
            params = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs if a.arg not in ("self", "cls")]
            if lines > MAX_FUNCTION_LINES:
                too_big.append(f"{rel}:{node.lineno} {node.name}: {lines} lines")
            if len(params) > MAX_PARAMETERS and rel not in KERNELS:
                too_big.append(f"{rel}:{node.lineno} {node.name}: {len(params)} parameters")
    assert too_big == []
