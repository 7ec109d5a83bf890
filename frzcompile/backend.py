"""The torch.compile backend: `torch.compile(model, backend="frzcompile", options={...})`.

Dynamo hands the backend one FX graph per compiled frame (several after graph breaks), with the model's
parameters and buffers lifted to placeholders. The backend reads each placeholder's Dynamo source
(`L['self']._modules['layer1']._parameters['weight']`) to name it, so freeze decisions are keyed by parameter
name and survive graph breaks; it runs frzcompile's passes on the graph and hands the result to Inductor (or
to `aot_eager`, or runs it as is for debugging).

A parameter is frozen when it does not require grad, or when the plan of a `FrozenModule` compiled with
`optimize(..., compile=True)` names it. The freeze pass fuses everything that is computed from frozen
parameters and from nothing that requires grad into a `frozen_prefix` region run under `torch.no_grad()`, so
no autograd state is built or saved for it.

Every graph received is logged (see `compile_log`), with the passes applied and, for a recompile, what changed
since the previous graph of the same frame; `frzcompile.explain` reads that log. Dynamo falls back to eager
without telling the backend once a frame hits `torch._dynamo.config.recompile_limit`, so the backend warns
on the last recompile that the limit allows, and `FrozenModule` checks after each plan change that a graph was
really compiled for it.
"""
from __future__ import annotations

import itertools
import re
import time
import warnings
import weakref
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import fx

from .errors import FrzError
from .modes import mode_arguments

DEFAULT_OPTIONS = {
    # what compiles the rewritten graph: "inductor", "aot_eager", or "eager" (run it as is, for debugging)
    "inner": "inductor",
    # parameter names to treat as frozen in addition to those with requires_grad=False
    "frozen": (),
    # recompiles a frame may use before frzcompile reports it; None: torch._dynamo.config.recompile_limit
    "recompile_budget": None,
    # "warn" or "raise" when a recompile uses up the budget
    "on_budget": "warn",
}
INNER_COMPILERS = ("inductor", "aot_eager", "eager")


class RecompileBudgetWarning(UserWarning):
    """A compiled frame used its last allowed recompile: later plan changes run that frame in eager mode."""


class RecompileBudgetError(FrzError):
    """Raised instead of RecompileBudgetWarning with options={"on_budget": "raise"}."""


