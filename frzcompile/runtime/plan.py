"""The freeze plan, and what applying it means for parameters, optimizers and modules.

A frozen unit's parameters stop requiring grad, lose their gradient and their optimizer state, and its
modules run in eval mode (re-applied before every call, because `model.train()` on the user's own variable
switches them back). That is exactly what freezing by hand does, so the model's own forward runs the frozen
prefix without autograd whenever nothing flowing into it requires grad. A gradient already there when its
parameter freezes (a freeze between `backward()` and `opt.step()`, in the middle of gradient accumulation) is
applied by the next step of the optimizers holding it, with its optimizer state, as freezing by hand does; both
go after that step. (A zero-filled gradient, `zero_grad(set_to_none=False)`, goes at once: applied, it would only
move the frozen weight through momentum or weight decay.) A frozen parameter the user sets `requires_grad_(True)`
on by hand trains, as it would.
"""
from __future__ import annotations

import logging
import warnings
import weakref
from dataclasses import dataclass

import torch

from .. import torch_private
from ..errors import PlanError
from ..units import UnitGraph

log = logging.getLogger("frzcompile")


class ByParameter:
    """parameter -> value, keyed by the parameter's id, the parameter itself kept beside the value so that a
    lookup can check it (while an entry holds it, its id cannot pass to another tensor: a layer swapped in twice
    took the old layer's flags). No weak reference to a parameter: torch.utils.swap_tensors, which .to(), .double()
    and load_state_dict use under torch.__future__.set_swap_module_params_on_conversion(True) and for tensor
    subclasses, refuses a tensor that has one. `keep_only` drops parameters that left the model. A dict lookup
    (ALaST reads every layer parameter's flag at each call)."""

    def __init__(self, items=()):
        self._entries: dict = {}
        for p, value in items:
            self[p] = value

    def __setitem__(self, p, value) -> None:
        self._entries[id(p)] = (p, value)

    def get(self, p, default=None):
        entry = self._entries.get(id(p))
        return entry[1] if entry is not None and entry[0] is p else default

    def __contains__(self, p) -> bool:
        entry = self._entries.get(id(p))
        return entry is not None and entry[0] is p

    def pop(self, p, default=None):
        value = self.get(p, default)
        self._entries.pop(id(p), None)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def keep_only(self, params) -> None:
        """Forget every parameter not in `params` (ones replaced in the model are not kept alive)."""
        ids = {id(p) for p in params}
        self._entries = {i: entry for i, entry in self._entries.items() if i in ids}


@dataclass(frozen=True)
class PlanChange:
    """What one plan change did, handed to the runtime's services."""

    frozen: frozenset      # the whole new frozen set
    newly_frozen: frozenset
    thawed: frozenset
    prefix: tuple          # the new frozen prefix, in topological order
    step: int
    reason: str


def _drop_state(optimizers, p) -> None:
    """Drop `p`'s own optimizer state. LBFGS keeps one state for all its parameters under the first one (its
    history of steps): that is not `p`'s, and stays."""
    for opt in optimizers:
        if not isinstance(opt, torch.optim.LBFGS):
            opt.state.pop(p, None)


MAX_CHANGES = 1000  # plan changes kept in the log (newest)


