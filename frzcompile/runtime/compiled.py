"""The compiled path: `optimize(model, ..., compile=True)` runs the model through torch.compile with the
frzcompile backend, one compiled model per plan.

Dynamo keeps compiled graphs per backend object, so a new plan (frozen set, train/eval, or hooks added since)
gets a new backend object and therefore a recompile that does not depend on Dynamo noticing the change itself
(it has missed `requires_grad` changes before, pytorch/pytorch#139476, and it ignores hooks added after
compiling). Returning to one of the last four plans reuses its graphs (within Dynamo's per-frame recompile
limit). Dynamo's own guards cover everything else the model reads (attributes, shapes, submodules).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections import OrderedDict

import torch

from .. import backend, torch_private

_KEEP = 4  # compiled models kept for recent plans (e.g. train and eval of the current plan)


class CompiledExecutor:
    def __init__(self, model: torch.nn.Module, config: backend.CompileConfig):
        self.model = model
        self.config = config
        self.log: list = []          # GraphCompile of every graph compiled for this module, oldest first
        self.eager_plans: set = set()  # plan keys Dynamo compiled no graph for (recompile limit)
        self._compiled: OrderedDict = OrderedDict()

    def __call__(self, args, kwargs, frozen: frozenset, frozen_names: list):
        key = (frozen, self.model.training, torch_private.hook_ids(self.model.modules()), tuple(frozen_names))
        if key in self.eager_plans:  # Dynamo compiled nothing for it before: no new attempt (each made a backend
            return self.model(*args, **kwargs)  # torch keeps for good, and warned again), the model as it is
        compiled = self._compiled.get(key)
        if compiled is not None:
            self._compiled.move_to_end(key)
            return compiled(*args, **kwargs)
        config = dataclasses.replace(self.config, frozen=self.config.frozen | set(frozen_names))
        compiled = torch.compile(self.model, backend=functools.partial(
            backend.frzcompile_backend, options=config, plan=key, log=self.log))
        self._compiled[key] = compiled
        while len(self._compiled) > _KEEP:
            self._compiled.popitem(last=False)
        before = sum(r.plan == key for r in self.log)
        raising = self.config.on_budget == "raise"
        compiler_failed, limit_hit = torch_private.dynamo_exceptions()
        try:
            # on_budget="raise": Dynamo must fail rather than fall back to eager for this plan
            with torch_private.failing_on_recompile_limit() if raising else contextlib.nullcontext():
                out = compiled(*args, **kwargs)
        except compiler_failed as e:
            del self._compiled[key]
            if isinstance(e.inner_exception, backend.RecompileBudgetError):
                raise e.inner_exception from None
            raise
        except limit_hit as e:
            del self._compiled[key]
            raise backend.RecompileBudgetError(
                f"no graph could be compiled for the plan frozen={sorted(frozen)}: Dynamo hit "
                f"torch._dynamo.config.recompile_limit ({torch_private.recompile_limit()})") from e
        if sum(r.plan == key for r in self.log) == before:
            self.eager_plans.add(key)
            del self._compiled[key]
            warnings.warn(
                f"frzcompile: Dynamo compiled no graph for the plan frozen={sorted(frozen)} (it hit "
                f"torch._dynamo.config.recompile_limit={torch_private.recompile_limit()}, or skipped the frame)"
                "; this plan runs eagerly: correct, but without compiled kernels",
                backend.RecompileBudgetWarning, stacklevel=4)
        return out