def validate_options(options: dict | None) -> dict:
    """Defaults filled in; unknown keys and bad values raise ValueError naming what is accepted."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS) - {"plan"})
    if unknown:
        raise ValueError(
            f"unknown frzcompile backend option(s) {unknown}; accepted: {sorted(DEFAULT_OPTIONS)}"
        )
    merged = {**DEFAULT_OPTIONS, **options}
    if merged["inner"] not in INNER_COMPILERS:
        raise ValueError(f"options['inner'] must be one of {INNER_COMPILERS}, not {merged['inner']!r}")
    if isinstance(merged["frozen"], str) or not all(isinstance(n, str) for n in merged["frozen"]):
        raise ValueError("options['frozen'] takes a list of parameter names, e.g. ['layer1.0.weight']")
    merged["frozen"] = frozenset(merged["frozen"])
    budget = merged["recompile_budget"]
    if budget is not None and (not isinstance(budget, int) or budget < 0):
        raise ValueError(f"options['recompile_budget'] must be a non-negative int or None, not {budget!r}")
    if merged["on_budget"] not in ("warn", "raise"):
        raise ValueError(f"options['on_budget'] must be 'warn' or 'raise', not {merged['on_budget']!r}")
    return merged


@dataclass
class GraphCompile:
    """One graph Dynamo handed to the backend."""

    compile_id: str                 # Dynamo's "frame/attempt", e.g. "0/1" is the first recompile of frame 0
    frame: int
    attempt: int
    params: dict                    # parameter name -> weakref to it, for the parameters this graph reads
    frozen: frozenset               # names of the frozen parameters among them
    modes: dict                     # node -> mode argument (dropout / BatchNorm `training`...) as traced
    region_nodes: int               # nodes moved into the no-grad frozen region
    passes: list                    # (pass name, seconds)
    inner: str
    reason: str                     # why this graph was compiled
    plan: object = None             # the FrozenModule plan key it was compiled for, if any
    seconds: float = 0.0
    gm: fx.GraphModule | None = field(default=None, repr=False)  # the rewritten graph, for inspection


# Every graph compiled by this backend in this process, newest last (bounded: compiled models come and go).
compile_log: deque = deque(maxlen=512)
_fallback_frames = itertools.count(10**6)  # frame ids when no Dynamo compile context is active (direct calls)

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
        grapharg = node.meta.get("grapharg")
        name = source_to_name(grapharg.source.name) if grapharg is not None and grapharg.source is not None else None
        out[node] = (name, example)
    return out


def frozen_region(gm: fx.GraphModule, placeholders: dict, frozen_names: frozenset) -> list:
    """Nodes computed from a frozen parameter and from nothing that requires grad, in graph order.

    The set is closed under ancestors among computing nodes, hence convex, so it can be fused into one region.
    """
    needs_grad, from_frozen = set(), set()
    for node, (name, example) in placeholders.items():
        is_param = isinstance(example, torch.nn.Parameter)
        if name in frozen_names and is_param:
            from_frozen.add(node)
        elif isinstance(example, torch.Tensor) and example.requires_grad:
            needs_grad.add(node)
    region = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        inputs = node.all_input_nodes
        if any(i in needs_grad for i in inputs):
            needs_grad.add(node)
        elif any(i in from_frozen for i in inputs):
            from_frozen.add(node)
            region.append(node)
    return region


def _recompile_reason(record: GraphCompile) -> str:
    if record.attempt == 0:
        return "first graph of this frame"
    # Dynamo shares a frame among all instances of a class, so compare with the same model's last graph.
    previous = next((r for r in reversed(compile_log)
                     if r.frame == record.frame and _live_ids(r) & _live_ids(record)), None)
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


def _check_budget(record: GraphCompile, options: dict) -> None:
    budget = options["recompile_budget"]
    if budget is None:
        budget = int(torch._dynamo.config.recompile_limit)
    if record.attempt + 1 < budget:
        return
    message = (
        f"frzcompile: graph {record.compile_id} uses the last of the {budget} compiles allowed for this "
        "frame; further freeze-plan or mode changes will make Dynamo run this frame eagerly (correct, but without "
        "frzcompile's rewrites). Raise torch._dynamo.config.recompile_limit, or change the plan less often."
    )
    if options["on_budget"] == "raise":
        raise RecompileBudgetError(message)
    warnings.warn(message, RecompileBudgetWarning, stacklevel=2)


def _compile_id() -> tuple[int, int]:
    from torch._guards import CompileContext

    cid = CompileContext.current_compile_id()
    if cid is None or cid.frame_id is None:
        return next(_fallback_frames), 0
    return int(cid.frame_id), int(cid.frame_compile_id or 0)


def frzcompile_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """The Dynamo backend registered as "frzcompile" (entry point `torch_dynamo_backends`)."""
    from .passes import PassContext, run_passes
    from .passes.freeze import freeze

    if mode is not None:
        raise ValueError("the frzcompile backend takes no mode=; use options={'inner': ...}")
    options = validate_options(options)
    start = time.perf_counter()
    frame, attempt = _compile_id()
    placeholders = _placeholder_names(gm, example_inputs)
    params = {name: weakref.ref(t) for name, t in placeholders.values()
              if name is not None and isinstance(t, torch.nn.Parameter)}
    frozen = frozenset(
        name for name, t in placeholders.values()
        if name is not None and isinstance(t, torch.nn.Parameter)
        and (not t.requires_grad or name in options["frozen"])
    )
    stale = sorted(n for n in options["frozen"] & set(params) if params[n]().requires_grad)
    if stale:
        raise FrzError(f"parameters {_short(stale)} are in the frozen plan but still require grad; freeze them "
                       "with FrozenModule.freeze(), which also clears their gradients and optimizer state")
    region = {n.name for n in frozen_region(gm, placeholders, frozen)}
    modes = mode_arguments(gm.graph)
    ctx = PassContext(
        node_unit={name: "frozen" for name in region},
        frozen=frozenset({"frozen"}) if region else frozenset(),
        prefix=("frozen",) if region else (),
        training=True,
        evalize=False,  # Dynamo traced each module in its current mode; nothing is baked in to rewrite
        build=attempt,
        model_name=f"dynamo_frame{frame}",
    )
    # AOTAutograd reads each placeholder's `_dynamo_source`, a plain attribute that graph surgery (fusing
    # re-creates nodes) does not carry over, so it is restored by name afterwards.
    sources = {n.name: n._dynamo_source for n in gm.graph.nodes if hasattr(n, "_dynamo_source")}
    gm = run_passes(gm, ctx, passes=[freeze])
    for node in gm.graph.find_nodes(op="placeholder"):
        if node.name in sources:
            node._dynamo_source = sources[node.name]
    record = GraphCompile(
        compile_id=f"{frame}/{attempt}", frame=frame, attempt=attempt, params=params, frozen=frozen,
        modes=modes, region_nodes=len(region),
        passes=[(r.label, r.seconds) for r in ctx.records[1:]], inner=options["inner"], reason="",
        plan=options.get("plan"), gm=gm,
    )
    record.reason = _recompile_reason(record)
    compile_log.append(record)
    _check_budget(record, options)
    compiled = _inner_compile(gm, example_inputs, options["inner"])
    record.seconds = time.perf_counter() - start
    return compiled


def _inner_compile(gm: fx.GraphModule, example_inputs, inner: str):
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def _live_ids(record: GraphCompile) -> set:
    # weak references: a logged graph must not keep a model alive, and a dead model's ids may be reused
    return {id(p) for p in (ref() for ref in record.params.values()) if p is not None}


def graphs_for(parameters) -> list:
    """The logged graphs that read any of these parameters (what `explain` shows for a compiled model)."""
    ids = {id(p) for p in parameters}
    return [r for r in compile_log if ids & _live_ids(r)]
