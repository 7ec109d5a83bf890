"""Sparse training at run time: which weights are masked, how the masks evolve, and how they meet freezing.

`SparseTraining` (a runtime service) owns one boolean mask per target weight, registered as a buffer
`<attr>_mask` on the module that owns the weight (so masks travel with `state_dict`). The model's own forward
computes with the weight itself, which is kept at exactly zero where masked: masks are applied when set, and
after every optimizer step `after_step` zeroes the masked weights again (so momentum or weight decay cannot
revive them). A tensor hook on each target weight masks its gradient, so a step is that of `weight * mask`,
which the sparsify pass shows in the analysis graph; for RigL the same hook keeps the dense gradient of the
step before an update. Masks change on schedule: a cubic sparsity ramp, MEST or RigL prune-and-grow, or
early-bird ticket detection. Weights of frozen units are left alone: when a unit freezes its masks are folded
into its weights once (`fold`), and no later update touches them (SpFDE's freezing stage); a frozen nn.Linear
the sparsify pass routes to the block-sparse kernel gets a `BlockSparseForward` as its `forward` while frozen.
"""
from __future__ import annotations

import math
import time
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import torch_private
from ..errors import ConfigError
from ..runtime.module import plain_forward
from ..runtime.services import FORWARD_MARK, Service
from ..torch_private import tensor_version

from .early_bird import EarlyBird
from .masks import GROW_METHODS, SCOPES, STRUCTURES, density, magnitude_masks, prune_and_grow, update_fraction
from .sieve import SieveSampler

SOURCES = ("magnitude", "user") + GROW_METHODS
SCHEDULES = ("oneshot", "gradual")
MASKED_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class EarlyBirdConfig:
    """Early-bird tickets (You et al., 2020): train dense, draw the magnitude mask every `interval` steps, and
    prune to it once the last `fifo` masks are all within normalized Hamming distance `threshold` of the newest.
    `structure` (default: the SparsityConfig's) picks unstructured or structured tickets, e.g. "channel"."""

    interval: int = 20
    fifo: int = 5
    threshold: float = 0.1
    structure: str | None = None

    def __post_init__(self):
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ConfigError(f"EarlyBirdConfig.interval must be an int >= 1, got {self.interval!r}")
        if self.structure is not None and self.structure not in STRUCTURES:
            raise ConfigError(f"EarlyBirdConfig.structure must be one of {STRUCTURES} or None, not {self.structure!r}")
        EarlyBird(fifo=self.fifo, threshold=self.threshold)  # checks fifo and threshold


