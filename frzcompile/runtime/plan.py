"""The freeze plan, and what applying it means for parameters, optimizers and modules.

A frozen unit's parameters stop requiring grad, lose their gradient and their optimizer state, and its
modules run in eval mode (re-applied before every call, because `model.train()` on the user's own variable
switches them back). That is exactly what freezing by hand does, so the model's own forward runs the frozen
prefix without autograd whenever nothing flowing into it requires grad.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import PlanError
from ..units import UnitGraph

log = logging.getLogger("frzcompile")


@dataclass(frozen=True)
class PlanChange:
    """What one plan change did, handed to the runtime's services."""

    frozen: frozenset      # the whole new frozen set
    newly_frozen: frozenset
    thawed: frozenset
    prefix: tuple          # the new frozen prefix, in topological order
    step: int
    reason: str


class FreezePlan:
    """Which units are frozen, since which step, and the log of changes."""

    def __init__(self, unit_graph: UnitGraph):
        self.unit_graph = unit_graph
        self.frozen: frozenset = frozenset()
        self.since: dict = {}
        self.changes: list = []  # (step, frozen units in order, reason)
        self._initial_requires_grad = {id(p): p.requires_grad for u in unit_graph.units.values() for p in u.params}
        self._frozen_modules: list = []

    @property
    def units(self) -> list:
        return self.unit_graph.names

    @property
    def prefix(self) -> tuple:
        return tuple(self.unit_graph.prefix(self.frozen))

    def ordered(self, frozen=None) -> tuple:
        frozen = self.frozen if frozen is None else frozen
        return tuple(u for u in self.units if u in frozen)

    def frozen_params(self) -> list:
        units = self.unit_graph.units
        return [p for u in self.frozen for p in units[u].params]

    def apply(self, frozen, *, step: int, optimizers, training: bool, reason: str) -> PlanChange:
        frozen = frozenset(frozen)
        if len(frozen) == len(self.units):
            raise PlanError(
                f"freezing every unit ({', '.join(self.units)}) leaves nothing to train; keep at least one "
                "unit trainable"
            )
        units = self.unit_graph.units
        newly, thawed = frozen - self.frozen, self.frozen - frozen
        for u in newly:
            for p in units[u].params:
                p.requires_grad_(False)
                p.grad = None
                for opt in optimizers:
                    opt.state.pop(p, None)  # momentum / Adam moments of a frozen weight are dropped
            self.since[u] = step
        for u in thawed:
            for p in units[u].params:
                p.requires_grad_(self._initial_requires_grad.get(id(p), True))
            for m in units[u].modules:
                m.training = training
            self.since.pop(u, None)
        self.frozen = frozen
        self._frozen_modules = [m for u in self.ordered() for m in units[u].modules]
        self.enforce_eval()
        change = PlanChange(frozen, newly, thawed, self.prefix, step, reason)
        self.changes.append((step, self.ordered(), reason))
        log.info("step %d: frozen=%s (%s)", step, list(self.ordered()), reason)
        return change

    def rebind(self, model, training: bool) -> None:
        """After the model's structure changed: units re-read their parameters and modules by path, and the
        plan is applied to the new ones (a new parameter in a frozen unit is frozen too)."""
        self.unit_graph.bind(model)
        units = self.unit_graph.units
        for u, unit in units.items():
            for p in unit.params:
                if id(p) not in self._initial_requires_grad:
                    self._initial_requires_grad[id(p)] = p.requires_grad
                if u in self.frozen:
                    p.requires_grad_(False)
                    p.grad = None
        self._frozen_modules = [m for u in self.ordered() for m in units[u].modules]
        self.enforce_eval()

    def enforce_eval(self) -> None:
        """Frozen units' modules back in eval mode (the user's `model.train()` may have switched them)."""
        for m in self._frozen_modules:
            if m.training:
                m.training = False

    def drop_frozen_grads(self) -> None:
        """A frozen parameter carries no gradient, so no optimizer touches it."""
        for p in self.frozen_params():
            if p.grad is not None:
                p.grad = None
