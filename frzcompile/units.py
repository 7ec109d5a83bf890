"""Units: the freezable pieces of a captured graph, and the DAG over them.

A unit is a module path (`layer1.0`, `bert.encoder.layer.3`): by default one per block of a container of
repeated blocks (a transformer's layer list, a ResNet stage), the embeddings first and the head last. Every
compute node of the graph belongs to the unit whose module it was traced from (a module registered under two
paths, like T5's shared embedding, is one unit); code between modules (a `flatten`, a residual add in the root
forward) joins the unit of its latest input, or of its first user when it reads only graph inputs. Reading a
parameter is not data flow: a tied head reading the embedding's weight does not make the embedding depend on
the head. A networkx DAG records which unit feeds which; units that feed each other (interleaved code) are
merged, and the merge is explained. A second DAG, `feeds`, keeps only what modules read (code combining two
heads' outputs on the way to the outputs feeds neither): the policies' head rule reads it.

Parameters belong to the unit of the module that registers them first (`model.named_parameters()` order: a weight
tied between the embedding and the head belongs to the embedding, so freezing the embedding freezes it for the
head too, as `requires_grad=False` would), else to the unit that first reads them (a root-level parameter).
"""
from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import dataclass, field

from torch import fx, nn

from .errors import UnitError
from .inplace import reads_of_writes

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _is_composite(m: nn.Module) -> bool:
    """A block, not a single layer: it has children with parameters."""
    return any(_has_params(c) for c in m.children())


def _is_block_container(m: nn.Module, deep_blocks: bool = False) -> bool:
    """A container of repeated blocks: at least two parameterized children of one type that are blocks
    themselves (`nn.Sequential(Linear, GELU, Linear)` is a block's MLP, not a container of blocks). With
    `deep_blocks`, blocks that hold blocks of their own and are no container (ConvNeXt's CNBlock; not a
    Conv-BN-activation layer, MobileNet's Sequential or Hugging Face ResNet's module, nor an expert or a head)."""
    if not isinstance(m, _CONTAINERS):
        return False
    kinds = [type(c) for c in m.children() if _has_params(c) and _is_composite(c) and (
        not deep_blocks or (not isinstance(c, _CONTAINERS) and any(_is_composite(g) for g in c.children())))]
    return any(kinds.count(k) >= 2 for k in set(kinds))


def _is_stage(m: nn.Module) -> bool:
    """A container of repeated deep blocks, or a module holding one as a child beside other parts (a stage and
    its downsampling): its blocks are the units."""
    return _is_block_container(m, deep_blocks=True) or any(_is_block_container(c, deep_blocks=True)
                                                           for c in m.children())


def _is_layer_stack(m: nn.Module) -> bool:
    """A plain nn.Sequential of three or more single layers with parameters (VGG's `features` and `classifier`):
    each layer is a unit, as the children of a root Sequential are."""
    layers = [c for c in m.children() if _has_params(c)]
    return type(m) is nn.Sequential and len(layers) >= 3 and not any(_is_composite(c) for c in layers)


def _holds_block_container(m: nn.Module) -> bool:
    return any(_is_block_container(d) for d in m.modules())


def _own_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False))


def auto_units(model: nn.Module) -> list[str]:
    """Pick units from the module tree: descend from the root towards containers of repeated blocks (ResNet
    stages, transformer layer lists) and stop at their blocks (one unit per block, never split; a block that is a
    container of repeated blocks itself, a ConvNeXt stage, is opened to them); a model wrapped once more (Hugging
    Face's `XForY.x`) is opened to its parts (embeddings, encoder, pooler), and a plain stack of layers (VGG's
    `features`) to its layers; everything else stays whole. A module registered under two paths is taken once,
    at the first."""
    units, seen = [], set()

    def visit(path: str, m: nn.Module, depth: int, block: bool, in_stage: bool = False):
        if id(m) in seen:
            return
        seen.add(id(m))
        if block:  # a block of a container is a unit, unless it is a stage of repeated blocks (a ConvNeXt or
            expand = not in_stage and _is_stage(m)  # Swin stage): those blocks are the units, never opened
        else:
            parts = [c for c in m.children() if _has_params(c)]
            wrapper = (depth == 1 and not isinstance(m, _CONTAINERS) and len(parts) >= 2
                       and any(_is_composite(c) for c in parts))
            # (a module with parameters of its own that holds repeated blocks, such as torchvision ViT's encoder
            # with its position embedding, is opened too: those parameters join the unit that first reads them)
            expand = (depth == 0 or _holds_block_container(m) or _is_layer_stack(m)
                      or (not _own_params(m) and wrapper))
        if expand:
            container = _is_block_container(m)
            for name, child in m.named_children():
                if _has_params(child):
                    visit(f"{path}.{name}" if path else name, child, depth + 1, container, in_stage or block)
            return
        units.append(path)

    visit("", model, 0, False)
    return units