@dataclass
class SparsityConfig:
    """What `frzcompile.optimize(..., sparsity=...)` does; `sparsity=0.8` means `SparsityConfig(0.8)`.

    sparsity: fraction of each target weight set to zero (the N:M structure fixes it at 1 - N/M).
    source: "magnitude" (prune the smallest weights), "user" (the given `masks`), "mest" (magnitude drop, random
        grow) or "rigl" (magnitude drop, gradient grow) prune-and-grow every `update_interval` steps, with a
        fraction starting at `update_fraction` that decays (cosine) to 0 at `update_until` x total_steps.
    structure / block / nm / scope: see `frzcompile.sparsity.magnitude_masks`.
    schedule: for "magnitude", "oneshot" prunes at the start; "gradual" ramps sparsity up cubically (Zhu & Gupta,
        2017) between the `ramp` fractions of total_steps, updating every `update_interval` steps.
    early_bird: an EarlyBirdConfig (or True) trains dense until the ticket is found, then prunes to it.
    sieve: a `frzcompile.SieveSampler` to save, restore and report with the model (data sieving).
    include: parameter names to mask; default every Linear and Conv weight outside the last unit (the head),
        or inside it too with include_head=True. exclude: parameter names or module paths to leave dense.
    ops: further callables (e.g. `torch.ops.aten.embedding.default`, or a module class such as nn.Embedding)
        whose weight should be masked as well.
    block_sparse_threshold: a frozen Linear weight with at least this fraction of empty kernel blocks runs
        through the block-sparse matmul kernel (its PyTorch reference on CPU).
    """

    sparsity: float | None = 0.8
    source: str = "magnitude"
    structure: str = "unstructured"
    block: tuple = (4, 4)
    nm: tuple = (2, 4)
    scope: str = "global"
    masks: dict | None = None
    schedule: str = "oneshot"
    ramp: tuple = (0.0, 0.5)
    update_interval: int = 100
    update_fraction: float = 0.3
    update_until: float = 0.75
    early_bird: EarlyBirdConfig | bool | None = None
    sieve: SieveSampler | None = None
    include: tuple | None = None
    include_head: bool = False
    exclude: tuple = ()
    ops: tuple = ()
    seed: int = 0
    block_sparse_threshold: float = 0.5

    def __post_init__(self):
        self.validate()

    def validate(self) -> SparsityConfig:
        """Check the options (done when the config is built, and again when it is used)."""
        if self.masks is not None and not isinstance(self.masks, dict):
            raise ConfigError(f"masks= takes a dict of parameter name -> bool tensor, not {type(self.masks).__name__}")
        if self.source not in SOURCES:
            raise ConfigError(f"SparsityConfig.source must be one of {SOURCES}, not {self.source!r}")
        if self.structure not in STRUCTURES:
            raise ConfigError(f"SparsityConfig.structure must be one of {STRUCTURES}, not {self.structure!r}")
        if self.scope not in SCOPES:
            raise ConfigError(f"SparsityConfig.scope must be one of {SCOPES}, not {self.scope!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"SparsityConfig.schedule must be one of {SCHEDULES}, not {self.schedule!r}")
        if self.structure != "nm" and self.source != "user" and not (
                isinstance(self.sparsity, (int, float)) and 0 <= self.sparsity < 1):
            raise ConfigError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}")
        if self.source == "user" and not self.masks:
            raise ConfigError("source='user' needs masks={parameter name: bool tensor}")
        if self.masks and self.source != "user":
            raise ConfigError("masks= are only used with source='user'")
        if self.source in GROW_METHODS and self.structure != "unstructured":
            raise ConfigError(f"{self.source} prune-and-grow works on unstructured masks; structure must be "
                             "'unstructured'")
        if self.early_bird is True:
            self.early_bird = EarlyBirdConfig()
        if self.early_bird is False:
            self.early_bird = None
        if self.early_bird is not None and not isinstance(self.early_bird, EarlyBirdConfig):
            raise ConfigError(f"early_bird= takes True or a frzcompile.EarlyBirdConfig(interval=..., fifo=..., "
                              f"threshold=...), not {self.early_bird!r}")
        for name in ("include", "exclude"):
            if isinstance(getattr(self, name), str):
                raise ConfigError(f"SparsityConfig.{name} takes a list of names, not the string "
                                  f"{getattr(self, name)!r}: pass [{getattr(self, name)!r}]")
        if not (isinstance(self.block, (tuple, list)) and len(self.block) == 2
                and all(isinstance(b, int) and (b >= 1 or b == -1) for b in self.block)):
            raise ConfigError(f"SparsityConfig.block must be (rows, columns) of positive ints, or -1 for the full "
                              f"extent ((head_dim, -1) prunes attention heads), got {self.block!r}")
        if self.masks:
            for name, mask in self.masks.items():
                if not isinstance(mask, torch.Tensor) or (mask.dtype != torch.bool and not bool(
                        ((mask == 0) | (mask == 1)).all())):  # (torch.nn.utils.prune's masks are 0/1 floats)
                    raise ConfigError(f"masks[{name!r}] must be a bool tensor, or of 0s and 1s (1 keeps a weight), "
                                      f"not {type(mask).__name__ if not isinstance(mask, torch.Tensor) else 'scores'}")
        if self.early_bird and self.source != "magnitude":
            raise ConfigError("early_bird draws magnitude masks: use it with source='magnitude'")
        if self.early_bird and self.schedule != "oneshot":
            raise ConfigError("early_bird decides when to prune; schedule must stay 'oneshot'")
        if not isinstance(self.update_interval, int) or self.update_interval < 1:
            raise ConfigError(f"update_interval must be an int >= 1, got {self.update_interval!r}")
        for name in ("update_fraction", "update_until", "block_sparse_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ConfigError(f"SparsityConfig.{name} must be a number in [0, 1], got {value!r}")
        ramp = tuple(self.ramp) if isinstance(self.ramp, (tuple, list)) else ()
        if len(ramp) != 2 or not all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in ramp) \
                or not 0 <= ramp[0] < ramp[1] <= 1:
            raise ConfigError(f"SparsityConfig.ramp must be (start, end) fractions of total_steps with "
                              f"0 <= start < end <= 1, got {self.ramp!r}")
        if self.sieve is not None and not isinstance(self.sieve, SieveSampler):
            raise ConfigError(f"sieve= takes a frzcompile.SieveSampler, not {type(self.sieve).__name__}")
        return self


