"""The package's import graph is the architecture: library below, apps above, no cycles.

Every `import minilora...` / `from minilora... import ...` in every module counts, including imports inside
functions (a late import is still a dependency). Levels are counted between units (a subpackage such as
quant or apps, or a top-level module such as data or train): a unit's level is the length of the longest import
chain below it, in units (a unit importing nothing from minilora is at level 1).
"""
import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parent.parent / "minilora"
LIBRARY = ("backend", "io", "quant", "nn", "optim", "peft")     # the core: never imports an app
MAX_LEVELS = 6


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict:
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                # `from pkg import submodule` depends on the submodule; `from pkg import name` on pkg
                targets = [t for t in subs if t in modules] or [node.module]
                if len(targets) < len(subs):
                    targets.append(node.module)
            for t in targets:
                if t in modules and t != name and not name.startswith(t + "."):   # not on its own package
                    deps.add(t)
        # importing a package runs its __init__: a dependency on "minilora.quant.fourbit" is one on "minilora.quant"
        # too, except from inside that package
        for d in list(deps):
            parent = d.rsplit(".", 1)[0]
            while parent != "minilora" and parent in modules and not name.startswith(parent + ".") and parent != name:
                deps.add(parent)
                parent = parent.rsplit(".", 1)[0]
        deps.discard("minilora")                                      # the root __init__ only re-exports
        graph[name] = deps
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def levels(graph) -> dict:
    memo = {}

    def level(n):
        if n not in memo:
            memo[n] = 1 + max((level(d) for d in graph[n]), default=0)
        return memo[n]

    return {n: level(n) for n in graph}


def layer(name: str) -> str:
    """The unit a module belongs to; `python -m minilora` (minilora/__main__.py, two lines) is the CLI's app shim."""
    parts = name.split(".")
    unit = parts[1] if len(parts) > 1 else ""
    return "apps" if unit == "__main__" else unit


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None, f"import cycle: {' -> '.join(find_cycle(import_graph()))}"


def test_the_library_never_imports_an_app():
    graph = import_graph()
    upward = [(n, d) for n, ds in graph.items() for d in ds if layer(n) != "apps" and layer(d) == "apps"]
    assert upward == [], f"library modules importing apps: {upward}"
    assert all(layer(n) not in LIBRARY for n, d in upward)


def test_quant_stands_alone():
    graph = import_graph()
    bad = [(n, d) for n, ds in graph.items() if layer(n) == "quant" for d in ds if layer(d) in ("nn", "optim", "peft")]
    assert bad == []


def unit_graph(graph) -> dict:
    """The graph between units: a subpackage (quant, nn, optim, peft, apps) or a top-level module (data, train...)."""
    units = {}
    for n, ds in graph.items():
        u = layer(n) or "__init__"
        units.setdefault(u, set()).update(layer(d) for d in ds if layer(d) != u)
    return units


def test_at_most_six_levels():
    units = unit_graph(import_graph())
    assert find_cycle(units) is None, find_cycle(units)
    lv = levels(units)
    top = max(lv, key=lv.get)
    assert lv[top] <= MAX_LEVELS, f"{top} sits {lv[top]} levels up: {sorted(lv.items(), key=lambda kv: kv[1])}"


def test_the_graph_sees_late_imports():
    """The walker must see an import inside a function, or a cycle could hide there."""
    graph = import_graph()
    assert "minilora.apps.demo" in graph["minilora.apps.figures"]          # figures runs the demo (a late import)
    assert "minilora.nn.linear4bit" in graph["minilora.peft.model"] or "minilora.nn" in graph["minilora.peft.model"]
