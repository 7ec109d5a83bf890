"""`FrozenModule`: the module users train. It is the user's model minus the frozen work.

Calling it runs the model's own forward (or, with `compile=`, Dynamo's graphs of it), so modes, hooks,
attributes, submodules swapped after `optimize()`, any arguments and shapes, input gradients and random numbers
are exactly the model's. What frzcompile adds is the plan: frozen units' parameters stop requiring grad and
lose gradient and optimizer state, their modules stay in eval mode through `model.train()`, the policy decides
after every optimizer step, and optional services (the activation cache, sparse training) hook into the call.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import warnings
import weakref

import torch
from torch import nn

from .. import torch_private
from ..capture import Captured
from ..errors import ConfigError, PlanError, PolicyError, caller_stacklevel
from ..policies import Manual, Policy, TrainingView
from ..units import UnitGraph
from .analysis import Analysis
from . import markers
from .loss import DESCRIPTIONS as LOSS_SOURCES, LossSignal
from .plan import FreezePlan, PlanChange
from .services import Service, chain
from .steps import StepDriver

FREEZE_STATE_FORMAT = "frzcompile.freeze-state/1"
NO_STEP_WARNING_CALLS = 100  # training calls without an optimizer step before frzcompile warns
NO_LOSS_WARNING_STEPS = 50    # steps without any loss signal before frzcompile warns
BOUND_TO = "_frzcompile_bound_to"  # a policy's attribute: a weak reference to the FrozenModule it decides for


def check_unbound(policy) -> None:
    """A policy object decides for one FrozenModule at a time: it keeps its run's state."""
    driving = getattr(policy, BOUND_TO, lambda: None)()
    if driving is not None and not driving.released:
        raise PolicyError(f"this {type(policy).__name__} object already decides for another FrozenModule, and a "
                          "policy keeps its run's state (its step counts, windows, total_steps): give each "
                          "optimize() its own (a name, or a new object), or fm.release() the other first")


def _call_model(model, args, kwargs):
    return model(*args, **kwargs)


def weak_method(method):
    """A function calling `method` while its object lives (and returning None after): callbacks held by the
    model, the optimizers or global hooks must not keep a FrozenModule alive."""
    ref = weakref.WeakMethod(method)

    def call(*args, **kwargs):
        bound = ref()
        return None if bound is None else bound(*args, **kwargs)

    return call


