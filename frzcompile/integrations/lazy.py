"""`optimize()` at a module's first training call: training loops that own the model (Trainer, Lightning) give no
example batch up front, and drawing one from their data loader would consume its random numbers."""
from __future__ import annotations

import inspect
import warnings

import torch

from ..api import optimize, optimized_by
from ..errors import ConfigError
from ..runtime import attached_to
from ..runtime.module import InstanceForward

# optimize()'s keyword arguments that a callback fills in itself
_FILLED = ("model", "example_inputs", "example_kwargs")


def check_options(options: dict, owner: str) -> None:
    """Refuse an option `optimize()` does not take, naming the ones it does."""
    known = [n for n in inspect.signature(optimize).parameters if n not in _FILLED]
    unknown = [k for k in options if k not in known]
    if unknown:
        raise ConfigError(f"{owner} got {', '.join(map(repr, unknown))}: it takes optimize()'s options "
                          f"({', '.join(known)})")
    if options.get("compile") not in (None, False):
        # compile= makes a separate compiled module, and the loop calls the model: the callback attaches its plan
        # to the model instead (attach() does not combine with compile=)
        raise ConfigError(f"{owner} does not take compile=: the training loop calls your model, not a compiled "
                          "copy of it. Let the loop compile the model (Hugging Face: TrainingArguments("
                          "torch_compile=True); Lightning: torch.compile the module your training_step calls); "
                          "the compiled model runs the callback's plan")


class OptimizeAtFirstCall(InstanceForward):
    """Set as `module.forward` (as `attach()` sets its own); at the module's first call in training mode with grad
    enabled it puts the previous forward back, runs `optimize(module, example_inputs=args, example_kwargs=kwargs,
    **options())` (the options are read then: the loop's optimizer exists by that time), attaches the result,
    hands it to `ready(fm)` and runs that first call through it, so the first step is like every other (ALaST's
    token budgets, the loss reading). Calls before it (evaluation, no grad) run the previous forward."""

    def __init__(self, module: torch.nn.Module, options, ready):
        self.options = options
        self.ready = ready
        self.waiting = True  # (a flag, not "am I the module's forward": a wrapper set on top still calls this one)
        super().__init__(module, module.__dict__.get("forward"))

    def __call__(self, *args, **kwargs):
        module = self._model()
        if module is None or not self.waiting or not (module.training and torch.is_grad_enabled()):
            return self.original(*args, **kwargs)
        if torch.compiler.is_compiling():  # (the loop compiled the model: Trainer(torch_compile=True)) optimize()
            torch.compiler.disable(self._start)(module, args, kwargs)  # runs outside the trace
        else:
            self._start(module, args, kwargs)
        return module.forward(*args, **kwargs)  # the attached FrozenModule's

    def _start(self, module, args, kwargs) -> None:
        self.cancel()
        earlier = attached_to(module)
        if earlier is not None:  # an earlier run that ended with an error never detached
            warnings.warn("frzcompile: a FrozenModule from an earlier run was still attached to the model (the run "
                          "did not end normally); releasing it and starting a new one", stacklevel=3)
            earlier.release()
        earlier = optimized_by(module)
        if earlier is not None:  # an earlier run's (a second trainer.train()): its job is done, its hooks go
            earlier.release()
        fm = optimize(module, example_inputs=tuple(args), example_kwargs=dict(kwargs), **self.options())
        fm.attach()
        self.ready(fm)

    def cancel(self) -> None:
        self.waiting = False
        self.remove()
