"""Capture, for analysis: one torch.fx GraphModule of the model, from which units, the unit DAG, the frozen
prefix and its frontier, and FLOPs are read. What runs when you call the FrozenModule is the model itself, never
this graph, so the graph only has to describe the model's structure, not every call it will see.

`torch.fx.symbolic_trace` is tried first (torch.nn modules stay call_module nodes); `torch.export.export(
strict=False)` with static shapes is the fallback (the only path that captures Hugging Face models on
transformers 5). Last, "record" traces one real call of the model to ATen operations (make_fx on real tensors):
data-dependent Python control flow and `pack_padded_sequence`, which both others refuse, take the example's
values, so its graph is the example's path (a unit that only another branch calls is not a unit). The model
is captured in eval mode (deterministic, no BatchNorm statistics moved; a Python `if self.training:` simply
takes its eval branch), with `use_cache=False` when its forward takes `use_cache` and the example does not set it
(decoders' key/value caches are not tensors a graph can return). The graph is checked against the model on the
example inputs, within the measured numerical noise (`numerics.py`), before it is used.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import warnings
from dataclasses import dataclass, field

import torch
from torch import fx

from .errors import CaptureError, ConfigError, InputMismatchError
from .modes import modes_kept
from .numerics import tree_agree, tree_noise
from .torch_private import (autocast_kept, export_keeping_no_parameter, forked_rng, forward_hooks_suspended,
                            has_forward_hooks,
                            inline_context_regions, module_generators, open_tensors, plain_mappings,
                            record_aten_graph, tensor_version, tree_flatten, tree_leaves, tree_unflatten)

METHODS = ("symbolic_trace", "export", "record")
KEPT_BUFFER_BYTES = 256 << 20  # buffers copied before frzcompile's own runs of the forward, to put them back


# Hooks defined here make a model compute what it does: torch's pruning, spectral and weight norm and quantization
# observers set the weights a module runs with; transformers' collect the attentions and hidden states it returns.
# They run in frzcompile's own runs of the model; any other hook watches the user's runs and must not see these.
MODEL_HOOKS = ("torch.", "transformers.")


@dataclass
class Captured:
    gm: fx.GraphModule
    method: str                       # "symbolic_trace" or "export"
    attempts: list = field(default_factory=list)  # [(method, why it failed)] for the methods tried before
    args: tuple = ()                  # the example the graph was captured with (analysis arguments included)
    kwargs: dict = field(default_factory=dict)
    needs_hooks: bool = False         # the model ran only with the user's forward hooks (frzcompile's runs keep them)


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


def short_error(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def analysis_kwargs(model: torch.nn.Module, kwargs: dict) -> dict:
    """The example's keyword arguments with `use_cache=False` for models that take `use_cache` (named in their
    forward, or through `**kwargs` with a config that has it: Switch Transformers, GraniteMoe), unless the example
    brings a key/value cache of its own: a cache object in the output cannot be captured, and the model's units are
    the same without it (calls with `use_cache=True` run the model's own forward)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return dict(kwargs)
    takes = "use_cache" in params or (any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
                                      and hasattr(getattr(model, "config", None), "use_cache"))
    if takes and kwargs.get("past_key_values") is None:
        return {**kwargs, "use_cache": False}
    return dict(kwargs)


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
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    tracer.root = None  # the graph keeps its tracer (a reference cycle): it must not keep the model alive
    return gm


def _export(model, args, kwargs, unit_names):
    # Static shapes: the graph describes the example only (it is analysed, never run on other calls), and
    # symbolic shapes can take minutes to solve (Swin's window partition).
    # A failure prints the partial graph to stderr and logs a warning about unbacked symbols (data-dependent
    # control flow, which "record" then captures): both are noise to the user, whose model another method takes.
    shapes_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = shapes_log.level
    shapes_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            # (a forward keeping `self.last = h`: capture puts the attribute back, so export's advice is noise)
            warnings.filterwarnings("ignore", message="The tensor attribute .* was assigned during export")
            ep = export_keeping_no_parameter(model, tuple(args), dict(kwargs))
    finally:
        shapes_log.setLevel(level)
    return inline_context_regions(ep.module())  # (a `with torch.autocast` block's modules, each in its unit)


def _record(model, args, kwargs, unit_names):
    return record_aten_graph(model, tuple(args), dict(kwargs))


def capture(model: torch.nn.Module, args: tuple, kwargs: dict, unit_names=(), method: str = "auto") -> Captured:
    """Capture `model` as a GraphModule for analysis; `method` is "auto", "symbolic_trace", "export" or "record".

    `unit_names` are the module paths that will become units: symbolic_trace traces into any torch.nn module
    that contains one, so every unit's code appears in the graph."""
    if method not in ("auto",) + METHODS:
        raise ConfigError(f"capture_method must be 'auto' or one of {METHODS}, not {method!r}")
    name = type(model).__name__
    # the model runs on copies: a forward that changes its input in place (x.mul_(2)) must not change the
    # user's batch, once per run of the capture
    # (and a mapping of another class, a BatchEncoding a SentenceTransformer takes, as a dict: the graph methods
    # take dicts apart, not other mappings)
    args, kwargs = _copies(plain_mappings(args)), _copies(plain_mappings(kwargs))
    kwargs = analysis_kwargs(model, kwargs)
    # A `forward` set on the instance (accelerate's autocast wrapper, frzcompile's attach) is set aside: the
    # analysis reads the class's forward, whose structure it shares (autocast would hide the units from export).
    instance_forward = model.__dict__.pop("forward", None)
    try:
        # the random number generators are forked and the buffers kept: capturing leaves the user's seeded run
        # and a forward that updates a buffer at every call (a step counter) as without it
        with forked_rng(module_generators(model)), buffers_kept(model), _attributes_kept(model), _fast_path_off(), \
                modes_kept(model):
            try:
                # the user's forward hooks silent (optimize() must not look like three calls to a hook counting
                # them), global ones too
                with forward_hooks_suspended(model.modules(), keep=MODEL_HOOKS, global_too=True):
                    return _capture_methods(model, args, kwargs, unit_names, method, name)
            except (CaptureError, InputMismatchError):
                if not has_forward_hooks(model.modules(), but=MODEL_HOOKS, global_too=True):
                    raise
            # the model needs a hook of the user's to run (a pre-hook converting its inputs, a model reading what
            # its own hooks collect): captured with them, which then see these runs (and the FLOP count's)
            captured = _capture_methods(model, args, kwargs, unit_names, method, name)
            captured.needs_hooks = True
            return captured
    finally:
        if instance_forward is not None:
            model.__dict__["forward"] = instance_forward


def _capture_methods(model, args, kwargs, unit_names, method, name) -> Captured:
    methods = METHODS if method == "auto" else (method,)
    graphs = tuple(m for m in methods if m != "record") if "labels" in kwargs else methods
    try:
        return _capture(model, args, kwargs, unit_names, graphs or methods, name)
    except CaptureError as first:
        if "labels" not in kwargs or not graphs:
            raise
        # a Hugging Face model's loss may branch on the labels' values (DeBERTa's `if label_index.size(0)
        # > 0`, CTC losses): the units and FLOPs are the model's without them (the loss comes after), from
        # a graph of every call rather than a recording of the example's
        without = {k: v for k, v in kwargs.items() if k != "labels"}
        try:
            captured = _capture(model, args, without, unit_names, graphs, name)
        except (CaptureError, InputMismatchError):
            if "record" not in methods:
                raise first from None
            try:
                captured = _capture(model, args, kwargs, unit_names, ("record",), name)
            except CaptureError as last:
                raise _refusal(model, first.attempts + last.attempts) from None
            captured.attempts[:0] = first.attempts
            return captured
        why = "; ".join(f"{m}: {w}" for m, w in first.attempts)
        captured.attempts.insert(0, ("the example with its labels (captured without them)", why))
        return captured


@contextlib.contextmanager
def _fast_path_off():
    """PyTorch's fused attention fast path off for the capture's runs: in eval without grad an nn.TransformerEncoder
    with a padding mask runs on nested tensors, zeros at padded positions, which no graph reproduces (the check
    against the model would fail); what the graph describes is the same model."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


@contextlib.contextmanager
def traceless(model: torch.nn.Module, hooks: bool = False):
    """A run of the model by frzcompile itself (the FLOP count's, the cache's analysis) that leaves no trace
    in the user's: no autograd, the user's forward hooks silent (unless `hooks`: a model that runs only with
    them, Captured.needs_hooks), buffers and parameters put back, and the random number generators (torch's and
    those the modules hold) forked."""
    silent = forward_hooks_suspended(model.modules(), keep=MODEL_HOOKS, global_too=True)
    with torch.no_grad(), forked_rng(module_generators(model)), contextlib.nullcontext() if hooks else silent, \
            buffers_kept(model):
        yield


@contextlib.contextmanager
def _attributes_kept(model: torch.nn.Module):
    """Attributes a forward sets to tensors on its modules (`self.last = h.detach()`, a recurrent state set up as
    `self.hidden = None`, an LSTM's `(h, c)` tuple), as they were before the block: capture's runs must not leave
    a traced value (an fx Proxy, which fails the next real call that reads it) or the example's activations
    behind. Other attributes stay (a lazy module's sizes, set as it materialises)."""
    def held(value):
        return isinstance(value, (torch.Tensor, fx.Proxy)) or (
            isinstance(value, (tuple, list, dict)) and any(isinstance(v, (torch.Tensor, fx.Proxy))
                                                           for v in tree_leaves(value)))

    missing = object()
    saved = [(m, dict(m.__dict__)) for m in model.modules()]
    try:
        yield
    finally:
        for m, values in saved:
            for key, value in list(m.__dict__.items()):
                before = values.get(key, missing)
                if held(value) and before is not value:
                    if before is missing:
                        del m.__dict__[key]
                    else:
                        m.__dict__[key] = before


@contextlib.contextmanager
def buffers_kept(model: torch.nn.Module):
    """The model's buffers and parameters (the objects and their values) as they were before the block, for
    frzcompile's own runs of the forward (capture's, the FLOP count's): a forward may update a buffer at every
    call, not only in training (a call counter, a running mean kept by hand), or a parameter (MoCo's momentum
    update of its key encoder), also through `.data`, which moves no version counter: what was copied is compared
    by value."""
    saved, budget = [], KEPT_BUFFER_BYTES
    for kind in ("_buffers", "_parameters"):  # buffers first: a forward updates them far more often
        for m in model.modules():
            for name, b in getattr(m, kind).items():
                if b is None:  # (a slot registered empty, which a forward may fill: emptied again)
                    saved.append((m, kind, name, None, None, None))
                    continue
                if torch.nn.parameter.is_lazy(b):  # (a lazy module's, not materialised yet)
                    continue
                size = b.numel() * b.element_size()
                # not copied: a preallocated key/value cache beyond the budget; a meta tensor has no values
                copy_ = b.detach().clone() if size <= budget and not b.is_meta else None
                budget -= size if copy_ is not None else 0
                saved.append((m, kind, name, b, copy_, tensor_version(b)))
    try:
        yield
    finally:
        with torch.no_grad():
            for m, kind, name, b, value, version in saved:
                held = getattr(m, kind)
                if (held[name] if name in held else None) is not b:  # (a ScriptModule's dicts have no .get)
                    held[name] = b
                if b is None:
                    continue
                if value is None:
                    if tensor_version(b) != version and not b.is_meta:
                        warnings.warn(f"frzcompile: frzcompile's own run of the forward changed {name!r} of "
                                      f"{type(m).__name__} in place, and it is too large to have been copied "
                                      "first, so it stays changed", UserWarning, stacklevel=4)
                elif not (b.shape == value.shape and b.dtype == value.dtype and torch.equal(b, value)):
                    if b.shape != value.shape or b.dtype != value.dtype:
                        b.data = value
                    else:
                        b.copy_(value)


def _copies(tree):
    leaves, spec = tree_flatten(tree)
    return tree_unflatten([t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                           for t in leaves], spec)


def _refusal(model, attempts) -> CaptureError:
    name = type(model).__name__
    lines = "\n".join(f"  - {m}: {why}" for m, why in attempts)
    return CaptureError(
        f"could not capture {name} ({type(model).__module__}.{name}) as a graph for analysis; every method "
        f"failed:\n{lines}\nfrzcompile reads units and FLOPs from one graph of the model (the model itself is "
        "what runs). Pass capture_method='symbolic_trace', 'export' or 'record' to see one method's full error, "
        "and make that part of the forward traceable by it.",
        attempts,
    )


def _needs_grad(model, args, kwargs) -> bool:
    """Whether the forward fails again without grad but runs with it (`register_hook` or `retain_grad` on an
    intermediate, unguarded), after it failed under torch.no_grad()."""
    def runs(grad: bool) -> bool:
        try:
            with torch.set_grad_enabled(grad):
                model(*args, **kwargs)
        except Exception:
            return False
        return True

    return not runs(False) and runs(True)


def _capture(model, args, kwargs, unit_names, methods, name) -> Captured:
    # (in eval: the caller keeps every module's mode, modes_kept)
    model.eval()
    try:
        with torch.no_grad(), _attributes_kept(model):  # (each run starts from the user's attributes)
            expected = model(*args, **kwargs)
        with torch.no_grad(), _attributes_kept(model):
            again = model(*args, **kwargs)
    except Exception as exc:
        why = short_error(exc)
        if _needs_grad(model, args, kwargs):
            raise InputMismatchError(
                f"{name} runs on the example inputs with grad enabled but not under torch.no_grad() ({why}), "
                "which frzcompile's analysis uses, as an evaluation loop would: guard what needs grad in the "
                "forward, e.g. `if h.requires_grad: h.register_hook(...)`") from None
        raise InputMismatchError(
            f"{name} cannot run on the example inputs: {why}. Pass example_inputs (and "
            f"example_kwargs) shaped like one training batch, exactly as you call the model."
        ) from None
    noise = tree_noise(again, expected)

    attempts = []
    for m in methods:
        try:
            # a method that fails says why in `attempts`; its warnings (export's about an LSTM's weights) are
            # noise for a model another method captures
            with warnings.catch_warnings(record=True) as said, _attributes_kept(model):  # (not another's Proxy)
                warnings.simplefilter("always")
                gm = {"symbolic_trace": _symbolic_trace, "export": _export, "record": _record}[m](
                    model, args, kwargs, unit_names)
                with torch.no_grad(), autocast_kept():  # (eval mode: symbolic_trace's leaf modules are its own)
                    got = gm.forward(*args, **kwargs)  # gm(...) would print a failure's traceback to stderr
            # (a recording of an output torch's pytree keeps whole returns that output's tensors)
            if not tree_agree(got, open_tensors(expected) if gm.meta.get("opened_output") else expected, noise):
                raise RuntimeError("the captured graph's outputs differ from the model's on the example inputs "
                                   "(beyond the numerical noise of running the model twice)")
        except Exception as exc:  # each failure is reported, together, if no method works
            attempts.append((m, short_error(exc)))
            continue
        for w in said:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return Captured(gm=gm, method=m, attempts=attempts, args=tuple(args), kwargs=kwargs)
    raise _refusal(model, attempts) from None
