"""`frzcompile.optimize`: capture for analysis, cut into units, attach a policy and services, return a
FrozenModule."""
from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import nn

from . import torch_private
from .backend import CompileConfig
from .cache import CacheConfig
from .capture import capture
from .errors import ConfigError, InputMismatchError, UnitError, check_number
from .policies import ALaST, make_policy
from .runtime import FrozenContainer, FrozenModule
from .runtime import markers
from .runtime.module import check_unbound
from .runtime.steps import unwrap_optimizer
from .sparsity.training import SparsityConfig
from .units import UnitGraph, select_units


def optimize(
    model: nn.Module,
    example_inputs=None,
    *,
    example_kwargs: dict | None = None,
    optimizer=None,
    policy="smartfrz",
    units=None,
    total_steps: int | None = None,
    capture_method: str = "auto",
    cache=False,
    compile=False,
    sparsity=None,
) -> FrozenModule:
    """Wrap `model` so that the units a policy freezes stop costing backward work.

    model: the nn.Module to train. It is not copied: the returned module is the model with a freeze plan (same
        parameters, buffers, submodules and state dict), and calling it runs the model's own forward.
    example_inputs / example_kwargs: one batch, as you call the model (`model(*example_inputs, **example_kwargs)`);
        used once, to capture a graph for analysis (units, FLOPs). Calls may later use any batch size, length,
        optional argument or keyword the model accepts.
    optimizer: an optimizer (or a list; accelerate's wrapped optimizers are fine) over the model's parameters, so
        that freezing also drops their optimizer state at once. Optional: any torch optimizer that steps the
        model's parameters drives the policy, including one created later.
    policy: "smartfrz" (default: the shipped attention predictor over weight snapshots), "manual" (only
        fm.freeze/unfreeze), "linear" (needs total_steps), "autofreeze", "alast" (per-step token budgets and
        layer selection for transformer fine-tuning; `frzcompile.ALaST(budget=..., k=...)` sets its options),
        or a `frzcompile.Policy` instance.
    units: module paths to use as units instead of the automatic choice.
    total_steps: planned number of optimizer steps (the linear schedule needs it, and sparsity's gradual schedule
        and prune-and-grow sources).
    capture_method: "auto" (symbolic_trace, then torch.export, then "record": one real call traced to ATen
        operations, for data-dependent control flow), "symbolic_trace", "export" or "record".
    cache: True (or a `frzcompile.CacheConfig`) serves the frozen prefix's outputs from an activation cache
        keyed by a fingerprint of each sample's input, skipping the frozen forward for inputs seen before.
    compile: True (or a `frzcompile.CompileConfig`) runs the model through `torch.compile(backend="frzcompile")`;
        every new freeze plan compiles (an earlier plan's graphs are reused). With policy="alast", each
        transformer layer is compiled on its own.
        Not combinable with cache= or sparsity= yet.
    sparsity: a fraction (0.8: magnitude masks at 80 percent of the Linear and Conv weights outside the last unit,
        taken together) or a `frzcompile.SparsityConfig` (mask source, structure, scope, schedule, early-bird, data
        sieving).
        Masked weights stay exactly zero through every optimizer step; frozen units keep their masks.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"optimize() takes a torch.nn.Module, not {type(model).__name__}")
    if isinstance(model, FrozenModule):
        raise ConfigError("this module was already returned by frzcompile.optimize; pass the original model")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise ConfigError("optimize() takes the model itself, not a DistributedDataParallel wrapper (accelerate's "
                          "prepare() makes one on several processes): optimize the model first (or its .module), "
                          "then wrap it with frzcompile.integrations.ddp.DistributedDataParallel")
    if torch_private.compiled_wrapper(model):
        raise ConfigError("optimize() takes the model itself, not torch.compile's wrapper of it: pass the uncompiled "
                          "model (`compiled._orig_mod`) with compile=True, or compile the FrozenModule optimize() "
                          "returns")
    if example_inputs is None and not example_kwargs:
        raise InputMismatchError(
            "optimize() needs example_inputs (a tuple: one batch exactly as you pass it to the model) "
            "and/or example_kwargs"
        )
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list, type(None))):
        raise InputMismatchError(
            f"example_inputs must be a tuple of positional arguments, not {type(example_inputs).__name__}" +
            (": pass keyword arguments as example_kwargs={...}" if isinstance(example_inputs, Mapping) else "")
        )
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):  # (a tokenizer's BatchEncoding is one)
        raise InputMismatchError(f"example_kwargs must be a dict, not {type(example_kwargs).__name__}")
    if units is not None and (isinstance(units, str) or not all(isinstance(u, str) for u in units)):
        raise UnitError("units= takes a list of module paths, e.g. ['layer1.0', 'layer1.1']")
    params = list(model.parameters())
    if params and all(p.is_meta for p in params):  # (a submodule left on meta for a deferred init is fine; buffers
        # may be real: accelerate's init_empty_weights, a rotary inv_freq)
        raise ConfigError("the model's parameters are on the meta device (built under torch.device('meta')): call "
                          "model.to_empty(device=...) and initialise its weights (or load a state dict) before "
                          "frzcompile.optimize, which runs the model on the example")
    if any(torch_private.is_dtensor(p) for p in model.parameters()):
        raise ConfigError("the model's parameters are already sharded (DTensor): call frzcompile.optimize before "
                          "fully_shard / distribute_module, then shard the model (fm follows the new parameters)")
    optimizers = [] if optimizer is None else list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    model_params = {id(p) for p in model.parameters()}
    for opt in optimizers:
        inner = unwrap_optimizer(opt)
        if not isinstance(inner, torch.optim.Optimizer):
            raise ConfigError(f"optimizer must be a torch.optim.Optimizer, not {type(opt).__name__}")
        if not any(id(p) in model_params for group in inner.param_groups for p in group["params"]):
            raise ConfigError(f"the {type(inner).__name__} given as optimizer= holds none of the model's parameters "
                              "(was it made for another model, or for a copy of this one?): make it over "
                              "model.parameters()")
    total_steps = check_number("optimize", "total_steps", total_steps, 0, integer=True, low_open=True, none=True)
    policy = make_policy(policy)
    check_unbound(policy)  # (before the capture, which takes a while)
    cache = _option(cache, CacheConfig, "cache")
    compile = _option(compile, CompileConfig, "compile")
    if compile is not None and compile.frozen:
        raise ConfigError("CompileConfig.frozen is set from the freeze plan: freeze units with fm.freeze(...) or a "
                          "policy (parameters with requires_grad=False before optimize() stay frozen too)")
    if sparsity is not None and not isinstance(sparsity, bool) and isinstance(sparsity, (int, float)):
        sparsity = SparsityConfig(float(sparsity))
    if sparsity is not None and not isinstance(sparsity, SparsityConfig):
        raise ConfigError(f"sparsity= takes a fraction or a frzcompile.SparsityConfig, not {type(sparsity).__name__}")
    if compile is not None and sparsity is not None:
        raise ConfigError("compile= and sparsity= cannot be combined yet: the gradient masks are tensor hooks on the "
                          "weights, which the compiled graphs do not run")
    if compile is not None and cache is not None:
        raise ConfigError("compile= and cache= cannot be combined yet: the activation cache serves the model's own "
                          "module calls, which Dynamo's graphs inline")
    alast = isinstance(policy, ALaST)
    if alast:
        others = [name for name, value in (("cache", cache), ("sparsity", sparsity)) if value is not None]
        if others:
            raise ConfigError(f"policy='alast' does not combine with {', '.join(o + '=' for o in others)} yet: its "
                              "token selection changes what each layer computes every step")
    args = tuple(example_inputs or ())
    kwargs = dict(example_kwargs or {})
    unit_names = select_units(model, units)
    captured = capture(model, args, kwargs, unit_names, method=capture_method)
    unit_graph = UnitGraph(model, captured.gm, unit_names)
    uncalled = [] if units is None else [n for n in unit_names if unit_graph.unit_of(n) is None]
    if uncalled:
        warnings.warn(f"frzcompile: units=[...] names {', '.join(map(repr, uncalled))}, which the example batch given "
                      "to optimize() (run in eval mode) never called: not units, they cannot be frozen by name. Pass "
                      "an example that reaches them, or name a module that holds them.", UserWarning, stacklevel=2)
    for path, module in model.named_modules():
        others = markers.owners(module)
        what = "this model" if module is model else f"its submodule {path!r}"
        if any(p.holds(module) for p in others):
            warnings.warn(f"frzcompile: {what} was given to frzcompile.optimize before, and that FrozenModule is "
                          "still alive: both act on the same parameters (its policy keeps deciding at every "
                          "optimizer step, and its plan stays applied). Keep one: `del` the other (its hooks go "
                          "with it) or call its release(), or call optimize() once.", UserWarning, stacklevel=2)
            break
        if any(p.holds_part(module) for p in others):
            warnings.warn(f"frzcompile: {what} is also part of the model of another live FrozenModule (a shared "
                          "backbone?): both act on its parameters, and neither sees what the other freezes or "
                          "thaws (nor its train/eval modes). Optimize one module holding both models instead, or "
                          "release() the other.", UserWarning, stacklevel=2)
            break
    cls = FrozenContainer if FrozenContainer.fits(model) else FrozenModule  # fm[0], len(fm) of an nn.Sequential
    fm = cls(model, captured, unit_graph, policy, optimizers, total_steps=total_steps,
             compile_config=None if alast else compile)
    markers.mark(model, fm)
    if sparsity is not None:
        from .runtime.module import weak_method
        from .sparsity.training import SparseTraining

        fm.add_service(SparseTraining(sparsity, model, unit_graph, total_steps,
                                      optimizers=weak_method(fm.optimizers)))
    if alast:  # ALaST compiles each layer on its own (frzcompile.tokens.service), not the whole model
        from .tokens.service import LayerBudgets

        fm.add_service(LayerBudgets(policy, model, unit_graph, fm.plan, compile_config=compile))
    if cache is not None:
        from .cache.service import ActivationCache

        fm.add_service(ActivationCache(cache, model, unit_graph, fm.plan, recorded=captured.method == "record",
                                       self_compiling=torch_private.self_compiling_calls(captured.gm)))
    return fm


def optimized_by(model):
    """The live FrozenModule that `optimize` last made for `model` (not released), or None."""
    return markers.made_for(model)


def _option(value, config_type, name):
    """None for False/None, a default config for True, the config itself; anything else is refused."""
    if value is False or value is None:
        return None
    if value is True:
        return config_type()
    if isinstance(value, config_type):
        return value
    raise ConfigError(f"{name}= takes True/False or a frzcompile.{config_type.__name__}, not {type(value).__name__}")
