"""optimize()'s marker on a model's modules: the live FrozenModules each module is part of, held weakly, so that a
second optimize() of the model, or of a model sharing a module with it (a shared backbone), can warn, and the
integrations can find the FrozenModule made for a model. `fm.release()` takes its entries off."""
from __future__ import annotations

import weakref

PART_OF = "_frzcompile_part_of"  # each module's attribute: an Owner per live FrozenModule whose model holds it


class Owner:
    """A weak reference to a FrozenModule. A copy of the model carries an empty one, a pickle None
    (`torch.save(model)` loads where frzcompile is not installed)."""

    __slots__ = ("ref",)

    def __init__(self, fm=None):
        self.ref = weakref.ref(fm) if fm is not None else None

    def live(self):
        """The FrozenModule, unless it is gone or released."""
        fm = self.ref() if self.ref is not None else None
        return fm if fm is not None and not fm.released else None

    def holds(self, model) -> bool:
        """Whether `model` is the live FrozenModule's model."""
        fm = self.live()
        return fm is not None and fm.__dict__.get("_model") is model

    def holds_part(self, module) -> bool:
        """Whether `module` is still inside the model of the live FrozenModule."""
        fm = self.live()
        return fm is not None and any(m is module for m in fm.__dict__["_model"].modules())

    def __reduce__(self):
        return type(None), ()

    def __deepcopy__(self, memo):
        return Owner()


def owners(module) -> list:
    """The Owners of live FrozenModules listed on `module`, oldest first."""
    parts = module.__dict__.get(PART_OF)
    return [p for p in parts if isinstance(p, Owner) and p.live() is not None] if isinstance(parts, list) else []


def mark(model, fm) -> None:
    """List `fm` on every module of its model (entries of FrozenModules gone or released are dropped)."""
    owner = Owner(fm)
    for module in model.modules():
        module.__dict__[PART_OF] = owners(module) + [owner]


def unmark(model, fm) -> None:
    """Take `fm`'s entries, and those of FrozenModules gone or released, off the model's modules."""
    for module in model.modules():
        if PART_OF in module.__dict__:
            kept = [p for p in owners(module) if p.ref() is not fm]
            if kept:
                module.__dict__[PART_OF] = kept
            else:
                del module.__dict__[PART_OF]


def made_for(model):
    """The live FrozenModule optimize() made last for `model` itself (not for a model holding it), or None."""
    return next((p.live() for p in reversed(owners(model)) if p.holds(model)), None)