class FreezePlan:
    """Which units are frozen, since which step, and the log of changes."""

    def __init__(self, unit_graph: UnitGraph):
        self.unit_graph = unit_graph
        self.frozen: frozenset = frozenset()
        self.since: dict = {}
        self.changes: list = []  # (step, frozen units in order, reason), the newest MAX_CHANGES
        self.change_count = 0    # all of them
        self._initial_requires_grad = ByParameter(  # parameter -> its flag to give back
            (p, p.requires_grad) for u in unit_graph.units.values() for p in u.params)
        self._default_by_name = {n: p.requires_grad for u in unit_graph.units.values()
                                 for n, p in zip(u.param_names, u.params)}  # what a replacement inherits
        self._frozen_modules: list = []
        self._eval_flags: tuple = ()      # the frozen modules' flags right after the last eval() of their units
        self._param_names = None          # (plan, names) of the frozen parameters, for the compiled path
        self._in_flight: dict = {}        # id -> frozen parameter whose gradient the next step still applies
        self.keep_in_flight = True        # False under DDP: a pending gradient may not be all-reduced yet
        self._states_clean = weakref.WeakKeyDictionary()  # optimizer -> no state loaded since its last step
        self.whole: dict = {}             # module path frozen as a whole -> (module, its units): freeze_whole
        self._frozen_memo = None          # (frozen set, its parameters, their ids): frozen_params
        self.switched_off = ByParameter()  # parameter a service turned off until the next step (ALaST's layers
                                           # not drawn) -> its flag before (the user's)
        self.pinned: set = set()          # units the user froze with fm.freeze (and has not unfrozen): no policy
                                          # plan thaws them

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
        """The frozen units' parameters (a list kept per plan and binding: read at every optimizer step)."""
        if self._frozen_memo is None or self._frozen_memo[0] is not self.frozen:
            units = self.unit_graph.units
            params = [p for u in self.frozen for p in units[u].params]
            self._frozen_memo = (self.frozen, params, {id(p) for p in params})
        return self._frozen_memo[1]

    @property
    def in_flight(self) -> bool:
        """Whether a frozen parameter still waits for a step to apply its gradient."""
        return bool(self._in_flight)

    def apply(self, frozen, *, step: int, optimizers, training: bool, reason: str, others=(),
              applied=frozenset()) -> PlanChange:
        """`others`: parameters added to the model since optimize(); one outside every unit that trains (a head
        added later) leaves something to train whatever the plan. `applied`: ids of the parameters whose gradients
        an optimizer step has already applied (since the last call with grad enabled): never kept for a step in
        flight."""
        frozen = frozenset(frozen)
        units = self.unit_graph.units
        trainable = [u for u, unit in units.items()  # (a unit not frozen trains as its flags say now)
                     if any(self.trainable_by_default(p) if u in self.frozen else p.requires_grad
                            for p in unit.params)]
        in_units = {id(p) for unit in units.values() for p in unit.params}
        # (a model that trains nothing already, a distillation teacher frozen by hand, may freeze every unit)
        if frozen and trainable and all(u in frozen for u in trainable) and \
                not any(p.requires_grad for p in others if id(p) not in in_units):
            outside = [p for p in self.unit_graph.outside if p.requires_grad]
            raise PlanError(
                f"freezing {', '.join(self.ordered(frozen))} leaves nothing to train (the units left hold no "
                "trainable parameters of their own); keep at least one unit with trainable parameters" +
                (f" ({len(outside)} trainable parameters belong to no unit: modules the example batch never called, "
                 "which may be all that trains, or may train only in calls the example did not make, such as "
                 "training calls past an early exit taken in eval: then pass units=[...] or an example that "
                 "reaches them)" if outside else "")
            )
        newly, thawed = frozen - self.frozen, self.frozen - frozen
        for u in newly:
            for name, p in zip(units[u].param_names, units[u].params):
                # a thaw gives back the flag it has now: the user may have frozen it, or unfrozen it, by hand (one a
                # service switched off for this step, the flag it had before)
                self._initial_requires_grad[p] = self._default_by_name[name] = \
                    self.switched_off.pop(p, p.requires_grad)
                p.requires_grad_(False)
                if self.keep_in_flight and p.grad is not None and id(p) not in applied and bool(p.grad.any()):
                    # the step in flight applies it; released after that step (a zero-filled one is not a gradient)
                    self._in_flight[id(p)] = p
                    continue
                p.grad = None
                _drop_state(optimizers, p)  # momentum / Adam moments of a frozen weight are dropped
            self.since[u] = step
        for u in thawed:
            for p in units[u].params:
                self._in_flight.pop(id(p), None)
                p.requires_grad_(self.trainable_by_default(p))
            for root in units[u].roots:
                root.train(training)
            self.since.pop(u, None)
        for path, (module, under) in list(self.whole.items()):
            if not under <= frozen:  # one of its units thawed: no longer frozen as a whole
                if under <= self.frozen:
                    module.train(training)  # (its units still frozen go back to eval below)
                del self.whole[path]
        self.frozen = frozen
        self._frozen_modules = self._eval_modules()
        self._eval_flags = None
        self.enforce_eval()
        change = PlanChange(frozen, newly, thawed, self.prefix, step, reason)
        self.changes.append((step, self.ordered(), reason))
        self.change_count += 1
        del self.changes[:-MAX_CHANGES]  # (a loop toggling units by hand: the newest are kept)
        log.info("step %d: frozen=%s (%s)", step, list(self.ordered()), reason)
        return change

    def trainable_by_default(self, p) -> bool:
        """Whether `p` required grad when its unit was last frozen (what thawing gives back); for a parameter
        never frozen, whether it did at optimize()."""
        return self._initial_requires_grad.get(p, True)

    def set_trainable_by_default(self, p, value: bool, name: str | None = None) -> None:
        self._initial_requires_grad[p] = bool(value)
        if name is not None:  # (what a parameter replacing it under that name inherits: rebind)
            self._default_by_name[name] = bool(value)

    def rebind(self, model, training: bool) -> None:
        """After the model's structure changed: units re-read their parameters and modules by path, and the
        plan is applied to the new ones. A parameter that replaces one of the same name (a swapped submodule,
        `load_state_dict(assign=True)`) takes its predecessor's place: frozen in a frozen unit, and trainable
        again on a thaw if its predecessor was. A parameter under a new name (a LoRA adapter added to a frozen
        layer) keeps its own requires_grad, as it would by hand, and so does one the plan knew already (the user
        may have set it by hand). What `torch.func.functional_call` puts in the model's slots for one call (tensors,
        or another model's parameters) is the caller's: left alone."""
        units = self.unit_graph.units
        frozen_names = {n for u in self.frozen for n in units[u].param_names}
        self.unit_graph.bind(model)
        self._frozen_memo = None
        if self.unit_graph.moved:
            warnings.warn("frzcompile: the model's structure changed after optimize(), and units are bound to module "
                          f"paths: {'; '.join(self.unit_graph.moved[:3])}. Freezing by unit name now acts on other "
                          "modules than before: a module now at a frozen unit's path runs in eval mode there, its "
                          "parameters frozen if they are new to the model, keeping their flags if they trained "
                          "elsewhere in it; call optimize() again on the changed model (fm.release() first).",
                          UserWarning, stacklevel=2)
        callers = torch_private.inside_functional_call()
        if not callers:  # (functional_call puts the caller's tensors in the slots for one call: the model's own stay)
            self._initial_requires_grad.keep_only(model.parameters())
        for u, unit in units.items():
            for name, p in zip(unit.param_names, unit.params):
                if not isinstance(p, torch.nn.Parameter) or callers or p in self._initial_requires_grad:
                    continue
                default = self._default_by_name.setdefault(name, p.requires_grad)
                self._initial_requires_grad[p] = default
                if u in self.frozen and name in frozen_names:
                    p.requires_grad_(False)
                    p.grad = None
        for path, (module, under) in list(self.whole.items()):
            try:
                self.whole[path] = (model.get_submodule(path), under)
            except AttributeError:
                del self.whole[path]
        self._frozen_modules = self._eval_modules()
        self._eval_flags = None
        self._param_names = None
        self.enforce_eval()

    def freeze_whole(self, path: str, module, units) -> None:
        """`fm.freeze(path)` of a module path holding units (`"encoder"`): while all of them stay frozen, the module
        is in eval mode as a whole, as `encoder.eval()` would put it, its modules outside every unit (a dropout
        beside its layers) included. A policy's plan names units, whose modules alone go to eval."""
        self.whole[path] = (module, frozenset(units))

    def _eval_roots(self) -> list:
        """The modules `eval()` is called on: each frozen unit's, and each module frozen as a whole."""
        units = self.unit_graph.units
        roots = [root for u in self.ordered() for root in units[u].roots]
        return roots + [m for m, under in self.whole.values() if under <= self.frozen]

    def _eval_modules(self) -> list:
        return list({id(m): m for root in self._eval_roots() for m in root.modules()}.values())

    def enforce_eval(self) -> None:
        """Frozen units (and modules frozen as a whole) back in eval mode through `eval()` on each unit's module,
        as freezing by hand does (the user's `model.train()` may have switched them); a no-op while nothing
        changed since the last time."""
        flags = tuple(m.training for m in self._frozen_modules)
        if flags == self._eval_flags:
            return
        for root in self._eval_roots():
            root.eval()
        self._eval_flags = tuple(m.training for m in self._frozen_modules)

    def state_tensors(self, prefix, extra=()) -> list:
        """The parameters and buffers of the prefix's units, then `extra`."""
        units = self.unit_graph.units
        tensors = []
        for u in prefix:
            tensors += units[u].params
            tensors += [b for m in units[u].modules for b in m.buffers(recurse=False)]
        return tensors + list(extra)

    def state_version(self, prefix, extra=()) -> tuple:
        """Changes whenever a parameter or buffer of the prefix's units, or one of `extra`, is replaced, changed
        in place (version counter) or moved (storage, dtype, device, memory layout), so the activation cache never
        serves activations computed with other weights. (`.data` edits move no version counter: see the cache's
        content digest.)"""
        return tuple((id(t), torch_private.tensor_version(t), t.dtype, t.device, t.data_ptr(), t.stride())
                     for t in self.state_tensors(prefix, extra))

    def frozen_param_names(self, model) -> list:
        """Names of the frozen parameters (looked up once per plan), but for one the user made require grad
        again by hand (it trains, as it would)."""
        if self._param_names is None or self._param_names[0] != self.frozen:
            names = {id(p): n for n, p in model.named_parameters()}
            self._param_names = (self.frozen, [(names[id(p)], p) for p in self.frozen_params() if id(p) in names])
        return [n for n, p in self._param_names[1] if not p.requires_grad]

    def drop_frozen_grads(self, optimizer=None) -> None:
        """Before an optimizer step: a frozen parameter carries no gradient, so no optimizer touches it (a zeroed
        one, `zero_grad(set_to_none=False)`, would move it through momentum or weight decay), except one whose
        gradient this step still applies (frozen after its backward) or one the user made require grad again.
        `optimizer` (the one about to step): when it holds fewer parameters than are frozen (one optimizer per
        parameter, stepped in the backward), only its own are looked at."""
        params = self.frozen_params()
        if not params:
            return
        if optimizer is not None and sum(len(g["params"]) for g in optimizer.param_groups) < len(params):
            ids = self._frozen_memo[2]
            params = [p for g in optimizer.param_groups for p in g["params"] if id(p) in ids]
        for p in params:
            if p.grad is not None and not p.requires_grad and id(p) not in self._in_flight:
                p.grad = None

    def drop_loaded_state(self, optimizer) -> None:
        """Before a step of an optimizer first seen or whose state was loaded since its last step
        (`opt.load_state_dict`: a checkpoint saved before a waiting plan applied, or loaded after the freeze
        state): frozen parameters hold no state in it, as on any freeze."""
        clean = self._states_clean.get(optimizer)
        if clean:
            return
        if clean is None:  # first seen: hear of every later load (a post-load hook, torch's public API)
            me = weakref.ref(self)

            def loaded(opt):
                plan = me()
                if plan is not None:
                    plan._states_clean[opt] = False
            optimizer.register_load_state_dict_post_hook(loaded)
        self._states_clean[optimizer] = True
        for p in self.frozen_params():
            if not p.requires_grad and id(p) not in self._in_flight:
                _drop_state([optimizer], p)

    @staticmethod
    def fresh_momentum_for_fused_sgd(optimizer) -> None:
        """Before a step: torch's fused SGD needs a momentum buffer for every parameter of a group that steps or
        for none (`_fused_sgd`), but a freeze drops a parameter's buffer and a thaw (or `requires_grad_(True)` by
        hand) brings it back without one. Where a group mixes the two, the missing buffers start at zero, which
        is exactly a fresh buffer's first step with the default dampening 0 (`momentum * 0 + grad`), whatever
        the gradient (inf under a GradScaler included); with dampening d that first step is (1 - d) of a fresh
        one's."""
        if not isinstance(optimizer, torch.optim.SGD):
            return
        state = optimizer.state
        for g in optimizer.param_groups:
            if not g.get("fused") or not g.get("momentum"):
                continue
            held = [p for p in g["params"] if p.grad is not None]
            missing = [p for p in held if state.get(p, {}).get("momentum_buffer") is None]
            if missing and len(missing) < len(held):
                for p in missing:
                    state[p]["momentum_buffer"] = torch.zeros_like(p)

    def drop_spent_in_flight(self, optimizer, optimizers) -> None:
        """Before a step of `optimizer`: a gradient kept for a step in flight that is gone or zero-filled by now (a
        step GradScaler skipped, then `zero_grad()`) is no gradient: dropped with its state, as a freeze finding it
        so drops it (a read of the plan before that zeroing then changes nothing)."""
        self._release(optimizers, optimizer, lambda p: p.grad is None or not bool(p.grad.any()))

    def release_in_flight(self, optimizers, stepped=None) -> None:
        """After a step of the optimizer `stepped` (None: any step, `fm.step()`): the frozen parameters whose
        pending gradient it applied lose that gradient and, in `optimizers`, their state, as on any freeze."""
        if self._in_flight:
            self._release(optimizers, stepped)

    def _release(self, optimizers, optimizer=None, spent=None) -> None:
        """The parameters kept for a step in flight that `optimizer` holds (None: all), and `spent` picks (None:
        all), lose their gradient and, in `optimizers`, their state."""
        held = None if optimizer is None else {id(p) for g in optimizer.param_groups for p in g["params"]}
        for key, p in list(self._in_flight.items()):
            if (held is None or key in held) and (spent is None or spent(p)):
                del self._in_flight[key]
                p.grad = None
                _drop_state(optimizers, p)
