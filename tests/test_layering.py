"""The package's import structure: no import cycles, and each module imports only its own layer or lower ones
(lazy imports inside functions included), so the layout reads as the pipeline."""
import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).parents[1] / "frzcompile"

# Lowest first. A module may import modules of its own layer or of lower ones, never of higher ones.
LAYERS = [
    ["errors", "torch_private", "numerics", "modes", "inplace", "zoo", "data"],
    ["kernels", "sparsity.masks", "sparsity.early_bird", "sparsity.sieve", "sparsity", "predictor", "tokens.select",
     "tokens"],
    ["capture", "units", "passes", "policies", "safety", "backend"],
    ["runtime"],
    ["cache", "sparsity.training", "tokens.service"],
    ["explain", "api"],
    # the package, the predictor's offline scripts, integrations
    ["", "predictor.collect", "predictor.train", "predictor.outcome", "integrations"],
]


def module_names():
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        yield ".".join(parts), path, is_package


def imports(name, path, is_package):
    """Package-internal modules `name` imports anywhere in its file."""
    package = name.split(".") if is_package else name.split(".")[:-1]
    known = {n for n, _, _ in module_names()}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "frzcompile":
                target = node.module[len("frzcompile"):].lstrip(".")
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if sub in known else target)  # a submodule, or a name defined in `target`
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "frzcompile":
                    found.add(alias.name[len("frzcompile"):].lstrip("."))
    # importing a module runs its packages' __init__ first (except the packages the importer is itself in, which
    # are already being imported)
    own = {".".join(name.split(".")[:k]) for k in range(0, name.count(".") + 1)}
    implied = {".".join(target.split(".")[:k]) for target in found for k in range(1, target.count(".") + 1)}
    return {t for t in found if t in known} | {t for t in implied if t in known and t not in own} - {name}


def layer_of(name):
    best = None
    for level, members in enumerate(LAYERS):
        for m in members:
            if name == m or (m and name.startswith(m + ".")):
                if best is None or len(m) > best[1]:
                    best = (level, len(m))
    assert best is not None, f"frzcompile.{name} is in no layer: add it to LAYERS"
    return best[0]


def test_no_import_cycles_and_layers_respected():
    graph = nx.DiGraph()
    for name, path, is_package in module_names():
        graph.add_node(name)
        for target in imports(name, path, is_package):
            graph.add_edge(name, target)
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles}"
    upward = [(a, b) for a, b in graph.edges if layer_of(b) > layer_of(a)]
    assert not upward, f"imports of a higher layer: {upward}"
    assert graph.number_of_edges() > 40  # the walk did find the package's imports


def test_no_module_level_mutable_state():
    """Module-level names bound to mutable containers (dicts, lists, sets, deques, counters) are runtime state
    shared by every model in the process; the runtime keeps its state on objects instead."""
    mutable_calls = {"dict", "list", "set", "deque", "Counter", "OrderedDict", "defaultdict"}
    found = []
    for name, path, _ in module_names():
        tree = ast.parse(path.read_text())
        found += [f"frzcompile.{name}: global {', '.join(n.names)}" for n in ast.walk(tree) if isinstance(n, ast.Global)]
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) and node.value is not None else []
            value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
            mutable = isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)) or (
                isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", None))
                in mutable_calls)
            for t in targets:  # UPPER_CASE tables are constants: written once, only read
                if mutable and isinstance(t, ast.Name) and not t.id.isupper() and t.id != "__all__":
                    found.append(f"frzcompile.{name}.{t.id}")
    assert not found, f"module-level mutable state: {found}"
