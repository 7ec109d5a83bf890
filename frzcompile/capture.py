"""Capture: turn an nn.Module into a torch.fx GraphModule that shares the model's parameters.

`torch.fx.symbolic_trace` is tried first (it keeps torch.nn modules as call_module nodes, so the model's own
modules run); `torch.export.export(strict=False)` with a dynamic batch dimension is the fallback (the only path
that captures Hugging Face models on transformers 5). Either way the graph is captured with the model in train
mode, and checked against eager on the example inputs before it is used.
"""
from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch import fx

from .errors import CaptureError, InputMismatchError
from .modes import evalize

METHODS = ("symbolic_trace", "export")


@dataclass
class Captured:
    gm: fx.GraphModule
    method: str                       # "symbolic_trace" or "export"
    attempts: list = field(default_factory=list)  # [(method, why it failed)] for the methods tried before
    in_spec: object = None            # pytree spec of (args, kwargs) the graph was captured with


def clone_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of `gm`'s graph that shares its submodules, parameters and buffers."""
    with warnings.catch_warnings():  # torch's own deepcopy of export's pytree spec warns about LeafSpec
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    for attr in ("_in_spec", "_out_spec"):  # read by torch.export's pytree codegen
        if hasattr(gm, attr):
            setattr(new, attr, getattr(gm, attr))
    return new


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _outputs_match(a, b) -> bool:
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype:
                return False
            if x.is_floating_point() and not torch.allclose(x, y, rtol=1e-4, atol=1e-5):
                return False
            if not x.is_floating_point() and not torch.equal(x, y):
                return False
    return True


def _dynamic_shapes(model, args, kwargs):
    """dynamic_shapes letting export keep every dimension of every tensor input dynamic where it can (the
    batch shrinks at the end of an epoch, sequence lengths vary), keyed by argument name."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    spec = {}
    for name, value in bound.arguments.items():
        spec[name] = pytree.tree_map(
            lambda t: {d: torch.export.Dim.AUTO for d in range(t.dim())} if isinstance(t, torch.Tensor) else None,
            value,
        )
    return spec


class _UnitTracer(fx.Tracer):
    """torch.nn modules stay leaves (call_module nodes) unless they contain units, which must be traced into."""

    def __init__(self, unit_names):
        super().__init__()
        self.containers = {".".join(u.split(".")[:k]) for u in unit_names for k in range(1, u.count(".") + 1)}

    def is_leaf_module(self, m, qualname):
        return qualname not in self.containers and super().is_leaf_module(m, qualname)


def _symbolic_trace(model, args, kwargs, unit_names):
    tracer = _UnitTracer(unit_names)
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _export(model, args, kwargs, unit_names):
    try:
        dynamic = _dynamic_shapes(model, args, kwargs)
    except TypeError:
        dynamic = None
    ep = torch.export.export(model, tuple(args), dict(kwargs), dynamic_shapes=dynamic, strict=False)
    return ep.module()


def capture(model: torch.nn.Module, args: tuple, kwargs: dict, unit_names=(), method: str = "auto") -> Captured:
    """Capture `model` as a GraphModule; `method` is "auto", "symbolic_trace" or "export".

    `unit_names` are the module paths that will become units: symbolic_trace traces into any torch.nn module
    that contains one, so every unit's code appears in the graph."""
    if method not in ("auto",) + METHODS:
        raise ValueError(f"capture method must be 'auto' or one of {METHODS}, not {method!r}")
    name = type(model).__name__
    was_training = {m: m.training for m in model.modules()}
    try:
        # The reference run: eval mode, so it is deterministic and leaves BatchNorm statistics alone.
        model.eval()
        try:
            with torch.no_grad():
                expected = model(*args, **kwargs)
        except Exception as exc:
            raise InputMismatchError(
                f"{name} cannot run on the example inputs: {_short(exc)}. Pass example_inputs (and "
                f"example_kwargs) shaped like one training batch, exactly as you call the model."
            ) from None

        attempts = []
        for m in METHODS if method == "auto" else (method,):
            try:
                model.train()  # capture the training graph: mode-dependent ops are rewritten per plan later
                gm = {"symbolic_trace": _symbolic_trace, "export": _export}[m](model, args, kwargs, unit_names)
                model.eval()
                check = clone_graph_module(gm)
                evalize(check.graph)
                check.recompile()
                check.eval()
                with torch.no_grad():
                    got = check(*args, **kwargs)
                if not _outputs_match(expected, got):
                    raise RuntimeError("the captured graph's outputs differ from eager on the example inputs")
            except Exception as exc:  # each failure is reported, together, if no method works
                attempts.append((m, _short(exc)))
                continue
            _, in_spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
            return Captured(gm=gm, method=m, attempts=attempts, in_spec=in_spec)
        lines = "\n".join(f"  - {m}: {why}" for m, why in attempts)
        raise CaptureError(
            f"could not capture {name} ({type(model).__module__}.{name}) as a graph; every method failed:\n"
            f"{lines}\nMake the failing code traceable (no data-dependent Python control flow), or pass "
            f"capture='symbolic_trace' / 'export' to see one method's error alone.",
            attempts,
        ) from None
    finally:
        for m, mode in was_training.items():
            m.training = mode
