"""The torch.compile backend: `torch.compile(model, backend="frzcompile", options={...})`.

Dynamo hands the backend one FX graph per compiled frame (several after graph breaks), with the model's
parameters and buffers lifted to placeholders. Dynamo guards each graph on what it read (module modes, hooks,
attributes, shapes, `requires_grad`), so the graph that runs is faithful to the model. The backend reads each
placeholder's Dynamo source (`L['self']._modules['layer1']._parameters['weight']`) to name it, so freeze
decisions are keyed by parameter name and survive graph breaks; it runs frzcompile's freeze pass on the graph
and hands the result to Inductor (or to `aot_eager`, or runs it as is for debugging).

A parameter is frozen when it does not require grad, or when `CompileConfig.frozen` (or the plan of a
FrozenModule compiled with `optimize(..., compile=True)`) names it. The freeze pass fuses everything computed
from frozen parameters and from nothing that requires grad into a `frozen_prefix` region run under
`torch.no_grad()`, so no autograd state is built or saved for it.

Every graph compiled leaves a `GraphCompile` record on the callable the backend returns (so it lives as long as
Dynamo keeps the graph), and in the FrozenModule's own log when one asked for it; `frzcompile.explain` and
`graphs_for` read them. Dynamo falls back to eager without telling the backend once a frame hits
`torch._dynamo.config.recompile_limit`, so the backend warns on the last recompile that the limit allows, and a
FrozenModule checks after each plan change that a graph was really compiled for it.
"""
from __future__ import annotations

import collections
import re
import time
import warnings
from dataclasses import dataclass, field, fields

import torch
from torch import fx

from . import torch_private
from .errors import ConfigError, FrzError
from .inplace import reads_storage, written, written_storages
from .modes import mode_arguments

INNER_COMPILERS = ("inductor", "aot_eager", "eager")
RECORD_ATTRIBUTE = "frzcompile_record"


@dataclass
class CompileConfig:
    """Options of the frzcompile torch.compile backend, checked when built.

    `optimize(model, ..., compile=frzcompile.CompileConfig(inner="aot_eager"))`, or for plain torch.compile
    `torch.compile(model, backend="frzcompile", options={"inner": "aot_eager"})` (the same names).

    inner: what compiles the rewritten graph: "inductor" (default), "aot_eager", or "eager" (run it as is).
    frozen: not an option: the names of the plan's frozen parameters, set by `frzcompile.optimize` for each plan
        (a parameter is frozen when it does not require grad; with plain torch.compile, freeze parameters with
        `requires_grad_(False)`).
    recompile_budget: compiles a frame may use before frzcompile reports it; None means
        torch._dynamo.config.recompile_limit.
    on_budget: "warn" (RecompileBudgetWarning) or "raise" (RecompileBudgetError) when that budget is used up.
    """

    inner: str = "inductor"
    frozen: frozenset = frozenset()
    recompile_budget: int | None = None
    on_budget: str = "warn"

    def __post_init__(self):
        if self.inner not in INNER_COMPILERS:
            raise ConfigError(f"CompileConfig.inner must be one of {INNER_COMPILERS}, not {self.inner!r}")
        if isinstance(self.frozen, str) or not all(isinstance(n, str) for n in self.frozen):
            raise ConfigError("CompileConfig.frozen takes a list of parameter names, e.g. ['layer1.0.weight']")
        self.frozen = frozenset(self.frozen)
        budget = self.recompile_budget
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 0):
            raise ConfigError(f"CompileConfig.recompile_budget must be a non-negative int or None, not {budget!r}")
        if self.on_budget not in ("warn", "raise"):
            raise ConfigError(f"CompileConfig.on_budget must be 'warn' or 'raise', not {self.on_budget!r}")

    @classmethod
    def from_options(cls, options) -> CompileConfig:
        """A config from torch.compile's `options=` dict (or a CompileConfig, returned as is)."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, dict):
            raise ConfigError(f"frzcompile backend options must be a dict, not {type(options).__name__}")
        known = [f.name for f in fields(cls)]
        if "frozen" in options:
            raise ConfigError("options['frozen'] is not a frzcompile backend option: freeze parameters with "
                              "p.requires_grad_(False) (they are then frozen in every graph that reads them), or use "
                              "frzcompile.optimize(model, compile=True) and fm.freeze(...)")
        known.remove("frozen")
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(f"unknown frzcompile backend option(s) {unknown}; accepted: {known}")
        return cls(**options)


class RecompileBudgetWarning(UserWarning):
    """A compiled frame used its last allowed recompile: later plan changes run that frame in eager mode."""


class RecompileBudgetError(FrzError):
    """Raised instead of RecompileBudgetWarning with on_budget="raise"."""


@dataclass
class GraphCompile:
    """One graph Dynamo handed to the backend."""

    compile_id: str                 # Dynamo's "frame/attempt", e.g. "0/1" is the first recompile of frame 0
    frame: int
    attempt: int
    params: dict                    # parameter name -> its ParameterTag, for the parameters this graph reads
    frozen: frozenset               # names of the frozen parameters among them
    modes: dict                     # node -> mode argument (dropout / BatchNorm `training`...) as traced
    region_nodes: int               # nodes moved into the no-grad frozen region
    passes: list                    # (pass name, seconds)
    inner: str
    plan: object = None             # the FrozenModule plan key it was compiled for, if any
    seconds: float = 0.0
    created: int = 0                # time.monotonic_ns() when received, to order records
    gm: fx.GraphModule | None = field(default=None, repr=False)  # the rewritten graph, for inspection

    def param_ids(self) -> set:
        """Ids of the tags of the parameters this graph read (the record holds the tags: never reused)."""
        return {id(tag) for tag in self.params.values()}


PARAM_TAG = "_frzcompile_graph_tag"  # each parameter a graph of this backend read: the ParameterTag its records hold


class ParameterTag:
    """What ties a graph's record to the parameters it read (`graphs_for`: Dynamo shares a frame's graphs among
    all instances of a class), set on each parameter. Not the parameters (a record must not keep a model alive)
    nor weak references to them (torch.utils.swap_tensors, which .double() uses under
    swap_module_params_on_conversion, refuses a tensor that has one) nor their ids (a dead model's pass to new
    tensors). A swap replaces a parameter's attributes, so graphs compiled before a conversion lose their tie; a
    copy of the model gets new tags, a pickle an empty dict."""

    __slots__ = ()

    @staticmethod
    def of(p) -> "ParameterTag":
        tag = p.__dict__.get(PARAM_TAG)
        if not isinstance(tag, ParameterTag):
            tag = p.__dict__[PARAM_TAG] = ParameterTag()
        return tag

    @staticmethod
    def ids(model) -> set:
        """Ids of the tags on `model`'s parameters."""
        return {id(t) for t in (p.__dict__.get(PARAM_TAG) for p in model.parameters()) if isinstance(t, ParameterTag)}

    def __reduce__(self):  # (an empty OrderedDict: torch.load(weights_only=True) allows it, a tag's class not)
        return collections.OrderedDict, ()

    def __deepcopy__(self, memo):
        return ParameterTag()


