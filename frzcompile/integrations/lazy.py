"""`optimize()` at a module's first training call: training loops that own the model (Trainer, Lightning) give no
example batch up front, and drawing one from their data loader would consume its random numbers."""
from __future__ import annotations

import inspect
import warnings

import torch

from ..api import optimize, optimized_by
from ..errors import ConfigError
from ..runtime import attached_to

# optimize()'s keyword arguments that a callback fills in itself
_FILLED = ("model", "example_inputs", "example_kwargs")


def check_options(options: dict, owner: str) -> None:
    """Refuse an option `optimize()` does not take, naming the ones it does."""
    known = [n for n in inspect.signature(optimize).parameters if n not in _FILLED]
    unknown = [k for k in options if k not in known]
    if unknown:
        raise ConfigError(f"{owner} got {', '.join(map(repr, unknown))}: it takes optimize()'s options "
                          f"({', '.join(known)})")


class OptimizeAtFirstCall:
    """Registers a forward pre-hook on `module`; at the module's first call in training mode with grad enabled it
    removes itself, runs `optimize(module, example_inputs=args, example_kwargs=kwargs, **options())` (the
    options are read then: the loop's optimizer exists by that time), attaches the result and hands it to
    `ready(fm)`. That first call itself runs the model's own forward (torch looks the
    forward up before the pre-hooks run) with the plan `ready` may have loaded already applied."""

    def __init__(self, module: torch.nn.Module, options, ready):
        self.options = options
        self.ready = ready
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    @property
    def waiting(self) -> bool:
        return self.handle is not None

    def _hook(self, module, args, kwargs):
        if torch.compiler.is_compiling():  # (the loop compiled the model: Trainer(torch_compile=True)) optimize()
            return torch.compiler.disable(self._hook)(module, args, kwargs)  # runs outside the trace
        if not (module.training and torch.is_grad_enabled()):
            return None
        self.cancel()
        earlier = attached_to(module)
        if earlier is not None:  # an earlier run that ended with an error never detached
            warnings.warn("frzcompile: a FrozenModule from an earlier run was still attached to the model (the run "
                          "did not end normally); releasing it and starting a new one", stacklevel=2)
            earlier.release()
        earlier = optimized_by(module)
        if earlier is not None:  # an earlier run's (a second trainer.train()): its job is done, its hooks go
            earlier.release()
        fm = optimize(module, example_inputs=tuple(args), example_kwargs=dict(kwargs), **self.options())
        fm.attach()
        self.ready(fm)
        return None

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
