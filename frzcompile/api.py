"""`frzcompile.optimize`: capture, cut into units, attach a policy, return a FrozenModule."""
from __future__ import annotations

import torch
from torch import nn

from .activation_store import CacheConfig
from .capture import capture
from .errors import InputMismatchError, UnitError
from .policies import make_policy
from .runtime import FrozenModule
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

    model: the nn.Module to train. It is not copied: the returned module shares its parameters and buffers.
    example_inputs / example_kwargs: one batch, exactly as you call the model (`model(*example_inputs,
        **example_kwargs)`); used to capture the graph and count FLOPs. Dynamic batch sizes are supported.
    optimizer: an optimizer (or a list) over the model's parameters. Its step drives the policy, and frozen
        parameters get no update and lose their optimizer state. Without one, call `fm.step()` per step.
    policy: "smartfrz" (default: the shipped attention predictor over weight snapshots), "manual" (only
        fm.freeze/unfreeze), "linear" (needs total_steps), "autofreeze", or a `frzcompile.policies.Policy`
        instance with its options.
    units: module paths to use as units instead of the automatic choice.
    total_steps: planned number of optimizer steps (the linear schedule needs it).
    capture_method: "auto" (symbolic_trace, then torch.export), "symbolic_trace" or "export".
    cache: True (or a `frzcompile.CacheConfig`) serves the frozen prefix's outputs from an activation cache
        keyed by a fingerprint of each sample's input, skipping the frozen forward for inputs seen before.
    compile: True (or a dict of backend options, see `frzcompile.backend.DEFAULT_OPTIONS`) runs the model
        through `torch.compile(backend="frzcompile")`; every freeze-plan change recompiles. Not combinable with
        cache= yet.
    sparsity: a fraction (0.8: magnitude masks at 80 percent on every Linear and Conv weight outside the last
        unit) or a `frzcompile.SparsityConfig` (mask source, structure, schedule, early-bird, data sieving).
        Masked weights stay exactly zero through every optimizer step; frozen units keep their masks.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize() takes a torch.nn.Module, not {type(model).__name__}")
    if isinstance(model, FrozenModule):
        raise TypeError("this module was already returned by frzcompile.optimize; pass the original model")
    if example_inputs is None and not example_kwargs:
        raise InputMismatchError(
            "optimize() needs example_inputs (a tuple: one batch exactly as you pass it to the model) "
            "and/or example_kwargs"
        )
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list, type(None))):
        raise InputMismatchError(
            f"example_inputs must be a tuple of positional arguments, not {type(example_inputs).__name__}"
        )
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise InputMismatchError(f"example_kwargs must be a dict, not {type(example_kwargs).__name__}")
    if units is not None and (isinstance(units, str) or not all(isinstance(u, str) for u in units)):
        raise UnitError("units= takes a list of module paths, e.g. ['layer1.0', 'layer1.1']")
    optimizers = [] if optimizer is None else list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    for opt in optimizers:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, not {type(opt).__name__}")
    policy = make_policy(policy)
    if cache is True:
        cache = CacheConfig()
    elif cache is False or cache is None:
        cache = None
    elif not isinstance(cache, CacheConfig):
        raise TypeError(f"cache= takes True/False or a frzcompile.CacheConfig, not {type(cache).__name__}")
    if compile is True:
        compile = {}
    elif compile is False or compile is None:
        compile = None
    elif isinstance(compile, dict):
        from .backend import validate_options

        validate_options(compile)
        if "plan" in compile or "frozen" in compile:
            raise ValueError("compile= options 'plan' and 'frozen' are set by the FrozenModule itself")
    else:
        raise TypeError(f"compile= takes True/False or a dict of backend options, not {type(compile).__name__}")
    if sparsity is not None:
        from .sparsity.training import SparsityConfig

        if isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool):
            sparsity = SparsityConfig(float(sparsity))
        if not isinstance(sparsity, SparsityConfig):
            raise TypeError(f"sparsity= takes a fraction or a frzcompile.SparsityConfig, not {type(sparsity).__name__}")
        sparsity.validate()
        if compile is not None:
            raise ValueError("compile= and sparsity= cannot be combined yet: masks live in frzcompile's own graphs")
    if compile is not None and cache is not None:
        raise ValueError("compile= and cache= cannot be combined yet: the activation cache runs in frzcompile's "
                         "own graphs, not in Dynamo's")
    args = tuple(example_inputs or ())
    kwargs = dict(example_kwargs or {})
    unit_names = select_units(model, units)
    captured = capture(model, args, kwargs, unit_names, method=capture_method)
    unit_graph = UnitGraph(model, captured.gm, unit_names)
    return FrozenModule(
        model, captured, unit_graph, policy, optimizers,
        example_inputs=args, example_kwargs=kwargs, total_steps=total_steps, cache=cache, compile_options=compile,
        sparsity=sparsity,
    )
