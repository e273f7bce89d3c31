"""The shape of the code, checked: the engine's layers import downward only and without cycles, the UI, the app and
the CLI use only what `wan_engine/__init__.py` exports, and no module or function grows past what a newcomer reads
in one go. Read from the source with `ast`, nothing is imported."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "wan_engine"
# Lower layers first: a module may import its own layer and those before it. The base modules are for every layer.
LAYERS = ["models", "model_files", "sampling", "runs"]
BASE = {"wan_engine.errors", "wan_engine.version"}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
MAX_TOP_MODULES = 15


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def engine_modules() -> dict[str, Path]:
    return {module_name(path): path for path in ENGINE.rglob("*.py")}


def imported_modules(name: str, path: Path) -> set[str]:
    """The wan_engine modules `name` imports (relative imports resolved; `from package import module` counted as
    the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    known = engine_modules()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("wan_engine"):
                continue
            children = {f"{target}.{alias.name}" for alias in node.names} & set(known)
            found |= children or {target}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("wan_engine")}
    return found - {name}


def layer_of(name: str) -> int | None:
    """The layer index of an engine module; None for the base modules and the package itself."""
    if name in BASE or name == "wan_engine":
        return None
    parts = name.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 and parts[1] in LAYERS else LAYERS.index("runs")


def test_layers_import_downward_only():
    upward = []
    for name, path in engine_modules().items():
        own = layer_of(name)
        for target in imported_modules(name, path):
            other = layer_of(target)
            if own is not None and other is not None and other > own:
                upward.append(f"{name} ({LAYERS[own]}) imports {target} ({LAYERS[other]})")
            if own is None and name != "wan_engine" and target not in BASE:
                upward.append(f"the base module {name} imports {target}")
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = {name: imported_modules(name, path) for name, path in engine_modules().items()}
    state, cycles = {}, []

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_each_subpackage_says_what_lives_there():
    for init in ENGINE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split()) >= 25, f"{init.relative_to(ROOT)} needs a paragraph saying what lives there"


def test_the_top_holds_few_modules():
    top = [path.name for path in ENGINE.glob("*.py") if not path.name.startswith("__")]
    assert len(top) <= MAX_TOP_MODULES, sorted(top)


@pytest.mark.parametrize("path", sorted([*ENGINE.rglob("*.py"), *(ROOT / "ui").glob("*.py"), ROOT / "app.py"]),
                         ids=lambda path: str(path.relative_to(ROOT)))
def test_modules_and_functions_stay_short(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES
    long = [f"{node.name}: {node.end_lineno - node.lineno + 1} lines" for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long


def test_the_ui_app_and_cli_use_only_the_engines_exports():
    exported = set(ast.literal_eval(next(
        node.value for node in ast.parse((ENGINE / "__init__.py").read_text()).body
        if isinstance(node, ast.Assign) and node.targets[0].id == "__all__")))
    outside = []
    for path in [*(ROOT / "ui").glob("*.py"), ROOT / "app.py", ENGINE / "cli.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            from_engine = isinstance(node, ast.ImportFrom) and (
                node.module == "wan_engine" or (path.parent == ENGINE and node.level == 1 and node.module is None))
            if from_engine:
                outside += [f"{path.name}: {alias.name}" for alias in node.names if alias.name not in exported]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("wan_engine."):
                outside.append(f"{path.name}: from {node.module}")
            elif isinstance(node, ast.ImportFrom) and path.parent == ENGINE and node.level:
                outside.append(f"{path.name}: from .{node.module}")
            elif isinstance(node, ast.Import) and any(alias.name.startswith("mlx") for alias in node.names):
                outside.append(f"{path.name}: imports MLX")
    assert not outside, "\n".join(outside)