_SOURCE_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_]\w*)|\[(\d+)\]")


def source_to_name(source: str) -> str | None:
    """`L['self']._modules['layer1']._modules['0']._parameters['weight']` -> `layer1.0.weight`."""
    root = re.match(r"^L\['[^']+'\]", source)
    if not root:
        return None
    rest = source[root.end():]
    parts, pos = [], 0
    for m in _SOURCE_PART.finditer(rest):
        if m.start() != pos:
            return None
        parts.append(next(g for g in m.groups() if g is not None))
        pos = m.end()
    return ".".join(parts) if pos == len(rest) else None


def _placeholder_names(gm: fx.GraphModule, example_inputs) -> dict:
    """placeholder node -> (parameter or buffer name or None, example tensor)."""
    out = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, example in zip(placeholders, example_inputs):
        source = torch_private.placeholder_source(node)
        out[node] = (source_to_name(source) if source is not None else None, example)
    return out


def frozen_region(gm: fx.GraphModule, placeholders: dict, frozen_names: frozenset) -> list:
    """Nodes computed from a frozen parameter and from nothing that requires grad, in graph order.

    The set is closed under ancestors among computing nodes, hence convex, so it can be fused into one region.
    Fused, it runs where its last node was, and the nodes that read it from before that move after it. A tensor
    changed in place (its views with it: they share its storage, which Dynamo's example values tell) by a value
    that requires grad (`h.add_(prompt)` on a frozen layer's output), or after a node outside the region read it
    (`t = h + prompt; h.mul_(2)`), leaves the region from that change on, with every node reading it: the
    dataflow alone would put the frozen layers reading it after the change in the region (the node they read is
    the one from before it), and fused, ahead of the change or of the outside read. A node reading a tensor that a
    node outside the region changes in place before the region's last node leaves it too (a buffer the forward
    updates, an EMA or a trained BatchNorm's running statistics, read by frozen work): fused, its read would
    cross the change. The region also stays between two switches of a global mode (`with torch.no_grad()`,
    autocast... inside the forward: torch_private.global_state_targets): fusing moves the nodes that read the
    region after its last node, which would take them out of their `no_grad` block. Of the stretches between
    switches, the first holding region nodes is kept (a frozen prefix's).
    """
    held: set = set()
    while True:  # (each round holds more nodes out, so it ends)
        region = _dataflow_region(gm, placeholders, frozen_names, held)
        crossing = _reads_across_changes(gm, region)
        if not crossing:
            return region
        held |= crossing


