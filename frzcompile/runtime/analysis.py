"""The analysis side of the runtime: the captured graph, the passes' graph per plan, and FLOPs per unit.

Nothing here runs when the model is called. For each plan the passes rewrite a copy of the captured graph
(what `explain`, `fm.graph_module()` and the `FRZ_DEBUG` dumps show) and leave their decisions on the context
(`ctx.decisions`), which services carry out on the model's own modules.
"""
from __future__ import annotations

import inspect
import time
from collections import OrderedDict

import torch
from torch import fx

from ..capture import Captured, clone_graph_module, traceless
from ..modes import modes_kept
from ..passes import PassContext, run_passes
from .. import torch_private
from ..torch_private import tree_leaves
from ..units import UnitGraph

OUTSIDE = "(outside units)"
_KEEP = 4  # analysed plans kept


class Analysis:
    def __init__(self, model: torch.nn.Module, captured: Captured, unit_graph: UnitGraph):
        self.model = model
        self.captured = captured
        self.unit_graph = unit_graph
        self.builds = 0
        self.seconds = 0.0
        self.last: PassContext | None = None
        self._plans: OrderedDict = OrderedDict()   # frozen set -> (GraphModule, PassContext)
        self._flops: dict | None = None
        self.flops_note = ""  # why the FLOPs are not counted (explain says so), or ''
        self.stale = False  # the graph describes the model as captured, before a structure change (explain says so)
        self._traced = _traced_through(captured.gm, model) if captured.method == "symbolic_trace" else {}
        self._recount = False  # a structure change: count the FLOPs again
        if captured.method == "record":  # a recording is one data-dependent path (an MoE's routing), which other
            try:                          # weights may not take: counted now, with the weights it was taken with
                self._flops = self._count_flops()
            except Exception:  # (counted when asked, as for the other graphs, and explain says why it cannot be)
                self._flops = None

    def invalidate(self, structure_changed: bool = False) -> None:
        """Forget analysed plans (their decisions read weights that may have changed since). After a structure
        change (a head swapped), a graph that calls the model's modules by path (symbolic_trace's) calls the
        current ones, and the FLOPs are counted again."""
        self._plans.clear()
        if structure_changed:
            self._recount = True
            if self.captured.method == "symbolic_trace":
                self.stale |= _rebind_targets(self.captured.gm, self.model, self._traced)
            else:  # export's and record's graphs hold the captured computation itself
                self.stale = True

    def for_plan(self, frozen: frozenset, prefix: tuple, *, cache: bool, sparsity, token_layers=()) -> tuple:
        """(rewritten GraphModule, PassContext) for this plan, built on first use."""
        entry = self._plans.get(frozen)
        if entry is not None:
            self._plans.move_to_end(frozen)
            self.last = entry[1]
            return entry
        start = time.perf_counter()
        ctx = PassContext(
            node_unit={n.name: u for n, u in self.unit_graph.node_unit.items()},
            frozen=frozen,
            prefix=tuple(prefix),
            cache=cache,
            sparsity=sparsity,
            token_layers=tuple(token_layers),
            build=self.builds,
            model_name=type(self.model).__name__,
        )
        gm = run_passes(clone_graph_module(self.captured.gm), ctx)
        self.builds += 1
        self.seconds += time.perf_counter() - start
        self._plans[frozen] = (gm, ctx)
        while len(self._plans) > _KEEP:
            self._plans.popitem(last=False)
        self.last = ctx
        return gm, ctx

    def unit_flops(self) -> dict:
        """Forward FLOPs of each unit on the example inputs (eval mode), counted by torch.utils.flop_counter and
        attributed node by node to units; FLOPs of nodes outside every unit under OUTSIDE."""
        if self._flops is None or self._recount:
            try:
                self._flops = self._count_flops()
            except Exception:
                compiling = torch_private.self_compiling_calls(self.captured.gm)
                if compiling:  # (torch.cond: torch's FlopCounterMode fails on it, checked on 2.13.0)
                    self._flops = {u: 0 for u in self.unit_graph.names}
                    self.flops_note = (f"not counted: torch.utils.flop_counter fails on the graph's "
                                       f"{compiling[0]} operator")
                elif self.captured.method == "export":  # its graph asserts the dtypes and devices it was
                    # captured with, which a cast or move of the model since breaks (FLOPs do not depend on them)
                    note = "the exported graph checks the dtypes and devices it was captured with, and the " \
                           "model was cast or moved since"
                    if self._flops is None:  # (else the count made before stands)
                        self._flops = {u: 0 for u in self.unit_graph.names}
                        self.flops_note = f"not counted: {note} (explain before a cast keeps the count)"
                elif self._flops is None or self.captured.method != "record":
                    raise
                # (the recording's path no longer fits the model: the count made at capture stands)
            self._recount = False
        return dict(self._flops)

    def _count_flops(self) -> dict:
        from torch.utils.flop_counter import FlopCounterMode  # imports Triton when installed: keep it off import

        gm = self.captured.gm
        args, kwargs = self.captured.args, self.captured.kwargs
        values = _placeholder_values(self.model, gm, args, kwargs)
        with modes_kept(self.model):
            self.model.eval()  # symbolic_trace graphs call the model's own leaf modules, whose hooks (the user's)
            with traceless(self.model, hooks=self.captured.needs_hooks), torch_private.autocast_kept():
                try:
                    with FlopCounterMode(display=False) as counter:
                        interp = _FlopsPerNode(gm, counter)
                        interp.run(*values)
                except RuntimeError:  # the model was cast or moved after optimize(): the examples follow it
                    with FlopCounterMode(display=False) as counter:
                        interp = _FlopsPerNode(gm, counter)
                        interp.run(*_like_the_model(self.model, values))
        per_unit = {u: 0 for u in self.unit_graph.names}
        node_unit = {n.name: u for n, u in self.unit_graph.node_unit.items()}
        for name, flops in interp.flops.items():
            unit = node_unit.get(name, OUTSIDE)
            per_unit[unit] = per_unit.get(unit, 0) + flops
        return per_unit