class InstanceForward:
    """A callable set as a model's `forward` instance attribute in place of the `previous` one (None: the class's),
    with the model's signature; tools reading the forward's code see the model's own, and a copy of the model
    (deepcopy, pickle) gets its class's plain forward back. `remove()` puts the previous one back."""

    def __init__(self, model, previous):
        self._model = weakref.ref(model)
        self._previous = previous
        self.original = model.forward
        functools.update_wrapper(self, self.original, updated=())  # name, doc, __wrapped__; not its __dict__
        try:
            self.__signature__ = inspect.signature(self.original)
        except (TypeError, ValueError):
            pass
        model.__dict__["forward"] = self

    def __getattr__(self, name):
        """The wrapped function's code, for tools that read it from `model.forward` (torch.export reads
        `__code__`, torch.jit.script `__globals__`): they see the model's own forward."""
        if name in ("__code__", "__globals__", "__func__", "__self__", "__defaults__", "__kwdefaults__",
                    "__closure__"):
            return getattr(self.__dict__["original"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def remove(self) -> None:
        model = self._model()
        if model is not None and model.__dict__.get("forward") is self:
            if self._previous is None:
                del model.__dict__["forward"]
            else:
                model.__dict__["forward"] = self._previous

    def __deepcopy__(self, memo):
        model = self._model()
        copy_ = memo.get(id(model)) if model is not None else None
        return plain_forward(copy_) if copy_ is not None else self.original

    def __reduce__(self):
        # the class's forward bound to the model, unpickled without frzcompile (the instance's attributes are not
        # set yet when it is looked up: an attached model's pickle loads as a plain one where frzcompile is absent)
        return getattr, (self._model(), "forward")


class AttachedForward(InstanceForward):
    """The model's `forward` while a FrozenModule is attached: a call of the model runs through the FrozenModule
    (or straight to the model's previous forward when made from inside the FrozenModule's own call, or after
    the FrozenModule is gone)."""

    def __init__(self, fm, model):
        previous = model.__dict__.get("forward")  # an instance forward set before (None: the class's)
        if isinstance(previous, AttachedForward):  # left by a FrozenModule never detached (an interrupted run)
            owner = previous._fm() if previous._fm is not None else None
            if owner is not None and owner.__dict__.get("_attached") is previous:
                raise ConfigError("another FrozenModule is attached to this model: call .detach() on it first")
            previous.remove()
            previous = model.__dict__.get("forward")
        self._fm = weakref.ref(fm)
        super().__init__(model, previous)

    def __call__(self, *args, **kwargs):
        fm = self._fm() if self._fm is not None else None
        if fm is None or fm.__dict__["_inside"]:
            return self.original(*args, **kwargs)
        return fm._call(args, kwargs, fm.__dict__["_run_attached"])

    def call_original(self, args, kwargs):
        return self.original(*args, **kwargs)

    def remove(self) -> None:
        self._fm = None  # a wrapper set on top of this one since (accelerate's autocast) now passes straight through
        super().remove()


def plain_forward(module):
    """The module's class's own forward, bound to it (what a copy of a module whose forward frzcompile replaced
    gets: a plain module)."""
    return type(module).forward.__get__(module)


def attached_to(model):
    """The FrozenModule attached to `model` (see FrozenModule.attach), or None."""
    forward = model.__dict__.get("forward")
    if not isinstance(forward, AttachedForward) or forward._fm is None:
        return None
    fm = forward._fm()
    return fm if fm is not None and fm.__dict__.get("_attached") is forward else None


class NoStepWarning(UserWarning):
    """Training calls keep coming but no optimizer step was seen, so the policy never runs."""


class NoLossWarning(UserWarning):
    """Training steps keep coming but no training loss was seen, so a policy with safety rules never freezes."""


class ResumeWarning(UserWarning):
    """An optimizer that has stepped before meets a policy at step 0: a run resumed without its freeze state starts
    the policy over."""


class FrozenModule(nn.Module):
    """A model whose frozen units cost nothing to train. Call it exactly as the model.

    Its parameters, buffers, submodules and `state_dict` are the model's own (the same objects and keys), and
    setting a submodule or attribute on it sets it on the model. The freeze plan travels separately in
    `freeze_state_dict()`.
    """

    def __init__(self, model: nn.Module, captured: Captured, unit_graph: UnitGraph, policy: Policy,
                 optimizers=(), total_steps=None, compile_config=None):
        super().__init__()
        torch_private.share_module_state(self, model)  # a submodule or parameter set on either is set on both
        state = self.__dict__  # plain attributes: nn.Module.__setattr__ would register modules as children
        state["_model"] = model
        state["_captured"] = captured
        state["_unit_graph"] = unit_graph
        state["_plan"] = FreezePlan(unit_graph)
        state["_analysis"] = Analysis(model, captured, unit_graph)
        state["_policy"] = policy
        state["_total_steps"] = total_steps
        state["_step"] = 0
        state["_services"] = []
        state["_run"] = chain((), functools.partial(_call_model, model))
        state["_attached"] = None   # the AttachedForward set as the model's forward by attach(), or None
        state["_run_attached"] = None
        state["_inside"] = False    # inside a call of fm: the model's own call runs its original forward
        state["_structure"] = torch_private.structure_ids(model)
        state["_calls_since_step"] = 0
        state["_pending"] = None  # a plan decided at the last step, applied before the next call (see _settle)
        state["_resume_checked"] = False  # the first optimizer step looked for state of earlier steps (a resume)
        state["_loss"] = LossSignal()
        state["_compiled"] = None
        if compile_config is not None:
            from .compiled import CompiledExecutor

            state["_compiled"] = CompiledExecutor(model, compile_config)
        state["_captured_params"] = {id(p) for p in model.parameters()}  # (one added later may be all that trains)
        state["_driver"] = StepDriver(model.parameters(), weak_method(self._before_optimizer_step),
                                      weak_method(self._after_optimizer_step), weak_method(self._count_step),
                                      optimizers)
        state["_view"] = TrainingView(weakref.proxy(self))
        policy.bind(self._view)  # (optimize() checked that no other FrozenModule holds it: check_unbound)
        setattr(policy, BOUND_TO, weakref.ref(self))
        # the loss signal is collected for the policies that read it (Policy.reads_loss)
        self._loss.enabled = bool(policy.reads_loss)
        # `inspect.signature(fm.forward)` is the model's (Hugging Face Trainer reads it to pick input columns)
        forward = functools.partial(FrozenModule.forward, weakref.proxy(self))
        try:
            forward.__signature__ = inspect.signature(model.forward)
        except (TypeError, ValueError):
            pass
        state["forward"] = forward

    def add_service(self, service: Service) -> None:
        """Join an optional service (see frzcompile.runtime.services); services added later run inside the
        earlier ones' `call`."""
        self._services.append(service)
        self._build_chains()
        service.on_plan(PlanChange(self._plan.frozen, self._plan.frozen, frozenset(), self._plan.prefix, self._step,
                                   "service added"), self._current_analysis)

    def _build_chains(self) -> None:
        state = self.__dict__
        state["_run"] = chain(self._services, functools.partial(_call_model, self._model))
        attached = state["_attached"]
        state["_run_attached"] = None if attached is None else chain(self._services, attached.call_original)

    # -- what the model is ---------------------------------------------------------------------------------
    @property
    def training(self) -> bool:
        model = self.__dict__.get("_model")
        return self.__dict__.get("_training", True) if model is None else model.training

    @training.setter
    def training(self, mode: bool) -> None:
        model = self.__dict__.get("_model")
        if model is None:
            self.__dict__["_training"] = mode  # nn.Module.__init__, before the model is attached
        else:
            model.training = mode

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def units(self) -> list:
        """Unit names (module paths) in topological order."""
        return self._unit_graph.names

    @property
    def unit_graph(self) -> UnitGraph:
        return self._unit_graph

    @property
    def frozen(self) -> tuple:
        self._settle()
        return self._plan.ordered()

    @property
    def frozen_prefix(self) -> tuple:
        self._settle()
        return self._plan.prefix

    @property
    def plan(self) -> FreezePlan:
        self._settle()
        return self._plan

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def step_count(self) -> int:
        """Training steps counted so far (optimizer steps, or calls of `step()`)."""
        return self._step

    @property
    def total_steps(self):
        return self._total_steps

    @property
    def capture_method(self) -> str:
        return self._captured.method

    @property
    def analysis(self) -> Analysis:
        return self._analysis

    @property
    def services(self) -> list:
        return list(self._services)

    @property
    def compiled(self):
        """The compiled path (`optimize(..., compile=...)`), or None."""
        return self._compiled

    @property
    def cache(self):
        """The ActivationCache (None unless optimize(..., cache=...))."""
        return self._service("cache")

    @property
    def sparsity(self):
        """The SparseTraining (masks, schedule, early-bird state; None unless optimize(..., sparsity=...))."""
        return self._service("sparsity")

    @property
    def sieve(self):
        """The SieveSampler given in SparsityConfig(sieve=...), or None."""
        return self.sparsity.config.sieve if self.sparsity is not None else None

    @property
    def token_budgets(self):
        """The ALaST LayerBudgets runtime (its layers, hooks and compiled layer graphs; None unless
        policy="alast"). The budgets themselves are fm.policy's."""
        return self._service("alast")

    def _service(self, name: str):
        return next((s for s in self._services if s.name == name), None)

    def optimizers(self) -> list:
        """The optimizers seen training the model's parameters (given to optimize(), or seen stepping)."""
        return self._driver.optimizers

    # -- the plan ------------------------------------------------------------------------------------------
    def freeze(self, *names: str) -> None:
        """Freeze units, each named by its unit name or by any module path holding units (`"bert.encoder"`)."""
        self._check_live()  # (a released one changes the model no more)
        self._settle()
        self._rebind_if_changed()  # a block or parameters replaced since the last call: freeze the new ones
        units = set(self._unit_graph.resolve(names, warn_merged=True))
        self._warn_tied(units)
        self._warn_joined(units)
        before = dict(self._plan.whole)
        for n in names:  # a module path holding units: in eval as a whole while they stay frozen
            if str(n) not in self._unit_graph.units:
                module = self._model.get_submodule(str(n))
                self._plan.freeze_whole(str(n), module, self._unit_graph.resolve([n]))
                self._warn_outside_units(str(n), module)
        try:
            self._set_plan(self._plan.frozen | units, reason="freeze()")
        except PlanError:
            self._plan.whole = before
            raise
        self._plan.pinned |= units
        self._policy.on_user_freeze(units)

    def _warn_nested_encoder(self) -> None:
        """Warn when an nn.TransformerEncoder that runs on nested tensors now has its first layer frozen (so in
        eval) and a later one training: PyTorch decides from its first layer alone, and its next call with a
        padding mask fails inside torch ("MultiheadAttention does not support NestedTensor outside of its fast
        path"), as it does when freezing by hand, maybe hundreds of steps after a policy's freeze."""
        frozen = {id(m) for u in self._plan.frozen for m in self._unit_graph.units[u].modules}
        for path, m in self._model.named_modules():
            if torch_private.runs_nested_tensors(m) and len(m.layers) > 1 and id(m.layers[0]) in frozen \
                    and any(id(layer) not in frozen for layer in m.layers[1:]):
                warnings.warn(f"frzcompile: {path or 'the model'} is an nn.TransformerEncoder with enable_nested_"
                              "tensor=True whose first layer is now frozen (in eval) while a later one trains: "
                              "called with a padding mask, PyTorch then fails inside it, as it would frozen by "
                              "hand. Build it with enable_nested_tensor=False, or call "
                              "torch.backends.mha.set_fastpath_enabled(False) before training.", UserWarning,
                              stacklevel=4)

    def _warn_outside_units(self, path, module) -> None:
        """Warn when a module path asked to freeze holds parameters of no unit (a module the example batch never
        called: an expert no sample was routed to): they stay trainable, where requires_grad_(False) on the
        module would freeze them."""
        ids = {id(p) for p in self._unit_graph.outside}
        outside = [f"{path}.{name}" for name, p in module.named_parameters() if id(p) in ids and p.requires_grad]
        if outside:
            warnings.warn(f"frzcompile: freezing {path!r} leaves {len(outside)} of its parameters trainable "
                          f"({', '.join(outside[:3])}{', ...' if len(outside) > 3 else ''}): they belong to no unit, "
                          "because the example batch given to optimize() never called their modules. Give "
                          "optimize() an example that reaches them, or call requires_grad_(False) on them.",
                          UserWarning, stacklevel=3)

    def _warn_tied(self, units) -> None:
        """Warn when a unit asked to freeze holds a weight tied to another unit, which owns it and stays trainable
        (a head tied to the embedding): freezing the unit does not freeze that weight, where requires_grad_(False)
        on the module would freeze it for both."""
        all_units = self._unit_graph.units
        frozen = units | set(self._plan.frozen)
        owner = {id(p): u for u in all_units for p in all_units[u].params}
        for u in sorted(units):
            tied = sorted({(name, owner[id(p)]) for m in all_units[u].roots for name, p in m.named_parameters()
                           if owner.get(id(p), u) not in frozen})
            if tied:
                name, other = tied[0]
                warnings.warn(f"frzcompile: unit {u!r} holds {name!r}, a weight tied to unit {other!r}, which owns it "
                              f"and stays trainable: freezing {u!r} does not freeze it (requires_grad_(False) on the "
                              f"module would). Freeze {other!r} too to freeze it for both.", UserWarning,
                              stacklevel=3)

    def _warn_joined(self, units) -> None:
        """Warn when a unit asked to freeze holds a trainable parameter from outside its modules (a root-level
        nn.Parameter joins the unit whose output the code reading it consumes: open_clip's
        `logit_scale * img @ txt.t()` joins the image tower's last unit): freezing the unit freezes it too, where
        requires_grad_(False) on the unit's modules would not."""
        for u in sorted(units - set(self._plan.frozen)):
            unit = self._unit_graph.units[u]
            inside = {id(p) for m in unit.roots for p in m.parameters()}
            joined = [n for n, p in zip(unit.param_names, unit.params) if id(p) not in inside and p.requires_grad]
            if joined:
                warnings.warn(f"frzcompile: freezing unit {u!r} also freezes {', '.join(map(repr, joined))}, from "
                              f"outside its modules: code reading it runs on {u!r}'s output, so it joined that "
                              "unit (requires_grad_(False) on the unit's modules would leave it training). Set "
                              "requires_grad_(True) on it after this freeze to keep training it" +
                              (" (the activation cache then steps aside while that unit is frozen)."
                               if self.cache is not None else "."), UserWarning, stacklevel=3)

    def unfreeze(self, *names: str) -> None:
        self._check_live()  # (a released one changes the model no more)
        self._settle()
        self._rebind_if_changed()
        units = set(self._unit_graph.resolve(names))
        thawed = units & self._plan.frozen
        self._set_plan(self._plan.frozen - units, reason="unfreeze()")
        self._plan.pinned -= units
        still = [u for u in self._unit_graph.names if u in thawed and self._unit_graph.units[u].params  # (ALaST
                 and not any(self._plan.trainable_by_default(p) for p in self._unit_graph.units[u].params)]  # may
        # have switched a layer off for this step alone: what counts is the flag a thaw gives back)
        if still:  # (a thaw gives back the flags of before the freeze: frozen by hand, or by an earlier optimize())
            warnings.warn(f"frzcompile: unfreeze({', '.join(map(repr, still))}): their parameters did not require "
                          "grad when they were frozen (by hand, or by an earlier FrozenModule of this model), or were "
                          "added under new names while frozen (a fusion, a parametrization: they copied the frozen "
                          "weight's requires_grad=False), so they stay frozen. Set requires_grad_(True) on them to "
                          "train them.", UserWarning, stacklevel=2)

    def step(self) -> None:
        """Count one training step and let the policy decide. Called after each optimizer step that trains the
        model (any torch optimizer, see frzcompile.runtime.steps); call it yourself with another optimizer, after
        its update and before the gradients are cleared (a policy may read them: autofreeze does)."""
        if self._step == 0 and self._policy.reads_gradients and \
                not any(p.grad is not None for p in self._model.parameters() if p.requires_grad):
            warnings.warn(f"frzcompile: fm.step() found no gradients (zero_grad() before it?), and the "
                          f"{self._policy.name} policy decides on the step's gradients: call fm.step() after the "
                          "optimizer's update and before zero_grad()", NoStepWarning, stacklevel=2)
        self._plan.release_in_flight(self.optimizers())
        self._driver.user_stepped()
        self._count_step()
        self._settle()

    def _count_step(self) -> None:
        """One training step: services update (the sparsity schedule), the policy decides now (gradients and
        weights of this step are there), and its plan waits for `_settle`, so every optimizer of this iteration
        (split parameter groups, a second optimizer) still steps under the plan the step began with, as it would
        when freezing by hand between iterations."""
        self._settle()
        self.__dict__["_step"] = self._step + 1
        self.__dict__["_calls_since_step"] = 0
        self._loss.end_step()
        if self._step == NO_LOSS_WARNING_STEPS and getattr(self._policy, "safeguard", None) is not None and \
                self._policy.reads_loss and not any(v is not None for v in self._loss.floats()):
            warnings.warn(f"frzcompile: {self._step} training steps and no training loss seen, so the "
                          f"{self._policy.name} policy will never freeze (its safety rules read the loss). Call "
                          "fm.observe_loss(loss) after computing it, or return it from the model.", NoLossWarning,
                          stacklevel=3)
        for service in self._services:
            service.after_step(self._step)
        decision = self._policy.decide(self._view)
        if decision is not None:
            self.__dict__["_pending"] = frozenset(self._unit_graph.check(decision))
        self._loss.enabled = bool(self._policy.reads_loss)  # (SmartFRZ steps aside: max_cost; a state loaded)

    def _settle(self, by_owner: bool = False) -> None:
        """Apply the plan the policy decided at the last step (before the next call, or when asked about it).
        With `_plans_applied_by_owner` set, only the owner applies it (`by_owner=True`): a distributed wrapper
        (frzcompile.integrations.ddp) the plan every rank agreed on (reading `fm.frozen` on one rank must not
        apply its own), the Lightning callback under manual optimization at the end of each batch (a call inside
        `toggle_optimizer` would read the flags Lightning set for the other optimizer's step)."""
        pending = self.__dict__.get("_pending")
        if pending is None or (self.__dict__.get("_plans_applied_by_owner") and not by_owner):
            return
        self.__dict__["_pending"] = None
        pending = frozenset(pending) | self._plan.pinned  # a policy never thaws what the user froze
        if pending != self._plan.frozen:
            self._set_plan(pending, reason=f"policy {self._policy.name}")

    def _set_plan(self, frozen: frozenset, reason: str) -> None:
        change = self._plan.apply(frozen, step=self._step, optimizers=self.optimizers(), training=self.training,
                                  reason=reason, others=[p for p in self._model.parameters()
                                                         if id(p) not in self._captured_params],
                                  applied=self._driver.applied_ids())
        if change.newly_frozen:
            self._warn_nested_encoder()
        if self.sparsity is not None:
            self._analysis.invalidate()  # the sparsify pass reads the weights
        for service in self._services:
            service.on_plan(change, self._current_analysis)
        if os.environ.get("FRZ_DEBUG"):
            self._current_analysis()  # write the new plan's graphs now

    def _current_analysis(self):
        return self._analysis.for_plan(self._plan.frozen, self._plan.prefix, **self._pass_options())[1]

    def _pass_options(self) -> dict:
        budgets = self.token_budgets
        return {"cache": self.cache is not None, "sparsity": self.sparsity,
                "token_layers": budgets.layers if budgets is not None else ()}

    def _before_optimizer_step(self, optimizer) -> None:
        if not self._resume_checked:
            self._warn_if_resumed([optimizer])
        if self._plan.in_flight:
            self._plan.drop_spent_in_flight(optimizer, self.optimizers())
        self._plan.drop_frozen_grads(optimizer)
        self._plan.drop_loaded_state(optimizer)
        self._plan.fresh_momentum_for_fused_sgd(optimizer)
        for service in self._services:
            service.before_optimizer_step(optimizer)

    def _warn_if_resumed(self, optimizers) -> None:
        """At the first optimizer step (or when a callback makes fm in the middle of it), a policy at step 0
        meeting an optimizer with state of earlier steps: most often a checkpoint loaded without its freeze state,
        which silently starts the policy over."""
        if self._resume_checked:
            return
        self.__dict__["_resume_checked"] = True  # (once: a step after a loaded freeze state has nothing to say)
        if self._step != 0 or isinstance(self._policy, Manual):
            return
        if any(o.state.get(p) for o in optimizers for g in o.param_groups for p in g["params"]
               if id(p) in self._captured_params):
            warnings.warn(
                f"frzcompile: the optimizer already holds state for the model's parameters (it has stepped before), "
                f"but the {self._policy.name} policy starts at step 0 with nothing frozen. If this run resumes a "
                "checkpoint, load the freeze state saved with it too (fm.load_freeze_state_dict(state), saved from "
                "fm.freeze_state_dict()), or the policy starts over and what it had frozen trains again. If the "
                "model trained before optimize() on purpose (a warm-up, a change of policy), this is expected: "
                "warnings.filterwarnings('ignore', category=frzcompile.ResumeWarning)", ResumeWarning,
                stacklevel=caller_stacklevel())

    def _after_optimizer_step(self, optimizer) -> None:
        if self._plan.in_flight:  # (the optimizers are listed only then: one per parameter is a long list)
            self._plan.release_in_flight(self.optimizers(), stepped=optimizer)
        for service in self._services:
            service.on_optimizer_step(optimizer)

    # -- calling ---------------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        # Without hooks of its own, fm is not a module call of its own: global module hooks see the model's call
        # once, as they would without frzcompile.
        if torch_private.has_call_hooks(self):
            return super().__call__(*args, **kwargs)
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        # (torch.jit.trace and torch.export record the eager model: they refuse a Dynamo-compiled call)
        if self._compiled is not None and not (torch.jit.is_tracing() or torch.compiler.is_exporting()):
            self._sync()
            training = self._count_training_call()
            out = self._compiled(args, kwargs, self._plan.frozen, self._plan.frozen_param_names(self._model))
            if training:
                self._loss.observe_output(out)
            return out
        return self._call(args, kwargs, self._run)

    def _call(self, args, kwargs, run):
        self._sync()
        training = self._count_training_call()
        with self._inside_call():
            out = run(args, kwargs)
        if training:
            self._loss.observe_output(out)
        return out

    def __prepare_scriptable__(self):
        """torch.jit.script(fm) asks this first: scripting needs the model's own forward, which fm wraps."""
        raise ConfigError("torch.jit.script(fm) is not supported: script your model variable (after fm.detach() "
                          "while fm.attach() holds it), or use torch.jit.trace(fm, example) or torch.export.export(fm, "
                          "args), which record fm's call")

    def observe_loss(self, loss) -> None:
        """Give the policy this step's training loss (a tensor or a number). Optional: without it the policy
        reads the loss the model returns, or a proxy from the gradient reaching the model's output."""
        self._loss.observe_loss(loss)

    def losses(self):
        """The training-loss signal, one value per counted step (see frzcompile.runtime.loss)."""
        return self._loss.floats()

    def loss_source(self) -> str:
        """Where the last step's loss signal came from."""
        if not self._loss.enabled:
            if getattr(self._policy, "stepped_aside", None) is not None:
                return f"not read (the {self._policy.name} policy stepped aside: its decisions cost too much)"
            return f"not read (the {self._policy.name} policy does not use it)"
        return LOSS_SOURCES[self._loss.source]

    @contextlib.contextmanager
    def _inside_call(self):
        """While set, a call of the attached model (the services' own runs of it) goes straight to its forward."""
        state = self.__dict__
        outer, state["_inside"] = state["_inside"], True
        try:
            yield
        finally:
            state["_inside"] = outer

    # -- calls of the model itself -----------------------------------------------------------------------------
    def attach(self) -> "FrozenModule":
        """Make calls of the model itself (`model(...)`) run as `fm(...)` does (plan settled, frozen units in
        eval mode, services such as the activation cache), for training loops that hold the model rather than
        `fm` (the Hugging Face and Lightning callbacks of frzcompile.integrations attach for you). It sets the
        model's `forward` as an instance attribute (as accelerate's autocast wrapper does), with the model's
        signature; the model's hooks run as before. `detach()` restores the model's own forward."""
        if self._compiled is not None:
            raise ConfigError("attach() does not combine with compile=: call fm (the compiled module) instead")
        state = self.__dict__
        if state["_attached"] is None:
            state["_attached"] = AttachedForward(self, self._model)
            self._build_chains()
        return self

    def detach(self) -> "FrozenModule":
        """Undo `attach()`: `model(...)` runs the model's own forward again (the plan stays as it is)."""
        attached = self.__dict__["_attached"]
        if attached is not None:
            attached.remove()
            self.__dict__["_attached"] = None
            self._build_chains()
        return self

    @property
    def attached(self) -> bool:
        return self.__dict__["_attached"] is not None

    def release(self) -> None:
        """Let go of the model for good: detached, no more optimizer steps seen (so no policy decision), services
        closed (the activation cache frees its store). The model keeps the plan's frozen parameters and modes, as
        after freezing by hand; `explain` still reads this FrozenModule, but it cannot be called any more."""
        self.detach()
        self._driver.close()
        for service in self._services:
            service.close()
        self.__dict__["_released"] = True
        markers.unmark(self._model, self)  # (optimize()'s markers: the model is left clean)

    @property
    def released(self) -> bool:
        return self.__dict__.get("_released", False)

    def _sync(self) -> None:
        """Before a call: the pending plan applied, units re-bound if the model's structure changed, frozen units
        back in eval mode."""
        self._check_live()
        self._settle()
        self._rebind_if_changed()
        self._plan.enforce_eval()

    def _check_live(self) -> None:
        if self.released:
            raise ConfigError("this FrozenModule was released (fm.release(), or a newer optimize() of its model by "
                              "a callback): call the model itself, or the FrozenModule optimize() gave last")

    def _rebind_if_changed(self) -> None:
        structure = torch_private.structure_ids(self._model)
        if structure != self._structure:
            self._on_structure_change(structure)

    def _count_training_call(self) -> bool:
        """Counts a call made in training mode with grad enabled; returns whether it was one."""
        if not torch.is_grad_enabled():
            return False
        self._driver.saw_call()  # (a backward may follow, in eval mode too: BatchNorm kept in eval by the user)
        if self.training:
            self._driver.saw_forward()
            calls = self._calls_since_step + 1
            self.__dict__["_calls_since_step"] = calls
            # (once a step was counted, or with an optimizer given to optimize(), many calls between steps are
            # gradient accumulation, not a missing step)
            if calls == NO_STEP_WARNING_CALLS and self._step == 0 and not self.optimizers() and \
                    not isinstance(self._policy, Manual):
                warnings.warn(
                    f"frzcompile: {calls} training calls and no optimizer step seen, so the {self._policy.name} "
                    "policy has not run. frzcompile counts steps of torch.optim optimizers holding the model's "
                    "parameters; with another optimizer, call fm.step() after each step (with gradient "
                    "accumulation over this many calls, pass your optimizer to optimize(optimizer=...): then no "
                    "warning).", NoStepWarning,
                    stacklevel=4)
            return True
        return False

    def _on_structure_change(self, structure) -> None:
        self.__dict__["_structure"] = structure
        self._plan.rebind(self._model, self.training)
        self._driver.update_parameters(self._model.parameters())
        self._analysis.invalidate(structure_changed=True)
        self._policy.rebind(self._view)
        for service in self._services:
            service.on_structure_change()

    def train(self, mode: bool = True):
        self._model.train(mode)
        self._plan.enforce_eval()
        return self

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        """The model's modules (the model first), as `model.named_modules()` gives them."""
        return self._model.named_modules(memo, prefix, remove_duplicate)

    def apply(self, fn):
        self._model.apply(fn)
        return self

    def _apply(self, fn, recurse=True):
        torch_private.apply_to_tensors(self._model, fn, recurse)
        for service in self._services:
            service.on_tensors_moved()
        return self

    # -- analysis and inspection -----------------------------------------------------------------------------
    def graph_module(self):
        """The analysis graph rewritten by the passes for the current plan (what `explain` and the FRZ_DEBUG
        dumps show). The model itself is what runs."""
        return self._analysis.for_plan(self._plan.frozen, self._plan.prefix, **self._pass_options())[0]

    def unit_flops(self) -> dict:
        """Forward FLOPs per unit on the example inputs, counted by torch.utils.flop_counter."""
        return self._analysis.unit_flops()

    # -- the activation cache ---------------------------------------------------------------------------------
    def sample_ids(self, ids):
        """`with fm.sample_ids(ids): out = fm(x)` -- keys for CacheConfig(key="sample_id")."""
        if self.cache is None:
            raise ConfigError("sample ids are only used by the activation cache: optimize(..., cache=CacheConfig(...))")
        return self.cache.using_sample_ids(ids)

    def warm_cache(self, batches, progress: bool = True) -> int:
        """Fill the cache for the current frozen prefix from an iterable of batches (each a tensor, a tuple of
        positional arguments, or a dict of keyword arguments), running only the frozen prefix. Entries are keyed
        by the mode fm is in (train or eval), as the calls they serve are: warm in the mode you will call it in.
        Returns the number of samples looked at."""
        if self.cache is None or not self.frozen_prefix:
            raise ConfigError("warm_cache needs optimize(..., cache=...) and a frozen prefix")
        self._sync()
        with self._inside_call():
            return self.cache.warm(batches, self.training, progress=progress)

    # -- checkpointing --------------------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        return self._model.state_dict(*args, **kwargs)

    # state-dict hooks registered through fm land in the model's hook dicts (fm holds them: share_module_state);
    # the one kind torch binds to the registering module is registered on the model, so that the hook gets the
    # model and outlives fm (bound to fm it would hold a dead reference; the public method calls this one)
    def _register_load_state_dict_pre_hook(self, hook, with_module=False):
        return self._model._register_load_state_dict_pre_hook(hook, with_module)

    def _load_from_state_dict(self, *args, **kwargs):
        # a module holding fm loads it through this: the model's own (a class that renames old checkpoint keys,
        # Mamba's and ESM's load pre-hooks on their root) runs, as without frzcompile
        return self._model._load_from_state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = self._model.load_state_dict(state_dict, strict=strict, assign=assign)
        if assign:  # new parameter objects: the plan applies to them now, not at the next call
            self._rebind_if_changed()
        return result

    def freeze_state_dict(self) -> dict:
        """The freeze plan, step counter, policy and service state; save it beside `state_dict()` and the
        optimizer's."""
        self._settle()
        return {
            "format": FREEZE_STATE_FORMAT,
            "units": self.units,
            "frozen": list(self.frozen),
            "whole": {path: sorted(under) for path, (_, under) in self._plan.whole.items()},  # fm.freeze(path)
            "pinned": sorted(self._plan.pinned),  # frozen with fm.freeze: no policy thaws them
            "since": dict(self._plan.since),
            # what thawing gives back to the frozen units' parameters: a model pickled or copied mid-run holds
            # them with requires_grad=False, so a new optimize() of it cannot tell
            "trainable": {n: self._plan.trainable_by_default(p) for u in self.frozen
                          for n, p in zip(self.unit_graph.units[u].param_names, self.unit_graph.units[u].params)},
            "step": self._step,
            # a decision not applied yet (under a distributed wrapper, until the ranks agree at the next call): the
            # policy has spent it, so a resumed run must apply it as the uninterrupted one does
            "pending": sorted(self.__dict__["_pending"]) if self.__dict__.get("_pending") is not None else None,
            "policy": {"name": self._policy.name, "state": self._policy.state_dict()},
            "losses": self._loss.state_dict(),
            "sparsity": self.sparsity.state_dict() if self.sparsity is not None else None,
        }

    def load_freeze_state_dict(self, state: dict) -> None:
        self._check_live()  # (a released one changes the model no more)
        if not isinstance(state, dict) or state.get("format") != FREEZE_STATE_FORMAT:
            raise PlanError("not a frzcompile freeze state (expected the dict from fm.freeze_state_dict())")
        if list(state["units"]) != self.units:
            raise PlanError(
                f"the saved freeze state has units {state['units']}, this model has {self.units}; "
                "it was saved from a different model or unit selection"
            )
        if state["policy"]["name"] != self._policy.name:
            raise PlanError(f"the saved policy is {state['policy']['name']!r}, this one is {self._policy.name!r}: "
                            f"optimize with policy={state['policy']['name']!r} (its options as before) to resume "
                            "the run, or keep only the plan with fm.freeze(*state['frozen'])")
        if (state.get("sparsity") is None) != (self.sparsity is None):
            raise PlanError("the saved freeze state and this module disagree on sparsity= (one has masks, the "
                            "other not)")
        self._rebind_if_changed()  # (after load_state_dict(..., assign=True) the parameters are new objects)
        self._policy.load_state_dict(state["policy"]["state"])
        if state.get("losses") is not None:
            self._loss.load_state_dict(state["losses"])
        else:  # saved before the loss signal existed: one unknown value per step keeps steps and values aligned
            self._loss.load_state_dict({"values": [None] * int(state["step"]), "kind": None})
        self._loss.enabled = bool(self._policy.reads_loss)  # (from the next call: SmartFRZ stepped aside or not)
        if self.sparsity is not None:
            self.sparsity.load_state_dict(state["sparsity"])
        self.__dict__["_pending"] = None
        self.__dict__["_step"] = int(state["step"])
        self._plan.pinned = set(state.get("pinned", ()))  # (saved since it existed)
        self._plan.whole = {}
        for path, under in state.get("whole", {}).items():
            self._plan.freeze_whole(path, self._model.get_submodule(path), under)
        self._set_plan(frozenset(state["frozen"]), reason="load_freeze_state_dict()")
        # what a thaw gives back, as saved (set after the plan: a freeze records the flags it finds)
        trainable = state.get("trainable", {})  # (saved since format 1 gained it; older states lack it)
        for unit in self.unit_graph.units.values():
            for n, p in zip(unit.param_names, unit.params):
                if n in trainable:
                    self._plan.set_trainable_by_default(p, trainable[n], name=n)
        self._plan.since = {u: int(s) for u, s in state["since"].items()}
        if state.get("pending") is not None:  # (saved since distributed runs kept it)
            self.__dict__["_pending"] = frozenset(state["pending"])

    # -- attributes fall through to the model ---------------------------------------------------------------
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_model")
            if model is None:
                raise
            return getattr(model, name)  # e.g. a Hugging Face model's `config`

    def _passes_on(self, name) -> bool:
        """Whether setting or deleting `name` on fm acts on the model: a public name fm does not hold itself (a
        temperature, a swapped head: the model runs with it). A private one stays here: wrappers keep their
        bookkeeping on the module they wrap (accelerate's `_original_forward` beside its autocast `forward`,
        which must find it again on fm), and the user's model must not hold references to fm."""
        return (self.__dict__.get("_model") is not None and not name.startswith("_") and name not in self.__dict__
                and not hasattr(type(self), name))

    def __setattr__(self, name, value):
        if self._passes_on(name):
            setattr(self.__dict__["_model"], name, value)
            return
        super().__setattr__(name, value)

    def __delattr__(self, name):
        if self._passes_on(name):
            delattr(self.__dict__["_model"], name)
            return
        super().__delattr__(name)

    def __deepcopy__(self, memo):
        raise ConfigError("a FrozenModule cannot be copied yet: copy the model (fm.model), call "
                          "frzcompile.optimize on the copy and load fm.freeze_state_dict() into it; for an EMA or "
                          "SWA copy, AveragedModel(model) of the model you passed to optimize(); to checkpoint, "
                          "save fm.state_dict() and fm.freeze_state_dict()")

    def __reduce_ex__(self, protocol):
        raise ConfigError("a FrozenModule cannot be pickled yet (torch.save(fm)): save fm.state_dict() and "
                          "fm.freeze_state_dict(), or pickle the model (fm.model) and fm.freeze_state_dict() (load it into "
                          "the FrozenModule optimize() gives for the unpickled model)")


class FrozenContainer(FrozenModule):
    """The FrozenModule of a model that is a container of modules (nn.Sequential, nn.ModuleList or a subclass):
    `fm[0]`, `fm[-1]`, `fm[1:3]`, `len(fm)`, `for layer in fm` and `reversed(fm)` are the model's. (Special
    methods are looked up on the type, so `__getattr__` cannot pass them on; a FrozenModule of any other model
    keeps `bool(fm)` true and no length, as an nn.Module has.)"""

    def __getitem__(self, index):
        return self._model[index]

    def __len__(self):
        return len(self._model)

    def __iter__(self):
        return iter(self._model)

    def __reversed__(self):
        return reversed(self._model)

    def __contains__(self, module):
        return module in self._model

    def __setitem__(self, index, module):
        self._model[index] = module

    def __delitem__(self, index):
        del self._model[index]

    def __bool__(self):
        return bool(self._model)

    @staticmethod
    def fits(model) -> bool:
        return all(hasattr(type(model), m) for m in ("__getitem__", "__len__", "__iter__"))