def _reads_across_changes(gm: fx.GraphModule, region: list) -> set:
    """The nodes of `region` reading a tensor that a node outside it changes in place before its last node."""
    if not region:
        return set()
    members, order = set(region), {n: i for i, n in enumerate(gm.graph.nodes)}
    last = order[region[-1]]
    changed = written_storages(n for n in gm.graph.nodes if n not in members and order[n] < last)
    return {n for n in region if reads_storage(n, changed)} if changed else set()


def _dataflow_region(gm: fx.GraphModule, placeholders: dict, frozen_names: frozenset, held: set) -> list:
    """frozen_region's dataflow, with the nodes in `held` (and what reads them) kept out."""
    needs_grad, from_frozen = set(), set()
    by_storage: dict = {}    # storage of a node's example value -> the nodes viewing it so far
    read_outside = set()     # storages that a node outside the region has read
    for node, (name, example) in placeholders.items():
        is_param = isinstance(example, torch.nn.Parameter)
        if name in frozen_names and is_param:
            from_frozen.add(node)
        elif isinstance(example, torch.Tensor) and example.requires_grad:
            needs_grad.add(node)
    region = []              # (stretch between global-mode switches, node)
    switches, stretch = torch_private.global_state_targets(), 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if node.op == "call_function" and node.target in switches:
            stretch += 1
            continue
        storage = torch_private.storage_key(node.meta.get("example_value"))
        if storage is not None:
            by_storage.setdefault(storage, []).append(node)
        inputs = node.all_input_nodes
        for changed in written(node):
            if changed in needs_grad:
                continue
            key = torch_private.storage_key(changed.meta.get("example_value"))
            if any(i in needs_grad for i in inputs) or (key is not None and key in read_outside):
                needs_grad.update([changed, *by_storage.get(key, ())] if key is not None else [changed])
        if node in held or any(i in needs_grad for i in inputs):
            needs_grad.add(node)
        elif any(i in from_frozen for i in inputs):
            from_frozen.add(node)
            region.append((stretch, node))
            continue
        read_outside.update(k for k in (torch_private.storage_key(i.meta.get("example_value")) for i in inputs)
                            if k is not None)
    first = region[0][0] if region else None
    return [node for s, node in region if s == first]


def recompile_reason(record: GraphCompile, earlier) -> str:
    """Why `record` was compiled, from the records compiled before it (any order; newest wins)."""
    if record.attempt == 0:
        return "first graph of this frame"
    # Dynamo shares a frame among all instances of a class, so compare with the same model's previous graph.
    ids = record.param_ids()
    previous = None
    for r in earlier:
        if r.frame == record.frame and r.created < record.created and r.param_ids() & ids:
            if previous is None or r.created > previous.created:
                previous = r
    if previous is None:
        return "recompile: first graph of this frame for these parameters (another instance compiled it before)"
    changes = []
    if record.frozen != previous.frozen:
        added, removed = sorted(record.frozen - previous.frozen), sorted(previous.frozen - record.frozen)
        changes.append("freeze plan changed" + (f": frozen {_short(added)}" if added else "")
                       + (f"; unfrozen {_short(removed)}" if removed else ""))
    flipped = sorted(n for n, v in record.modes.items() if previous.modes.get(n, v) != v)
    if flipped:
        changes.append(f"train/eval mode changed at {_short(flipped)}")
    if record.plan is not None and previous.plan is not None and not changes:
        if record.plan[1] != previous.plan[1]:
            changes.append(f"FrozenModule switched to {'train' if record.plan[1] else 'eval'} mode")
        if record.plan[2] != previous.plan[2]:
            changes.append("module hooks were added or removed")
    return "recompile: " + ("; ".join(changes) if changes else "a Dynamo guard failed (shapes, dtypes, globals...)")


