"""The hook points through which optional services (the activation cache, sparse training) join the runtime.

A service overrides only what it needs; every default does nothing. The FrozenModule calls:
  - `call(run, args, kwargs)` around every call of the model (`run(args, kwargs)` runs the rest of the chain);
  - `on_plan(change, analysis)` after each plan change (`analysis()` gives the passes' context for the new plan,
    built on first use);
  - `before_optimizer_step(optimizer)` before the step of every optimizer holding the model's parameters;
  - `on_optimizer_step(optimizer)` after the step of every optimizer holding the model's parameters;
  - `after_step(step)` after each counted training step, before the policy decides;
  - `on_structure_change()` when a submodule or parameter of the model was replaced (also by
    `load_state_dict(assign=True)`), seen before the next call;
  - `on_tensors_moved()` after `fm.to()`, `fm.half()` and the like;
  - `state_dict()` / `load_state_dict(state)` with the freeze state, `report()` for `explain`, `close()`.
"""
from __future__ import annotations

# Set on a callable that frzcompile installed as a module's `forward` (block-sparse routing), so that other parts
# of frzcompile can tell it from a forward replaced by other code.
FORWARD_MARK = "_frzcompile_forward"


class Service:
    name = "service"

    def call(self, run, args, kwargs):
        return run(args, kwargs)

    def on_plan(self, change, analysis) -> None:
        pass

    def before_optimizer_step(self, optimizer) -> None:
        pass

    def on_optimizer_step(self, optimizer) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def on_structure_change(self) -> None:
        pass

    def on_tensors_moved(self) -> None:
        pass

    def state_dict(self):
        return None

    def load_state_dict(self, state) -> None:
        pass

    def report(self):
        return None

    def close(self) -> None:
        pass


def chain(services, innermost):
    """One callable `(args, kwargs) -> output` running each service's `call` around the next, `innermost` last."""
    run = innermost
    for service in reversed(list(services)):
        run = _link(service, run)
    return run


def _link(service, inner):
    def run(args, kwargs):
        return service.call(inner, args, kwargs)

    return run