@dataclass
class Target:
    name: str            # parameter name in the model
    module: nn.Module    # its owner
    attr: str            # its attribute on the owner
    unit: str

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.attr)

    @property
    def mask(self) -> torch.Tensor:
        return getattr(self.module, self.attr + "_mask")


def time_ms(fn, rounds: int = 3, device=None) -> float:
    """Median milliseconds of `fn()` over `rounds` after one warm-up, without autograd, `device` synchronised."""
    def sync():
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    with torch.no_grad():
        fn()
        for _ in range(rounds):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(1000 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


class BlockSparseForward:
    """`forward` of a frozen masked nn.Linear while it is routed to the block-sparse kernel: y = x W^T + b over the
    weight's nonzero blocks. The layout is rebuilt whenever the weight changes, and F.linear runs when too few
    blocks are empty, or when the weight was made trainable by hand (the kernel gives it no gradient). A copy or a
    pickle of the model holds the class's own forward (a plain model, loaded without frzcompile).

    A measured cost model picks the path, so that a frozen layer never runs slower than dense: for each kind of
    call (rows rounded up to a power of two, dtype, device, autocast) the first call times the kernel and F.linear
    on its own input (forward, median of 3) and keeps the faster; where the kernel cannot run (no GPU, a dtype it
    does not take) F.linear runs. `paths` holds each decision with its reason, for explain."""

    def __init__(self, module: nn.Linear, threshold: float):
        self.module = module
        self.threshold = threshold
        self._key, self._layout = None, None
        self.paths: dict = {}   # call kind -> (path "kernel" or "dense", why)
        self.timer = time_ms
        setattr(self, FORWARD_MARK, True)

    def layout(self):
        from ..kernels.block_sparse_matmul import BlockSparseWeight

        w = self.module.weight
        key = (tensor_version(w), w.data_ptr(), w.dtype, w.device)
        if key != self._key:
            layout = BlockSparseWeight.from_dense(w.detach())
            self._key, self._layout = key, layout if layout.block_sparsity >= self.threshold else None
            self.paths = {}  # another weight: measure again
        return self._layout

    def __call__(self, input):
        from ..kernels.block_sparse_matmul import block_sparse_linear

        if self.module.weight.requires_grad:  # made trainable by hand: the kernel gives the weight no gradient
            return F.linear(input, self.module.weight, self.module.bias)
        layout = self.layout()
        if layout is None or self._path(input, layout) == "dense":
            return F.linear(input, self.module.weight, self.module.bias)
        return block_sparse_linear(input, layout, self.module.bias)

    def __deepcopy__(self, memo):
        copy_ = memo.get(id(self.module))  # a copy of the model is a plain model: the class's own forward
        return plain_forward(copy_) if copy_ is not None else self

    def __reduce__(self):
        # as the attach forward does: `torch.save(model)` loads where frzcompile is not installed
        return getattr, (self.module, "forward")

    def _path(self, x, layout) -> str:
        from ..kernels.block_sparse_matmul import block_sparse_linear, eligibility

        rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 1
        autocast = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        kind = (1 << max(rows - 1, 0).bit_length(), x.dtype, x.device, autocast)
        choice = self.paths.get(kind)
        if choice is None:
            ok, why = eligibility(x, layout, self.module.bias)
            if not ok:
                choice = ("dense", f"the kernel cannot run here: {why}")
            elif torch.compiler.is_compiling():
                return "kernel"
            else:
                w, b = self.module.weight, self.module.bias
                dense = self.timer(lambda: F.linear(x, w, b), device=x.device)
                kernel = self.timer(lambda: block_sparse_linear(x, layout, b), device=x.device)
                path = "kernel" if kernel < dense else "dense"
                choice = (path, f"{rows} rows, {100 * layout.block_sparsity:.0f}% empty blocks: kernel "
                                f"{kernel:.3f} ms, dense {dense:.3f} ms")
            self.paths[kind] = choice
        return choice[0]

    def describe(self) -> list:
        return [f"<= {kind[0]} rows, {str(kind[1]).replace('torch.', '')} on {kind[2]}: {path} ({why})"
                for kind, (path, why) in self.paths.items()]


def _zero_masked(t) -> None:
    """A target's masked weights to zero, touching the weight (and its version, which the activation cache keys
    frozen weights by) only when one is not: a check outside the training step (one host read)."""
    if (t.weight * ~t.mask).any():
        t.weight.mul_(t.mask)


class SparseTraining(Service):
    """The masks of one FrozenModule and their schedule; see the module docstring.

    optimizers: a callable returning the optimizers training the model now (their state is masked too)."""

    name = "sparsity"

    def __init__(self, config: SparsityConfig, model: nn.Module, unit_graph, total_steps=None,
                 optimizers=lambda: ()):
        self.config = config.validate()
        self.total_steps = total_steps
        self.optimizers = optimizers
        self.step = 0
        self.dense_grads: dict = {}  # RigL: dense gradients of masked weights, for the step before an update
        self._state_masked = weakref.WeakSet()  # optimizers whose state was masked (_mask_state)
        self._record_dense = False
        self._grad_hooks: dict = {}  # name -> (weight, hook handle, its TensorImpl then)
        self.routes: dict = {}       # name -> BlockSparseForward installed on its module
        self._masked_versions: dict = {}  # name -> (weight, mask) versions when last masked (_enforce_changed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.targets = self._select_targets(model, unit_graph)
        if not self.targets:
            conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())  # (transformers' GPT-2 layers)
            raise ConfigError("sparsity= found no weight to mask: no Linear/Conv weight outside the head (pass "
                              "include=[...] or include_head=True)" + (
                                  "; transformers' Conv1D layers (GPT-2's, weights stored (in, out)) are not masked "
                                  "by default: SparsityConfig(..., ops=(transformers.pytorch_utils.Conv1D,)) masks "
                                  "them (unstructured masks; structured ones would prune their inputs)"
                                  if conv1d else ""))
        needs_total = (config.source in GROW_METHODS or config.schedule == "gradual")
        if needs_total and not total_steps:
            raise ConfigError(f"sparsity source={config.source!r} schedule={config.schedule!r} needs total_steps "
                              "in optimize() to plan its updates")
        self.early_bird = None
        if config.early_bird:
            eb = config.early_bird
            self.early_bird = EarlyBird(fifo=eb.fifo, threshold=eb.threshold)
        self.frozen_params: set = set()
        self._layouts = {}          # name -> BlockSparseForward: its frozen Linear's layout, rebuilt per weight version
        self.updates = 0            # mask updates applied (prune-and-grow, ramp steps, tickets)
        self.ramp_progress = 0.0    # schedule="gradual": how far the cubic ramp has gone
        self.last_update_step = None
        for t in self.targets.values():
            t.module.register_buffer(t.attr + "_mask", torch.ones_like(t.weight, dtype=torch.bool))
        if config.source == "user":
            self._set_masks({n: m.to(torch.bool) for n, m in self._user_masks().items()})
        elif config.source in GROW_METHODS or (config.source == "magnitude" and config.schedule == "oneshot"
                                               and not config.early_bird):
            self._set_masks(self._draw(config.sparsity, structure=config.structure))
        self._hook_gradients()
        handles = self._grad_hooks
        weakref.finalize(self, lambda: [h.remove() for _, h, _ in handles.values()])

    # -- hook points (see frzcompile.runtime.services) ---------------------------------------------------
    def call(self, run, args, kwargs):
        self._record_dense = torch.is_grad_enabled() and self.wants_dense_grads(self.step)
        if torch.is_grad_enabled():
            self._hook_gradients()  # a masked weight made trainable by hand since (a no-op for the hooked ones)
        self._enforce_changed()
        return run(args, kwargs)

    @torch.no_grad()
    def _enforce_changed(self) -> None:
        """Masked weights (or masks) changed since they were last masked, outside an optimizer step (a
        `load_state_dict` of dense weights, an edit by hand), are masked again before the call runs on them."""
        for name, t in self.targets.items():
            versions = (tensor_version(t.weight), tensor_version(t.mask))
            if self._masked_versions.get(name) != versions:
                _zero_masked(t)
                self._masked_versions[name] = (tensor_version(t.weight), tensor_version(t.mask))

    def on_plan(self, change, analysis) -> None:
        units = {n: t.unit for n, t in self.targets.items()}
        self.fold({id(self.targets[n].weight) for n, u in units.items() if u in change.newly_frozen})
        self.unfold({id(self.targets[n].weight) for n, u in units.items() if u in change.thawed})
        for name in [n for n in self.routes if units[n] not in change.frozen]:
            self._unroute(name)
        self._hook_gradients()  # thawed weights require grad again
        if any(isinstance(self.targets[n].module, nn.Linear) for n, u in units.items() if u in change.frozen):
            for name in dict.fromkeys(analysis().decisions.get("block_sparse", ())):
                if name not in self.routes:
                    self._route(name)

    def before_optimizer_step(self, optimizer) -> None:
        """Every masked weight's gradient is masked before the step, whatever put it there (a backward before the
        weight was hooked, which the next call does, under gradient accumulation; a gradient set by hand)."""
        with torch.no_grad():
            for t in self.trainable().values():
                if t.weight.grad is not None:
                    t.weight.grad.mul_(t.mask)
            if optimizer not in self._state_masked:  # its first step under the masks: state from before optimize()
                self._state_masked.add(optimizer)  # (dense warm-up steps) must not move masked weights or regrow
                self._mask_state([optimizer], self.targets.values())  # into them (RigL)

    @staticmethod
    def _mask_state(optimizers, targets) -> None:
        for opt in optimizers:
            for t in targets:
                for value in opt.state.get(t.weight, {}).values():
                    if torch.is_tensor(value) and value.shape == t.weight.shape:
                        value.mul_(t.mask)  # no momentum carried into pruned or regrown positions

    def on_optimizer_step(self, optimizer) -> None:
        self.enforce()  # whichever optimizer stepped, masked weights are zero again

    def after_step(self, step: int) -> None:
        self.step = step
        self.after_step_update(step, self.dense_grads)
        self.dense_grads.clear()

    def on_structure_change(self) -> None:
        for name, t in self.targets.items():
            try:
                t.weight
                t.mask
            except AttributeError:
                raise ConfigError(f"the masked weight {name} (or its mask) was removed from the model after "
                                  "optimize(..., sparsity=...); call optimize() again") from None
        self._hook_gradients()

    def on_tensors_moved(self) -> None:
        self._layouts.clear()
        self._hook_gradients()

    def close(self) -> None:
        for _, handle, _ in self._grad_hooks.values():
            handle.remove()
        self._grad_hooks.clear()
        for name in list(self.routes):
            self._unroute(name)

    # -- gradient masks and routing ------------------------------------------------------------------------
    def _hook_gradients(self) -> None:
        """A tensor hook on each target weight masks its gradient (re-hooked when a weight object changed)."""
        me = weakref.ref(self)
        for name, t in self.targets.items():
            weight = t.weight
            current = self._grad_hooks.get(name)
            impl = torch_private.tensor_impl(weight)
            if (current is not None and current[0] is weight and current[2] == impl) or not weight.requires_grad:
                continue  # (a weight that needs no gradient is hooked once it does: on_plan after a thaw)
            if current is not None:
                current[1].remove()
                if current[0] is weight:  # the same tensor, swapped (.double() under swap_module_params_on_...)
                    torch_private.restart_tensor_hooks(weight)

            def mask_grad(grad, name=name):
                sp = me()
                return grad if sp is None else sp._mask_grad(name, grad)

            self._grad_hooks[name] = (weight, weight.register_hook(mask_grad), impl)

    def _mask_grad(self, name, grad):
        if self._record_dense:  # RigL grows where this dense gradient is largest
            prev = self.dense_grads.get(name)
            self.dense_grads[name] = grad.detach().clone() if prev is None else prev + grad
        return grad * self.targets[name].mask

    def _route(self, name) -> None:
        module = self.targets[name].module
        if type(module).forward is not nn.Linear.forward:
            return  # a subclass computes more than x W^T + b
        own = module.__dict__.get("forward")
        if own is not None and not getattr(own, FORWARD_MARK, False):
            return  # someone else replaced this module's forward: leave it alone
        forward = self._forward_of(name)
        module.__dict__["forward"] = forward
        self.routes[name] = forward

    def _unroute(self, name) -> None:
        forward = self.routes.pop(name)
        module = forward.module
        if module.__dict__.get("forward") is forward:
            del module.__dict__["forward"]

    # -- targets ---------------------------------------------------------------------------------------
    def _select_targets(self, model, unit_graph) -> dict:
        cfg = self.config
        param_unit = {}
        for u, unit in unit_graph.units.items():
            for p in unit.params:
                param_unit[id(p)] = u
        head = unit_graph.names[-1]
        # (a head tied to the embedding reads a weight that belongs to the embedding's unit: its module says head)
        head_modules = {id(m) for m in unit_graph.units[head].modules}
        extra_types = tuple(op for op in cfg.ops if isinstance(op, type))
        extra_ops = {op for op in cfg.ops if not isinstance(op, type)}
        # parameters read directly (get_attr) by a call of one of the named ops
        op_params = {str(i.target) for node in unit_graph.node_unit if node.op == "call_function"
                     and node.target in extra_ops for i in node.all_input_nodes if i.op == "get_attr"}
        candidates = {}
        for path, module in model.named_modules():
            for attr, p in module.named_parameters(recurse=False):
                name = f"{path}.{attr}" if path else attr
                if cfg.include is not None:
                    wanted = name in cfg.include or path in cfg.include
                else:
                    layer_weight = attr == "weight" and isinstance(module, MASKED_MODULES + extra_types)
                    wanted = ((layer_weight or name in op_params) and (cfg.include_head or (
                        param_unit.get(id(p)) != head and id(module) not in head_modules)))
                if wanted and name not in cfg.exclude and path not in cfg.exclude:
                    if p.dim() < 2:
                        raise ConfigError(f"{name} has {p.dim()} dimension(s): only weights of 2 or more are masked")
                    candidates[name] = Target(name, module, attr, param_unit.get(id(p), "(outside units)"))
        if cfg.include is not None:
            missing = set(cfg.include) - set(candidates) - {t.name.rpartition(".")[0] for t in candidates.values()}
            if missing:
                raise ConfigError(f"include= names not found among the model's parameters: {sorted(missing)}")
        known = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_modules()}
        unknown = set(cfg.exclude) - known
        if unknown:
            raise ConfigError(f"exclude= names not found among the model's parameters or modules: {sorted(unknown)}")
        return candidates

    def _user_masks(self) -> dict:
        masks = self.config.masks
        unknown = set(masks) - set(self.targets)
        if unknown:
            raise ConfigError(f"masks given for {sorted(unknown)}, which are not masked weights; targets are "
                             f"{sorted(self.targets)[:8]}...")
        for name, m in masks.items():
            if tuple(m.shape) != tuple(self.targets[name].weight.shape):
                raise ConfigError(f"mask for {name} has shape {tuple(m.shape)}, the weight "
                                 f"{tuple(self.targets[name].weight.shape)}")
        return masks

    # -- masks -----------------------------------------------------------------------------------------
    @property
    def masks(self) -> dict:
        return {n: t.mask for n, t in self.targets.items()}

    def trainable(self) -> dict:
        return {n: t for n, t in self.targets.items() if n not in self.frozen_params}

    def _draw(self, sparsity, structure, names=None) -> dict:
        targets = self.trainable() if names is None else {n: self.targets[n] for n in names}
        if not targets:
            return {}
        weights = {n: t.weight.detach() for n, t in targets.items()}
        cfg = self.config
        return magnitude_masks(weights, None if structure == "nm" else sparsity, structure=structure,
                               block=cfg.block, nm=cfg.nm, scope=cfg.scope)

    @torch.no_grad()
    def _set_masks(self, new: dict, grown: dict | None = None) -> None:
        emptied = [name for name, mask in new.items() if mask.numel() and not mask.any()]
        if emptied:
            warnings.warn(f"sparsity: every weight of {', '.join(emptied)} is masked, so what follows it no longer "
                          "depends on its input (a block or channel structure coarser than the layer, or a global "
                          "target that empties it): use smaller blocks, scope='layer' or a lower sparsity",
                          stacklevel=2)
        for name, mask in new.items():
            t = self.targets[name]
            t.mask.copy_(mask.to(t.mask.device))
            t.weight.mul_(t.mask)  # pruned weights are zero, and grown ones start from zero (RigL)
            self._mask_state(self.optimizers() or (), [t])

    @torch.no_grad()
    def enforce(self) -> None:
        """Masked weights back to exactly zero (after an optimizer step)."""
        for name, t in self.trainable().items():
            t.weight.mul_(t.mask)
            self._masked_versions[name] = (tensor_version(t.weight), tensor_version(t.mask))

    def fold(self, unit_params: set) -> None:
        """A unit froze: fold its masks into its weights once; later updates leave them alone."""
        with torch.no_grad():
            for name, t in self.targets.items():
                if id(t.weight) in unit_params and name not in self.frozen_params:
                    _zero_masked(t)
                    self.frozen_params.add(name)

    def unfold(self, unit_params: set) -> None:
        for name, t in self.targets.items():
            if id(t.weight) in unit_params:
                self.frozen_params.discard(name)

    def block_sparse_weight(self, name: str):
        """The block-sparse layout of a frozen nn.Linear weight, or None when too few of its kernel blocks are
        empty (the sparsify pass's decision); the same object later runs as the module's forward."""
        return self._forward_of(name).layout()

    def _forward_of(self, name: str) -> BlockSparseForward:
        forward = self._layouts.get(name)
        if forward is None or forward.module is not self.targets[name].module:
            forward = self._layouts[name] = BlockSparseForward(self.targets[name].module,
                                                               self.config.block_sparse_threshold)
        return forward

    # -- schedule --------------------------------------------------------------------------------------
    def wants_dense_grads(self, step: int) -> bool:
        """RigL grows where the dense gradient is largest: the pass keeps it for the step before an update."""
        cfg = self.config
        return cfg.source == "rigl" and (step + 1) % cfg.update_interval == 0 and self._updating(step + 1)

    def _updating(self, step: int) -> bool:
        return step < self.config.update_until * self.total_steps

    def after_step_update(self, step: int, dense_grads: dict | None = None) -> None:
        """Masked weights back to zero and the mask schedule, after optimizer step number `step` (1-based)."""
        cfg = self.config
        self.enforce()
        due = step % (cfg.early_bird.interval if self.early_bird else cfg.update_interval) == 0
        if not due or not self.trainable():  # (every masked unit frozen: nothing to draw, prune or grow)
            return
        if self.early_bird is not None:
            if not self.early_bird.found:
                eb = cfg.early_bird
                drawn = self._draw(cfg.sparsity, structure=eb.structure or cfg.structure)
                if drawn and self.early_bird.observe(drawn, step=step):  # (nothing to draw: every unit frozen)
                    self._set_masks(drawn)
                    self._updated(step)
        elif cfg.source == "magnitude" and cfg.schedule == "gradual":
            start, end = (f * self.total_steps for f in cfg.ramp)
            if step >= start and self.ramp_progress < 1.0:
                progress = self.ramp_progress = min(1.0, (step - start) / max(end - start, 1))
                self._set_masks(self._draw(cfg.sparsity * (1 - (1 - progress) ** 3), structure=cfg.structure))
                self._updated(step)
        elif cfg.source in GROW_METHODS and self._updating(step):
            fraction = update_fraction(step, math.ceil(cfg.update_until * self.total_steps), cfg.update_fraction)
            targets = self.trainable()
            if not targets:
                return  # every masked unit is frozen: nothing to prune or grow
            if cfg.source == "rigl":
                missing = set(targets) - set(dense_grads or {})
                if missing:
                    return  # no dense gradient was recorded (e.g. the step ran without backward): skip
            new, grown = prune_and_grow({n: t.weight for n, t in targets.items()},
                                        {n: t.mask for n, t in targets.items()}, fraction, method=cfg.source,
                                        grads=dense_grads, generator=self.generator)
            self._set_masks(new, grown)
            self._updated(step)

    def _updated(self, step: int) -> None:
        self.updates += 1
        self.last_update_step = step

    # -- reporting and checkpoints ---------------------------------------------------------------------
    def sparsity_per_unit(self) -> dict:
        """unit -> (masked weights' zeros, masked weights' size)."""
        out = {}
        for t in self.targets.values():
            zeros, size = out.get(t.unit, (0, 0))
            out[t.unit] = (zeros + int((~t.mask).sum()), size + t.mask.numel())
        return out

    def report(self) -> dict:
        eb = None
        if self.early_bird is not None:
            eb = {"found": self.early_bird.found, "found_at": self.early_bird.found_at,
                  "observations": self.early_bird.observations,
                  "last_distances": [round(d, 4) for d in self.early_bird.last_distances]}
        return {"source": self.config.source, "structure": self.config.structure, "targets": len(self.targets),
                "sparsity": 1.0 - density(self.masks), "mask_updates": self.updates,
                "last_update_step": self.last_update_step, "early_bird": eb,
                "gradient_masks": len(self._grad_hooks), "block_sparse_routes": sorted(self.routes),
                "block_sparse_paths": {name: forward.describe() for name, forward in sorted(self.routes.items())},
                "sieve": self.config.sieve.summary() if self.config.sieve is not None else None}

    def state_dict(self) -> dict:
        return {"frozen_params": sorted(self.frozen_params), "updates": self.updates, "step": self.step,
                "ramp_progress": self.ramp_progress,
                "last_update_step": self.last_update_step, "generator": self.generator.get_state(),
                "early_bird": self.early_bird.state_dict() if self.early_bird is not None else None,
                "sieve": self.config.sieve.state_dict() if self.config.sieve is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.frozen_params = set(state["frozen_params"])
        self.step = int(state.get("step", 0))
        self.updates = int(state["updates"])
        self.ramp_progress = float(state["ramp_progress"])
        self.last_update_step = state["last_update_step"]
        self.generator.set_state(state["generator"])
        if (state["early_bird"] is None) != (self.early_bird is None):
            raise ConfigError("the saved sparsity state and this SparsityConfig disagree on early_bird")
        if self.early_bird is not None:
            self.early_bird.load_state_dict(state["early_bird"])
        if state["sieve"] is not None:
            if self.config.sieve is None:
                raise ConfigError("the saved state has a sieve sampler: pass SparsityConfig(sieve=SieveSampler(...))")
            self.config.sieve.load_state_dict(state["sieve"])
