"""Sparse training at run time: which weights are masked, how the masks evolve, and how they meet freezing.

`SparseTraining` owns one boolean mask per target weight, registered as a buffer `<attr>_mask` on the module
that owns the weight (so masks travel with `state_dict`). The sparsify pass multiplies each weight by its mask
inside the graph, which masks the gradient too; after every optimizer step the runtime calls `after_step`,
which zeroes the masked weights again (so momentum or a stale gradient cannot revive them) and updates the masks
on schedule: a cubic sparsity ramp, MEST or RigL prune-and-grow, or early-bird ticket detection. Weights of
frozen units are left alone: when a unit freezes its masks are folded into its weights once (`fold`), and
no later update touches them (SpFDE's freezing stage).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

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
        or inside it too with include_head=True. exclude: parameter names to leave dense.
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
    _checked: bool = field(default=False, repr=False)

    def validate(self) -> SparsityConfig:
        if self.source not in SOURCES:
            raise ValueError(f"SparsityConfig.source must be one of {SOURCES}, not {self.source!r}")
        if self.structure not in STRUCTURES:
            raise ValueError(f"SparsityConfig.structure must be one of {STRUCTURES}, not {self.structure!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"SparsityConfig.scope must be one of {SCOPES}, not {self.scope!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"SparsityConfig.schedule must be one of {SCHEDULES}, not {self.schedule!r}")
        if self.structure != "nm" and self.source != "user" and not (
                isinstance(self.sparsity, (int, float)) and 0 <= self.sparsity < 1):
            raise ValueError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}")
        if self.source == "user" and not self.masks:
            raise ValueError("source='user' needs masks={parameter name: bool tensor}")
        if self.masks and self.source != "user":
            raise ValueError("masks= are only used with source='user'")
        if self.source in GROW_METHODS and self.structure != "unstructured":
            raise ValueError(f"{self.source} prune-and-grow works on unstructured masks; structure must be "
                             "'unstructured'")
        if self.early_bird is True:
            self.early_bird = EarlyBirdConfig()
        if self.early_bird and self.source != "magnitude":
            raise ValueError("early_bird draws magnitude masks: use it with source='magnitude'")
        if self.early_bird and self.schedule != "oneshot":
            raise ValueError("early_bird decides when to prune; schedule must stay 'oneshot'")
        if not isinstance(self.update_interval, int) or self.update_interval < 1:
            raise ValueError(f"update_interval must be an int >= 1, got {self.update_interval!r}")
        if self.sieve is not None and not isinstance(self.sieve, SieveSampler):
            raise ValueError(f"sieve= takes a frzcompile.SieveSampler, not {type(self.sieve).__name__}")
        self._checked = True
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


class SparseTraining:
    """The masks of one FrozenModule and their schedule; see the module docstring."""

    def __init__(self, config: SparsityConfig, model: nn.Module, unit_graph, total_steps=None, optimizers=()):
        self.config = config if config._checked else config.validate()
        self.total_steps = total_steps
        self.optimizers = list(optimizers)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.targets = self._select_targets(model, unit_graph)
        if not self.targets:
            raise ValueError("sparsity= found no weight to mask: no Linear/Conv weight outside the head "
                             "(pass include=[...] or include_head=True)")
        needs_total = (config.source in GROW_METHODS or config.schedule == "gradual")
        if needs_total and not total_steps:
            raise ValueError(f"sparsity source={config.source!r} schedule={config.schedule!r} needs total_steps "
                             "in optimize() to plan its updates")
        self.early_bird = None
        if config.early_bird:
            eb = config.early_bird
            self.early_bird = EarlyBird(fifo=eb.fifo, threshold=eb.threshold)
        self.frozen_params: set = set()
        self._block_sparse = {}     # name -> (weight version key, BlockSparseWeight or None)
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

    # -- targets ---------------------------------------------------------------------------------------
    def _select_targets(self, model, unit_graph) -> dict:
        cfg = self.config
        param_unit = {}
        for u, unit in unit_graph.units.items():
            for p in unit.params:
                param_unit[id(p)] = u
        head = unit_graph.names[-1]
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
                    wanted = ((layer_weight or name in op_params)
                              and (cfg.include_head or param_unit.get(id(p)) != head))
                if wanted and name not in cfg.exclude:
                    if p.dim() < 2:
                        raise ValueError(f"{name} has {p.dim()} dimension(s): only weights of 2 or more are masked")
                    candidates[name] = Target(name, module, attr, param_unit.get(id(p), "(outside units)"))
        if cfg.include is not None:
            missing = set(cfg.include) - set(candidates) - {t.name.rpartition(".")[0] for t in candidates.values()}
            if missing:
                raise ValueError(f"include= names not found among the model's parameters: {sorted(missing)}")
        return candidates

    def _user_masks(self) -> dict:
        masks = self.config.masks
        unknown = set(masks) - set(self.targets)
        if unknown:
            raise ValueError(f"masks given for {sorted(unknown)}, which are not masked weights; targets are "
                             f"{sorted(self.targets)[:8]}...")
        for name, m in masks.items():
            if tuple(m.shape) != tuple(self.targets[name].weight.shape):
                raise ValueError(f"mask for {name} has shape {tuple(m.shape)}, the weight "
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
        for name, mask in new.items():
            t = self.targets[name]
            t.mask.copy_(mask.to(t.mask.device))
            t.weight.mul_(t.mask)  # pruned weights are zero, and grown ones start from zero (RigL)
            for opt in self.optimizers:
                for value in opt.state.get(t.weight, {}).values():
                    if torch.is_tensor(value) and value.shape == t.weight.shape:
                        value.mul_(t.mask)  # no momentum carried into pruned or regrown positions

    @torch.no_grad()
    def enforce(self) -> None:
        """Masked weights back to exactly zero (after an optimizer step)."""
        for t in self.trainable().values():
            t.weight.mul_(t.mask)

    def fold(self, unit_params: set) -> None:
        """A unit froze: fold its masks into its weights once; later updates leave them alone."""
        with torch.no_grad():
            for name, t in self.targets.items():
                if id(t.weight) in unit_params and name not in self.frozen_params:
                    if (t.weight * ~t.mask).any():
                        t.weight.mul_(t.mask)
                    self.frozen_params.add(name)

    def unfold(self, unit_params: set) -> None:
        for name, t in self.targets.items():
            if id(t.weight) in unit_params:
                self.frozen_params.discard(name)

    def block_sparse_weight(self, name: str):
        """The block-sparse layout of a frozen weight, or None when too few of its kernel blocks are empty (or
        the kernel layer is unavailable). Built once per weight version."""
        from ..kernels import block_sparse_matmul as bsm

        t = self.targets[name]
        key = (t.weight._version, t.weight.device, t.weight.dtype, t.weight.data_ptr())
        cached = self._block_sparse.get(name)
        if cached is None or cached[0] != key:
            layout = bsm.BlockSparseWeight.from_dense(t.weight.detach())
            ok = layout.block_sparsity >= self.config.block_sparse_threshold
            cached = self._block_sparse[name] = (key, layout if ok else None)
        return cached[1]

    # -- schedule --------------------------------------------------------------------------------------
    def wants_dense_grads(self, step: int) -> bool:
        """RigL grows where the dense gradient is largest: the pass keeps it for the step before an update."""
        cfg = self.config
        return cfg.source == "rigl" and (step + 1) % cfg.update_interval == 0 and self._updating(step + 1)

    def _updating(self, step: int) -> bool:
        return step < self.config.update_until * self.total_steps

    def after_step(self, step: int, dense_grads: dict | None = None) -> None:
        """Called after optimizer step number `step` (1-based)."""
        cfg = self.config
        self.enforce()
        due = step % (cfg.early_bird.interval if self.early_bird else cfg.update_interval) == 0
        if not due:
            return
        if self.early_bird is not None:
            if not self.early_bird.found:
                eb = cfg.early_bird
                drawn = self._draw(cfg.sparsity, structure=eb.structure or cfg.structure)
                if self.early_bird.observe(drawn, step=step):
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
                "sieve": self.config.sieve.summary() if self.config.sieve is not None else None}

    def state_dict(self) -> dict:
        return {"frozen_params": sorted(self.frozen_params), "updates": self.updates,
                "ramp_progress": self.ramp_progress,
                "last_update_step": self.last_update_step, "generator": self.generator.get_state(),
                "early_bird": self.early_bird.state_dict() if self.early_bird is not None else None,
                "sieve": self.config.sieve.state_dict() if self.config.sieve is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.frozen_params = set(state["frozen_params"])
        self.updates = int(state["updates"])
        self.ramp_progress = float(state["ramp_progress"])
        self.last_update_step = state["last_update_step"]
        self.generator.set_state(state["generator"])
        if (state["early_bird"] is None) != (self.early_bird is None):
            raise ValueError("the saved sparsity state and this SparsityConfig disagree on early_bird")
        if self.early_bird is not None:
            self.early_bird.load_state_dict(state["early_bird"])
        if state["sieve"] is not None:
            if self.config.sieve is None:
                raise ValueError("the saved state has a sieve sampler: pass SparsityConfig(sieve=SieveSampler(...))")
            self.config.sieve.load_state_dict(state["sieve"])