def _is_input_guard(node: fx.Node) -> bool:
    """torch.export's input-shape check; it stays outside every unit."""
    return node.op == "call_module" and node.target == "_guards_fn"


def select_units(model: nn.Module, units=None) -> list[str]:
    """The user's `units=` after checking them against the module tree, or the automatic choice."""
    names = auto_units(model) if units is None else list(units)
    if not names:
        if any(True for _ in model.parameters()):
            raise UnitError(
                f"{type(model).__name__} has no submodules with parameters, only parameters of its own: frzcompile "
                "freezes some blocks of a model while the others train, and a single layer has nothing to freeze "
                "beside what trains. Optimize the model this layer is part of.")
        raise UnitError(f"{type(model).__name__} has no parameters: there is nothing to train or freeze")
    known = dict(model.named_modules())
    for n in names:
        if n == "":
            raise UnitError("units=: the root module cannot be a unit (nothing would be left to train)")
        if n not in known:
            close = difflib.get_close_matches(n, [k for k in known if k], n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise UnitError(f"units=: {n!r} is not a module path of {type(model).__name__}.{hint}")
    for a in names:
        for b in names:
            if a != b and b.startswith(a + "."):
                raise UnitError(f"units=: {a!r} contains {b!r}; units must not nest")
    return names


def node_module_path(node: fx.Node, root: nn.Module | None = None) -> str | None:
    """Dotted path of the innermost module a node was traced from ("" for the root, None if unknown); `root`, the
    model, resolves the slices of a ModuleList in export's paths (`_unslice`)."""
    if node.op == "call_module":
        return str(node.target)
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    if not isinstance(path, str) or path.startswith("_empty_nn_module_stack"):
        return ""
    if path.startswith("L['self']"):
        path = path[len("L['self']"):].lstrip(".")
    return _unslice(path, root) if "slice(" in path and root is not None else path


_SLICE = re.compile(r"slice\((None|-?\d+), (None|-?\d+), (None|-?\d+)\)")


def _unslice(path: str, root: nn.Module) -> str:
    """torch.export names a module reached through a slice of a ModuleList (`for layer in self.layers[:n]`, as most
    Hugging Face decoders do) `layers.slice(None, 2, None).0` when the model holds a module under two paths (PEFT's
    alias of the embedding): the item's index in the list itself, through any slices (`[-2:]`, `[::-1]`, one
    slice of another). The path as it is when it does not resolve."""
    out, module, indices = [], root, None
    for part in path.split("."):
        match = _SLICE.fullmatch(part)
        try:
            if match:
                indices = (range(len(module)) if indices is None else indices)[
                    slice(*(None if v == "None" else int(v) for v in match.groups()))]
                continue
            if indices is not None:
                part, indices = str(indices[int(part)]), None
            module = module._modules[part]
        except (TypeError, ValueError, KeyError, IndexError):
            return path
        out.append(part)
    return path if indices is not None else ".".join(out)


@dataclass
class Unit:
    name: str
    nodes: list = field(default_factory=list)      # fx nodes of the captured graph, in graph order
    param_names: list = field(default_factory=list)
    params: list = field(default_factory=list)
    modules: list = field(default_factory=list)    # module objects under this unit (for train/eval)
    roots: list = field(default_factory=list)      # the module at each of its paths (eval() is called on them)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)


class UnitGraph:
    """Units in topological order, the node -> unit map, and the unit DAG."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule, unit_names):
        names = list(unit_names)
        self.node_unit: dict[fx.Node, str] = {}
        self._writes_read = reads_of_writes(gm.graph)  # node -> in-place writes it reads (not in its inputs)
        self._alias = {n: n for n in names}  # requested unit name -> unit it ended up in (after merges)
        self._paths = self._all_paths(model, names)  # every module path of a unit root, aliases included
        self.merges: dict = {}                        # merged unit -> why
        self._assign_nodes(gm, names, model)
        self._merge_cycles()
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        first = {}
        for node, u in self.node_unit.items():
            first[u] = min(first.get(u, order[node]), order[node])
        self.dag = self._build_dag()
        self.feeds = self._build_feeds(gm)
        import networkx as nx  # (imported when units are built: `import frzcompile` stays lean)
        ordered = list(nx.lexicographical_topological_sort(self.dag, key=lambda u: first[u]))
        self.units: dict[str, Unit] = {u: Unit(u) for u in ordered}
        for node in gm.graph.nodes:
            if node in self.node_unit:
                self.units[self.node_unit[node]].nodes.append(node)
        self._param_owner = self._param_owners(model, gm)  # parameter name -> unit, fixed at capture
        self.bind(model)

    def bind(self, model: nn.Module) -> None:
        """Point every unit at the model's current parameters and modules, by path: after a submodule or a
        parameter of the model was replaced, units keep their meaning (a swapped head is still the head unit).
        A unit's modules are the modules under its path, exactly what `model.get_submodule(path).eval()` would
        switch; glue modules called from a parent's forward between units belong to no unit."""
        before = getattr(self, "_roots", {})  # requested path -> its module at the last binding
        for unit in self.units.values():
            unit.param_names, unit.params, unit.modules, unit.roots = [], [], [], []
        seen = set()
        self.outside = []  # parameters of no unit (of modules the example batch never called)
        for name, p in model.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            owner = self._alias.get(self._unit_of_path(name.rpartition(".")[0], self._alias))
            if owner not in self.units:
                owner = self._param_owner.get(name)
            if owner is not None:
                self.units[owner].param_names.append(name)
                self.units[owner].params.append(p)
            else:
                self.outside.append(p)
        self._roots = {}
        for requested, name in self._alias.items():
            if name in self.units:
                try:
                    root = model.get_submodule(requested)
                except AttributeError:
                    continue  # the module was deleted: the unit has nothing left to switch
                self._roots[requested] = root
                self.units[name].roots.append(root)
                self.units[name].modules.extend(root.modules())
        # a unit's module now at another unit's path (a layer deleted from a list shifts the others), or a unit's
        # path gone: the units, bound by path, no longer mean what they meant
        was = {id(m): path for path, m in before.items()}
        moved = [f"{was[id(m)]!r} is now at {path!r}" for path, m in self._roots.items()
                 if was.get(id(m), path) != path]
        gone = [f"{path!r} no longer exists" for path in before if path not in self._roots]
        self.moved = moved + gone

    # -- construction --------------------------------------------------------------------------------
    @staticmethod
    def _all_paths(model, names) -> dict:
        """module path -> requested unit name, for each unit's module under every path it is registered at."""
        roots = {}
        for n in names:
            try:
                roots[id(model.get_submodule(n))] = n
            except AttributeError:
                continue
        paths = {n: n for n in names}
        for path, module in model.named_modules(remove_duplicate=False):
            if id(module) in roots:
                paths.setdefault(path, roots[id(module)])
        return paths

    def _unit_of_path(self, path, names=None):
        """The requested unit whose module holds `path` (through any of its paths), or None."""
        if path is None:
            return None
        parts = path.split(".") if path else []
        for k in range(len(parts), 0, -1):
            cand = self._paths.get(".".join(parts[:k]))
            if cand is not None and (names is None or cand in names):
                return cand
        return None

    def _assign_nodes(self, gm, names, model):
        nameset = set(names)
        nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
        order = {n: i for i, n in enumerate(nodes)}
        self._traced = set()  # nodes traced from a unit's modules; the rest is glue
        for n in nodes:
            if n.op == "get_attr":
                continue  # a parameter read joins its first reader's unit (below): reading is not data flow
            u = self._unit_of_path(node_module_path(n, model), nameset)
            if u is not None and not _is_input_guard(n):
                self.node_unit[n] = u
                self._traced.add(n)
        # Glue code outside any unit joins the latest-starting unit among its inputs' (`self.b(h) + 0.5 * h`:
        # the add joins b even though the `0.5 * h` it reads, a's glue, was traced after b; joining the unit of
        # its latest input node, a, would make a and b feed each other) ...
        start = {}
        for n, u in self.node_unit.items():
            start[u] = min(start.get(u, order[n]), order[n])
        pending = []
        for n in nodes:
            if n in self.node_unit or _is_input_guard(n):
                continue
            units = {self.node_unit[a] for a in self._inputs(n) if a in self.node_unit}
            if units:
                self.node_unit[n] = max(units, key=lambda u: start[u])
            else:
                pending.append(n)
        # ... or, reading only graph inputs and constants, the unit of its first user (for its FLOPs); what it
        # computes comes from no unit, so it carries no data flow between units (a DDPM's timestep drawn in the
        # wrapper's forward, read by the time embedding and, through the noised input, by the first block:
        # counted as the block's, it made the two feed each other).
        self._from_inputs = set()
        for n in reversed(pending):
            users = [u for u in n.users if u in self.node_unit]
            if users:
                self.node_unit[n] = self.node_unit[min(users, key=order.get)]
                self._from_inputs.add(n)

    def _inputs(self, node) -> list:
        """The nodes `node` reads: its inputs, and the in-place writes into them before it."""
        extra = self._writes_read.get(node)
        return node.all_input_nodes + extra if extra else node.all_input_nodes

    def _build_dag(self):
        import networkx as nx
        dag = nx.DiGraph()
        dag.add_nodes_from(set(self.node_unit.values()))
        for node, u in self.node_unit.items():
            for a in self._inputs(node):
                v = self.node_unit.get(a)
                if v is not None and v != u and a.op != "get_attr" and a not in self._from_inputs:
                    dag.add_edge(v, u, via=(a.name, node.name))
        return dag

    def _build_feeds(self, gm):
        """Which unit feeds which unit's modules: v -> w when a module of w reads what v's modules computed, directly
        or through glue. Glue joins a unit for its FLOPs and for `dag`, which the runtime needs (code summing two
        heads' losses must not run without autograd while either head trains), but glue that only combines
        results on their way to the outputs feeds no unit: BertForPreTraining's masked-LM and next-sentence heads,
        CLIP's two towers, each end a path to the outputs. The policies' head rule reads this graph."""
        import networkx as nx
        feeds = nx.DiGraph()
        feeds.add_nodes_from(set(self.node_unit.values()))
        carried = {}  # node -> the units whose module results it carries
        for node in gm.graph.nodes:
            inputs = set().union(*(carried.get(a, ()) for a in self._inputs(node)
                                   if a.op != "get_attr" and a not in self._from_inputs))
            if node in self._traced:
                u = self.node_unit[node]
                for v in inputs - {u}:
                    feeds.add_edge(v, u)
                carried[node] = {u}
            else:
                carried[node] = inputs
        return feeds

    def _merge_cycles(self):
        """Units that feed each other (interleaved code) are merged into one unit named 'a+b'."""
        import networkx as nx
        dag = self._build_dag()
        for scc in nx.strongly_connected_components(dag):
            if len(scc) > 1:
                merged = "+".join(sorted(scc))
                cycle = nx.find_cycle(dag.subgraph(scc))
                flows = "; ".join(f"{a} -> {b} ({dag.edges[a, b]['via'][0]} read by {dag.edges[a, b]['via'][1]})"
                                  for a, b in cycle)
                self.merges[merged] = f"data flows both ways between these modules: {flows}"
                self._alias.update({a: merged for a, b in self._alias.items() if b in scc})
                for node, u in self.node_unit.items():
                    if u in scc:
                        self.node_unit[node] = merged

    def _param_owners(self, model, gm) -> dict:
        """Parameter name -> unit: the unit whose module path holds it, else the unit that first reads it (a
        parameter of the root, or of a module outside every unit)."""
        graph_params = {n: p for n, p in gm.named_parameters(remove_duplicate=False)}
        readers = {}
        for node in gm.graph.nodes:
            if node in self.node_unit:
                targets = []
                if node.op == "get_attr":
                    targets = [str(node.target)]
                elif node.op == "call_module":
                    prefix = str(node.target) + "."
                    targets = [k for k in graph_params if k.startswith(prefix)]
                for t in targets:
                    p = graph_params.get(t)
                    if p is not None:
                        readers.setdefault(id(p), self.node_unit[node])
        owners = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            owner = self._alias.get(self._unit_of_path(name.rpartition(".")[0], self._alias))
            if owner not in self.units:
                owner = readers.get(id(p))
            if owner is not None:
                owners[name] = owner
        return owners

    # -- queries ---------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.units)

    def unit_of(self, name: str) -> str | None:
        """The unit a module path asked to be a unit ended up in (merged ones: 'a+b'), or None when the example
        batch never called it."""
        unit = self._alias.get(name, name)
        return unit if unit in self.units else None

    def paths(self, unit: str) -> list[str]:
        """The module paths a unit stands for (several when cycles merged them into one unit)."""
        return [requested for requested, name in self._alias.items() if name == unit]

    def resolve(self, names, warn_merged: bool = False) -> list[str]:
        """Unit names for `names`, each a unit or any module path: a path holding units stands for all of them
        (`fm.freeze("bert.encoder")`); a path inside a unit, or an unknown one, is refused with the nearest
        names. `warn_merged` (for a freeze): warn when a path names part of a merged unit."""
        out = []
        for n in names:
            n = str(n)
            if n in self.units:
                out.append(n)
                continue
            under = [u for u in self.units if any(p == n or p.startswith(n + ".") for p in self.paths(u))
                     or any(alias == n or alias.startswith(n + ".") for alias, req in self._paths.items()
                            if self._alias.get(req) == u)]
            if under:
                out += under
                for u in under if warn_merged else ():
                    if u in self.merges and not all(p == n or p.startswith(n + ".") for p in self.paths(u)):
                        others = [p for p in self.paths(u) if not (p == n or p.startswith(n + "."))]
                        warnings.warn(f"frzcompile: {n!r} is part of unit {u!r}, merged because "
                                      f"{self.merges[u]}; freezing {n!r} freezes {', '.join(others)} too. To "
                                      f"keep {'them' if len(others) > 1 else 'it'} training, call requires_grad_(True) "
                                      "on them after the freeze (they then train, as by hand, though in eval "
                                      "mode with the unit: a dropout of theirs stays off).", UserWarning,
                                      stacklevel=3)
                continue
            inside = self._alias.get(self._unit_of_path(n))
            if inside in self.units and self._module_exists(n, inside):
                raise UnitError(f"{n!r} is inside unit {inside!r}: units freeze whole; freeze {inside!r}, or pass "
                                "units=[...] to optimize() with finer units")
            if n in self._paths and self.unit_of(self._paths[n]) is None:
                raise UnitError(f"{n!r} is a module of the model, but the example batch given to optimize() never "
                                "called it, so it is not a unit. optimize() runs the example in eval mode: a module "
                                "your forward calls only in training (an early exit in eval), only with optional "
                                "arguments, or only on another branch of data-dependent code, is not reached. Pass "
                                "example inputs that reach it, or units=[...] naming a module that holds it")
            choices = self.names + [p for p in self._paths if p not in self.units]
            close = difflib.get_close_matches(n, choices, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else f" Units are: {', '.join(self.names)}"
            raise UnitError(f"unknown unit or module path {n!r}.{hint}")
        return list(dict.fromkeys(out))

    def _module_exists(self, path, unit) -> bool:
        """Whether `path` names a module under `unit`'s (`rnn.l0` inside an nn.LSTM does not)."""
        for root_path in self.paths(unit):
            try:
                root = self._roots.get(root_path)
                if root is not None and path.startswith(root_path + "."):
                    root.get_submodule(path[len(root_path) + 1:])
                    return True
            except AttributeError:
                continue
        return False

    def check(self, names) -> list[str]:
        out = []
        for n in names:
            if n not in self.units:
                close = difflib.get_close_matches(str(n), self.names, n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else f" Units are: {', '.join(self.names)}"
                raise UnitError(f"unknown unit {n!r}.{hint}")
            out.append(n)
        return out

    def prefix(self, frozen) -> list[str]:
        """Frozen units all of whose ancestors are frozen too: the part that can run without autograd."""
        frozen = set(frozen)
        import networkx as nx
        return [u for u in self.units if u in frozen and nx.ancestors(self.dag, u) <= frozen]

    def frontier(self, prefix) -> list[fx.Node]:
        """Nodes computed in the prefix and read outside it: what crosses into trainable code."""
        inside = {n for u in prefix for n in self.units[u].nodes}
        return [n for n in inside if any(user not in inside for user in n.users)]