def _short(names, limit=4) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _check_budget(record: GraphCompile, config: CompileConfig) -> None:
    limit = torch_private.recompile_limit()
    budget = config.recompile_budget if config.recompile_budget is not None else limit
    count = record.attempt + 1
    if count < budget:  # (a budget above Dynamo's limit: a plan past the limit is reported as compiled by nothing)
        return
    if budget < limit:  # (a budget of the user's, below Dynamo's: a report, the frame still compiles)
        message = (
            f"frzcompile: graph {record.compile_id} is compile {count} of this frame, "
            f"{'reaching' if count == budget else 'beyond'} CompileConfig(recompile_budget={budget}); Dynamo runs "
            f"the frame eagerly (correct, but without frzcompile's rewrites) once it has compiled it {limit} times. "
            "Change the plan less often, or raise the budget."
        )
    else:
        message = (
            f"frzcompile: graph {record.compile_id} uses the last of the {budget} compiles allowed for this "
            "frame; further freeze-plan or mode changes will make Dynamo run this frame eagerly (correct, but "
            "without frzcompile's rewrites). Raise torch._dynamo.config.recompile_limit, or change the plan less "
            "often."
        )
    if config.on_budget == "raise":
        raise RecompileBudgetError(message)
    warnings.warn(message, RecompileBudgetWarning, stacklevel=2)


def frzcompile_backend(gm: fx.GraphModule, example_inputs, options=None, mode: str | None = None, *,
                       plan=None, log: list | None = None):
    """The Dynamo backend registered as "frzcompile" (entry point `torch_dynamo_backends`).

    `options` are torch.compile's (a dict of CompileConfig fields, or a CompileConfig); `plan` and `log` are set
    by a FrozenModule: the plan key this graph is compiled for, and a list that receives its GraphCompile."""
    from .passes import PassContext, run_passes
    from .passes.freeze import freeze

    if mode is not None:
        raise ConfigError("the frzcompile backend takes no mode=; use options={'inner': ...}")
    config = CompileConfig.from_options(options)
    start = time.perf_counter()
    frame, attempt = torch_private.current_compile_id() or (-1, 0)
    placeholders = _placeholder_names(gm, example_inputs)
    params = {name: t for name, t in placeholders.values() if name is not None and isinstance(t, torch.nn.Parameter)}
    frozen = frozenset(
        name for name, t in placeholders.values()
        if name is not None and isinstance(t, torch.nn.Parameter)
        and (not t.requires_grad or name in config.frozen)
    )
    stale = sorted(n for n in config.frozen & set(params) if params[n].requires_grad)
    if stale:
        raise FrzError(f"parameters {_short(stale)} are in the frozen plan but still require grad; freeze them "
                       "with FrozenModule.freeze(), which also clears their gradients and optimizer state")
    region = {n.name for n in frozen_region(gm, placeholders, frozen)}
    modes = mode_arguments(gm.graph)
    ctx = PassContext(
        node_unit={name: "frozen" for name in region},
        frozen=frozenset({"frozen"}) if region else frozenset(),
        prefix=("frozen",) if region else (),
        runs=True,
        build=attempt,
        model_name=f"dynamo_frame{frame}",
    )
    sources = torch_private.saved_dynamo_sources(gm)
    gm = run_passes(gm, ctx, passes=[freeze])
    torch_private.restore_dynamo_sources(gm, sources)
    record = GraphCompile(
        compile_id=f"{frame}/{attempt}", frame=frame, attempt=attempt,
        params={name: ParameterTag.of(t) for name, t in params.items()}, frozen=frozen,
        modes=modes, region_nodes=ctx.stats.get("freeze", {}).get("region_nodes", len(region)),
        passes=[(r.label, r.seconds) for r in ctx.records[1:]], inner=config.inner,
        plan=plan, created=time.monotonic_ns(), gm=gm,
    )
    if log is not None:
        log.append(record)
    _check_budget(record, config)
    compiled = _inner_compile(gm, example_inputs, config.inner)
    record.seconds = time.perf_counter() - start

    def run(*args):
        return compiled(*args)

    run._boxed_call = getattr(compiled, "_boxed_call", False)  # Inductor's callables take one list of inputs
    setattr(run, RECORD_ATTRIBUTE, record)
    return run


def _inner_compile(gm: fx.GraphModule, example_inputs, inner: str):
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        return torch_private.aot_eager_compile(gm, example_inputs)
    return torch_private.inductor_compile(gm, example_inputs)


def graphs_for(model: torch.nn.Module) -> list:
    """The GraphCompile records of the graphs Dynamo compiled with this backend that read `model`'s parameters,
    oldest first (what `explain` shows for a compiled model)."""
    ids = ParameterTag.ids(model)
    records = {id(r): r for r in (getattr(fn, RECORD_ATTRIBUTE)
                                  for fn in torch_private.compiled_callables(model, RECORD_ATTRIBUTE))}
    return sorted((r for r in records.values() if ids & r.param_ids()), key=lambda r: r.created)