def _traced_through(gm: fx.GraphModule, model: torch.nn.Module) -> dict:
    """path -> id of the model's module there, for the modules a symbolic_trace graph traced through (their forward
    is in the graph, their children are called by path): fx holds a plain container in their place."""
    out = {}
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            parts = node.target.split(".")
            for i in range(1, len(parts)):
                prefix = ".".join(parts[:i])
                if type(gm.get_submodule(prefix)) is torch.nn.Module:
                    try:
                        out[prefix] = id(model.get_submodule(prefix))
                    except AttributeError:
                        pass
    return out


def _rebind_targets(gm: fx.GraphModule, model: torch.nn.Module, traced: dict) -> bool:
    """The graph's module and attribute targets re-pointed to what the model holds at those paths now, writing only
    into the GraphModule and the plain containers fx made for it (never into a module of the user's, the replaced
    one included). Returns whether a module the graph traced through (`traced`, from `_traced_through`) was
    replaced: the graph then no longer describes its forward."""
    stale = False
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        holder, current, path = gm, model, []
        for name in node.target.split("."):
            path.append(name)
            current = getattr(current, name, None)
            mine = getattr(holder, name, None)
            if current is None or mine is current:
                break  # (gone from the model: left as captured)
            if type(mine) is torch.nn.Module and isinstance(current, torch.nn.Module):
                holder = mine  # one of fx's own containers: the targets below it are compared one by one
                stale |= id(current) != traced.get(".".join(path), id(current))
                continue
            for held in (holder._modules, holder._parameters, holder._buffers):
                held.pop(name, None)
            if isinstance(current, (torch.nn.Module, torch.nn.Parameter)) or not isinstance(current, torch.Tensor):
                setattr(holder, name, current)
            else:
                holder.register_buffer(name, current)
            break
    return stale


class _FlopsPerNode(fx.Interpreter):
    def __init__(self, gm, counter):
        super().__init__(gm)
        self.counter = counter
        self.flops = {}

    def run_node(self, n):
        before = self.counter.get_total_flops()
        result = super().run_node(n)
        self.flops[n.name] = self.counter.get_total_flops() - before
        return result


def _like_the_model(model, values):
    """`values` with their floating-point tensors in the dtype and on the device of the model's first floating
    parameter (the example inputs were recorded for the model as it was at optimize())."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None:
        return values

    def like(t):
        if isinstance(t, torch.Tensor):
            return t.to(param.device, param.dtype if t.is_floating_point() else t.dtype)
        return t
    return torch_private.tree_map(like, values)


def _placeholder_values(model, gm, args, kwargs):
    if getattr(gm, "_in_spec", None) is not None:  # torch.export: flattened (args, kwargs) leaves
        return tree_leaves((tuple(args), dict(kwargs)))
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return list(bound.arguments.values())
