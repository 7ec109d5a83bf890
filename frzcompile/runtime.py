"""The runtime: `FrozenModule`, the wrapped model users train.

It owns the freeze plan (which units are frozen, since when), applies it to parameters (`requires_grad`,
gradients, optimizer state) and to module modes (frozen units stay in eval mode through `train()`), asks the
policy after every optimizer step, and runs the graph the passes built for the current plan. Graphs are keyed
by the plan itself, so a plan change can never run a graph built for another plan.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import time
import warnings
from collections import OrderedDict

import torch
import torch.utils._pytree as pytree
from torch import nn

from .activation_cache import ActivationCache, region_example_args
from .activation_store import CacheConfig
from .capture import Captured, clone_graph_module
from .errors import InputMismatchError, PlanError
from .passes import PassContext, run_passes
from .policies import Policy, TrainingView
from .units import UnitGraph

log = logging.getLogger("frzcompile")

FREEZE_STATE_FORMAT = "frzcompile.freeze-state/1"
_GRAPH_CACHE_SIZE = 4  # graphs kept for recent (plan, mode) keys, e.g. train and eval of the current plan


def _hook_ids(model: nn.Module) -> tuple:
    """Ids of every module hook registered on the model; a compiled graph is only valid for the same hooks."""
    return tuple(k for m in model.modules() for hooks in (
        m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks) for k in hooks)


class FrozenModule(nn.Module):
    """A model whose frozen units cost nothing to train. Call it exactly as the model.

    Its parameters, buffers and `state_dict` are the model's own (same objects, same keys): the state dict
    loads back into the original model. The freeze plan travels separately in `freeze_state_dict()`.
    """

    def __init__(self, model: nn.Module, captured: Captured, unit_graph: UnitGraph, policy: Policy,
                 optimizers=(), example_inputs=(), example_kwargs=None, total_steps=None,
                 cache: CacheConfig | None = None, compile_options: dict | None = None, sparsity=None):
        super().__init__()
        # Adopt the model's children, parameters and buffers so that names and state_dict keys are the model's.
        for name, child in model._modules.items():
            self._modules[name] = child
        for name, p in model._parameters.items():
            self._parameters[name] = p
        for name, b in model._buffers.items():
            self._buffers[name] = b
        self._non_persistent_buffers_set = set(model._non_persistent_buffers_set)
        self.training = model.training
        state = self.__dict__  # plain attributes: nn.Module.__setattr__ would register graph modules as children
        state["_model"] = model
        state["_captured"] = captured
        state["_unit_graph"] = unit_graph
        state["_policy"] = policy
        state["_optimizers"] = list(optimizers)
        state["_example"] = (tuple(example_inputs), dict(example_kwargs or {}))
        state["_total_steps"] = total_steps
        state["_frozen"] = frozenset()
        state["_since"] = {}
        state["_step"] = 0
        state["_graphs"] = OrderedDict()
        state["_last_ctx"] = None
        state["_builds"] = 0
        state["_build_seconds"] = 0.0
        state["_plan_changes"] = []           # (step, frozen tuple, reason)
        state["_unit_flops"] = None
        state["_hooks"] = []
        state["_initial_requires_grad"] = {id(p): p.requires_grad for p in model.parameters()}
        state["_cache"] = ActivationCache(cache, self._weights_version) if cache is not None else None
        state["_compile_options"] = compile_options  # None: run frzcompile's own graphs; else torch.compile
        state["_compiled"] = OrderedDict()            # plan key -> torch.compile'd model for that plan
        state["_eager_plans"] = []                    # plan keys Dynamo compiled no graph for (recompile limit)
        state["_sparsity"] = None
        state["_dense_grads"] = {}                    # RigL: dense gradients of masked weights, this step
        if sparsity is not None:
            from .sparsity.training import SparseTraining

            state["_sparsity"] = SparseTraining(sparsity, model, unit_graph, total_steps, self._optimizers)
        self._view = TrainingView(self)
        if self._optimizers:
            self._hooks.append(self._optimizers[0].register_step_post_hook(lambda *a, **k: self.step()))
            for opt in self._optimizers:
                self._hooks.append(opt.register_step_pre_hook(self._drop_frozen_grads))
        policy.bind(self._view)

    # -- public API -------------------------------------------------------------------------------------
    @property
    def units(self) -> list:
        """Unit names (module paths) in topological order."""
        return self._unit_graph.names

    @property
    def frozen(self) -> tuple:
        return tuple(u for u in self.units if u in self._frozen)

    @property
    def frozen_prefix(self) -> tuple:
        return tuple(self._unit_graph.prefix(self._frozen))

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def capture_method(self) -> str:
        return self._captured.method

    @property
    def model(self) -> nn.Module:
        return self._model

    def freeze(self, *names: str) -> None:
        self._set_plan(self._frozen | set(self._unit_graph.check(names)), reason="freeze()")

    def unfreeze(self, *names: str) -> None:
        self._set_plan(self._frozen - set(self._unit_graph.check(names)), reason="unfreeze()")

    def step(self) -> None:
        """Count one training step and let the policy decide. Called by the optimizer hook when `optimize`
        was given an optimizer; call it yourself after each optimizer step otherwise."""
        self._step += 1
        if self._sparsity is not None:
            from .passes.sparsify import DENSE_GRAD_SINKS

            for t in self._sparsity.targets.values():
                DENSE_GRAD_SINKS.pop(id(t.mask), None)
            self._sparsity.after_step(self._step, self._dense_grads)
            self._dense_grads.clear()
        decision = self._policy.decide(self._view)
        if decision is None:
            return
        new = frozenset(self._unit_graph.check(decision))
        if new != self._frozen:
            self._set_plan(new, reason=f"policy {self._policy.name}")

    def forward(self, *args, **kwargs):
        self._enforce_frozen_eval()
        if self._sparsity is not None and self.training and self._sparsity.wants_dense_grads(self._step):
            from .passes.sparsify import DENSE_GRAD_SINKS

            for name, t in self._sparsity.trainable().items():
                DENSE_GRAD_SINKS[id(t.mask)] = (self._dense_grads, name)
        if self._compile_options is not None:
            return self._compiled_call(args, kwargs)
        if self._captured.method == "export":
            self._check_call(args, kwargs)
        return self._graph()(*args, **kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        self._model.training = mode
        self._enforce_frozen_eval()
        return self

    def graph_module(self):
        """The rewritten GraphModule for the current plan and mode (what `forward` runs)."""
        return self._graph()

    def unit_flops(self) -> dict:
        """Forward FLOPs per unit on the example inputs, counted by torch.utils.flop_counter."""
        if self._unit_flops is None:
            from .explain import count_unit_flops

            self.__dict__["_unit_flops"] = count_unit_flops(self)
        return dict(self._unit_flops)

    # -- activation cache --------------------------------------------------------------------------------
    @property
    def sparsity(self):
        """The SparseTraining (masks, schedule, early-bird state; None unless optimize(..., sparsity=...))."""
        return self._sparsity

    @property
    def sieve(self):
        """The SieveSampler given in SparsityConfig(sieve=...), or None."""
        return self._sparsity.config.sieve if self._sparsity is not None else None

    @property
    def cache(self):
        """The ActivationCache (None unless optimize(..., cache=...))."""
        return self._cache

    def sample_ids(self, ids):
        """`with fm.sample_ids(ids): out = fm(x)` -- keys for CacheConfig(key="sample_id")."""
        if self._cache is None:
            raise ValueError("sample ids are only used by the activation cache: optimize(..., cache=CacheConfig(...))")
        return self._cache.using_sample_ids(ids)

    def warm_cache(self, batches, progress: bool = True) -> int:
        """Fill the cache for the current frozen prefix from an iterable of batches (each a tensor, a tuple of
        positional arguments, or a dict of keyword arguments), running only the frozen prefix. Returns the
        number of samples looked at."""
        from tqdm.auto import tqdm

        if self._cache is None or not self.frozen_prefix:
            raise ValueError("warm_cache needs optimize(..., cache=...) and a frozen prefix")
        gm = self._graph()
        region = gm.frozen_prefix
        if not hasattr(region, "cache"):
            raise ValueError(f"the current prefix is not cached: {self._cache.report(self.frozen_prefix)['decision']}")
        seen = 0
        total = len(batches) if hasattr(batches, "__len__") else None
        self._enforce_frozen_eval()
        for batch in tqdm(batches, total=total, desc="filling activation cache", unit="batch",
                          disable=not progress):
            args, kwargs = ((), batch) if isinstance(batch, dict) else ((batch,), {}) if isinstance(
                batch, torch.Tensor) else (tuple(batch), {})
            region_args = region_example_args(gm, region, args, kwargs)
            with torch.no_grad():
                region(*region_args)
            seen += next(a.shape[0] for a in region_args if isinstance(a, torch.Tensor) and a.dim() > 0)
        return seen

    def _weights_version(self, prefix) -> tuple:
        """Changes whenever a weight or buffer of the prefix is replaced or changed in place (tensor version
        counters), so the cache can never serve activations computed with other weights."""
        units = self._unit_graph.units
        tensors = []
        for u in prefix:
            tensors += units[u].params
            tensors += [b for m in units[u].modules for b in m.buffers(recurse=False)]
        return tuple((id(t), t._version) for t in tensors)

    # -- checkpointing -----------------------------------------------------------------------------------
    def freeze_state_dict(self) -> dict:
        """The freeze plan, step counter and policy state; save it beside `state_dict()` and the optimizer."""
        return {
            "format": FREEZE_STATE_FORMAT,
            "units": self.units,
            "frozen": list(self.frozen),
            "since": dict(self._since),
            "step": self._step,
            "policy": {"name": self._policy.name, "state": self._policy.state_dict()},
            "sparsity": self._sparsity.state_dict() if self._sparsity is not None else None,
        }

    def load_freeze_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != FREEZE_STATE_FORMAT:
            raise PlanError("not a frzcompile freeze state (expected the dict from fm.freeze_state_dict())")
        if list(state["units"]) != self.units:
            raise PlanError(
                f"the saved freeze state has units {state['units']}, this model has {self.units}; "
                "it was saved from a different model or unit selection"
            )
        if state["policy"]["name"] != self._policy.name:
            raise PlanError(f"the saved policy is {state['policy']['name']!r}, this one is {self._policy.name!r}")
        if (state.get("sparsity") is None) != (self._sparsity is None):
            raise PlanError("the saved freeze state and this module disagree on sparsity= (one has masks, the "
                            "other not)")
        self._policy.load_state_dict(state["policy"]["state"])
        if self._sparsity is not None:
            self._sparsity.load_state_dict(state["sparsity"])
        self.__dict__["_step"] = int(state["step"])
        self._set_plan(frozenset(state["frozen"]), reason="load_freeze_state_dict()")
        self.__dict__["_since"] = {u: int(s) for u, s in state["since"].items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if assign:
            self._resync()
        return result

    # -- internals ---------------------------------------------------------------------------------------
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # fall back to the wrapped model's attributes (e.g. a Hugging Face model's `config`)
            model = self.__dict__.get("_model")
            if model is None:
                raise
            return getattr(model, name)

    def _set_plan(self, frozen: frozenset, reason: str) -> None:
        frozen = frozenset(frozen)
        if len(frozen) == len(self.units):
            raise PlanError(
                f"freezing every unit ({', '.join(self.units)}) leaves nothing to train; keep at least one "
                "unit trainable"
            )
        newly_frozen = frozen - self._frozen
        thawed = self._frozen - frozen
        units = self._unit_graph.units
        for u in newly_frozen:
            for p in units[u].params:
                p.requires_grad_(False)
                p.grad = None
                for opt in self._optimizers:
                    opt.state.pop(p, None)  # momentum / Adam moments of a frozen weight are dropped
            self._since[u] = self._step
            if self._sparsity is not None:
                self._sparsity.fold({id(p) for p in units[u].params})
        for u in thawed:
            if self._sparsity is not None:
                self._sparsity.unfold({id(p) for p in units[u].params})
            for p in units[u].params:
                p.requires_grad_(self._initial_requires_grad.get(id(p), True))
            for m in units[u].modules:
                m.training = self.training
            self._since.pop(u, None)
        self.__dict__["_frozen"] = frozen
        if self._cache is not None:
            self._cache.on_plan_change(frozen)
        self._enforce_frozen_eval()
        self._plan_changes.append((self._step, self.frozen, reason))
        log.info("step %d: frozen=%s (%s)", self._step, list(self.frozen), reason)

    def _enforce_frozen_eval(self) -> None:
        units = self._unit_graph.units
        for u in self._frozen:
            for m in units[u].modules:
                m.training = False

    def _drop_frozen_grads(self, *args, **kwargs) -> None:
        """Optimizer pre-step guard: a frozen parameter carries no gradient, so no optimizer touches it."""
        units = self._unit_graph.units
        for u in self._frozen:
            for p in units[u].params:
                if p.grad is not None:
                    p.grad = None

    def _graph(self):
        key = (self._frozen, self.training)
        gm = self._graphs.get(key)
        if gm is None:
            gm = self._build(key)
            self._graphs[key] = gm
            while len(self._graphs) > _GRAPH_CACHE_SIZE:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        return gm

    def _build(self, key):
        frozen, training = key
        start = time.perf_counter()
        ctx = PassContext(
            node_unit={n.name: u for n, u in self._unit_graph.node_unit.items()},
            frozen=frozen,
            prefix=tuple(self._unit_graph.prefix(frozen)),
            training=training,
            cache=self._cache,
            sparsity=self._sparsity,
            example=self._example,
            build=self._builds,
            model_name=type(self._model).__name__,
        )
        gm = run_passes(clone_graph_module(self._captured.gm), ctx)
        self.__dict__["_builds"] = self._builds + 1
        self.__dict__["_build_seconds"] = self._build_seconds + time.perf_counter() - start
        self.__dict__["_last_ctx"] = ctx
        return gm

    def _compiled_call(self, args, kwargs):
        """Run the model through torch.compile with the frzcompile backend, one backend object per plan.

        Dynamo keeps compiled graphs per backend object, so a new plan (frozen set, mode, or hooks added since)
        gets a new backend and therefore a recompile that does not depend on Dynamo noticing the change itself
        (it has missed `requires_grad` changes before, pytorch/pytorch#139476, and it ignores hooks added after
        compiling). Returning to an earlier plan reuses its graphs."""
        from . import backend

        key = (self._frozen, self.training, _hook_ids(self._model))
        compiled = self._compiled.get(key)
        if compiled is not None:
            self._compiled.move_to_end(key)
            return compiled(*args, **kwargs)
        units = self._unit_graph.units
        names = {id(p): n for n, p in self._model.named_parameters()}
        frozen = [names[id(p)] for u in self._frozen for p in units[u].params if id(p) in names]
        options = {**self._compile_options, "plan": key, "frozen": frozen}
        compiled = torch.compile(self._model, backend=functools.partial(backend.frzcompile_backend, options=options))
        self._compiled[key] = compiled
        while len(self._compiled) > _GRAPH_CACHE_SIZE:
            self._compiled.popitem(last=False)
        before = sum(r.plan == key for r in backend.compile_log)
        raising = self._compile_options.get("on_budget") == "raise"
        try:
            # on_budget="raise": Dynamo must fail rather than fall back to eager for this plan
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True) if raising else contextlib.nullcontext():
                out = compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            del self._compiled[key]
            if isinstance(e.inner_exception, backend.RecompileBudgetError):
                raise e.inner_exception from None
            raise
        except torch._dynamo.exc.FailOnRecompileLimitHit as e:
            del self._compiled[key]
            raise backend.RecompileBudgetError(
                f"no graph could be compiled for the plan frozen={list(self.frozen)}: Dynamo hit "
                f"torch._dynamo.config.recompile_limit ({torch._dynamo.config.recompile_limit})") from e
        if sum(r.plan == key for r in backend.compile_log) == before:
            self._eager_plans.append(key)
            warnings.warn(
                f"frzcompile: Dynamo compiled no graph for the plan frozen={list(self.frozen)} (it hit "
                f"torch._dynamo.config.recompile_limit={torch._dynamo.config.recompile_limit}, or skipped the frame)"
                "; this plan runs eagerly: correct, but without compiled kernels",
                backend.RecompileBudgetWarning, stacklevel=3)
        return out

    def _check_call(self, args, kwargs) -> None:
        _, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        if spec != self._captured.in_spec:
            raise InputMismatchError(
                f"{type(self._model).__name__} was captured by torch.export for calls shaped like\n  "
                f"{self._captured.in_spec}\nbut was called with\n  {spec}\nPass the same arguments (by the same "
                "names) as example_inputs/example_kwargs, or call optimize() again with these."
            )

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._model._parameters.update(self._parameters)
        self._model._buffers.update(self._buffers)
        self._resync()
        return self

    def _resync(self) -> None:
        """Point the captured graph at the model's current tensors (after .to(), load_state_dict(assign=True))."""
        model_tensors = dict(self._model.named_parameters(remove_duplicate=False))
        model_tensors.update(self._model.named_buffers(remove_duplicate=False))
        gm = self._captured.gm
        for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(
            gm.named_buffers(remove_duplicate=False)
        ):
            new = model_tensors.get(name)
            if new is not None and new is not t:
                owner_name, _, attr = name.rpartition(".")
                owner = gm.get_submodule(owner_name) if owner_name else gm
                if attr in owner._parameters:
                    owner._parameters[attr] = new
                else:
                    owner._buffers[attr] = new
        self._graphs.clear()
        if self._cache is not None:
            self._cache.clear()  # cached tensors belong to the old device/dtype
