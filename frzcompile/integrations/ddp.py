"""DistributedDataParallel for a FrozenModule: correct freezing mid-run without `find_unused_parameters`, and
frozen parameters that cost no communication.

    fm = frzcompile.optimize(model, (x,), optimizer=opt)
    ddp = frzcompile.integrations.ddp.DistributedDataParallel(fm, device_ids=[rank])   # DDP's own arguments
    for x, y in loader: loss_fn(ddp(x), y).backward(); opt.step(); opt.zero_grad()

Plain DDP builds its gradient buckets, and the autograd hooks that fill them, once, over the parameters that
require grad at wrapping time: a parameter frozen later leaves its bucket waiting forever (DDP raises at the next
step, or with `find_unused_parameters=True` all-reduces it anyway, a graph walk per step for nothing), and a
parameter thawed later is never all-reduced again. This wrapper
  - makes every replica follow rank 0's plan: before each grad-enabled call that starts a new step (in eval mode
    too; evaluate under `torch.no_grad()` on every rank or none, as torch's DDP needs), rank 0's target
    plan (its pending policy decision, or its current plan) is broadcast, a few bytes, so replicas never diverge
    even if a policy saw different numbers on different ranks (a policy's decision waits for that agreement, even
    when `fm.frozen` is read first). Call a manual `fm.freeze`/`fm.unfreeze` on every rank: it acts at once; one
    made on rank 0 alone is followed by the others at the next step, one made on another rank alone stays
    there (a freeze by hand is kept against any plan), the trainable sets differ, and gloo aborts in backward;
  - drops the gradients pending at a freeze (one between `backward()` and `opt.step()`): under `no_sync()` they
    are a rank's own, not all-reduced yet (a single process applies them in that step);
  - passes `find_unused_parameters` on: frozen parameters need it not (they are in no bucket), a parameter your
    forward does not use (an auxiliary head) does, as with torch's DDP;
  - rebuilds the inner `torch.nn.parallel.DistributedDataParallel` over the trainable parameters whenever that
    set changes (without its initial broadcast: the replicas are already equal), re-registering any comm hook
    registered through `register_comm_hook`. Frozen parameters are in no bucket: no bytes, no hook, no wait.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from ..policies import ALaST
from ..runtime import FrozenModule


class DistributedDataParallel(nn.Module):
    """`torch.nn.parallel.DistributedDataParallel` over a FrozenModule, rebuilt when the trainable parameters
    change. `ddp.module` is the model, `ddp.fm` the FrozenModule, `ddp.ddp` the current torch DDP; `rebuilds`
    counts the rebuilds."""

    def __init__(self, fm: FrozenModule, **ddp_kwargs):
        super().__init__()
        if not isinstance(fm, FrozenModule):
            raise ConfigError("frzcompile's DistributedDataParallel wraps the module returned by frzcompile.optimize "
                              f"(got {type(fm).__name__}); call optimize(model, ...) first")
        if isinstance(fm.policy, ALaST):
            raise ConfigError("policy='alast' is single-process for now: each replica would draw its own layers and "
                              "budgets from its own batches; train on one process")
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError("torch.distributed is not initialized: call torch.distributed.init_process_group first")
        self.module = fm.model  # registered, so state_dict keys are "module.<name>", as with torch's DDP
        state = self.__dict__
        state["fm"] = fm
        state["_kwargs"] = dict(ddp_kwargs)
        state["_group"] = ddp_kwargs.get("process_group")
        state["_comm_hook"] = None
        state["_agreed_step"] = None
        state["rebuilds"] = 0
        state["ddp"] = None
        state["_trainable"] = None
        fm.__dict__["_plans_applied_by_owner"] = True  # fm applies a plan when this wrapper says every rank agreed
        fm._plan.keep_in_flight = False  # a gradient pending at a freeze may not be all-reduced (no_sync): dropped
        self._agree()
        fm._settle(by_owner=True)  # rank 0's plan, before the first buckets are built
        self._build(init_sync=ddp_kwargs.pop("init_sync", True))

    def _trainable_ids(self) -> tuple:
        return tuple(id(p) for p in self.module.parameters() if p.requires_grad)

    def _build(self, init_sync: bool) -> None:
        state = self.__dict__
        old = state.get("ddp")
        sync = old.require_backward_grad_sync if old is not None else True  # (inside no_sync(): stays off)
        state["ddp"] = None  # the old reducer (and its autograd hooks) goes before the new one is made
        kwargs = dict(self._kwargs, init_sync=init_sync)
        state["ddp"] = torch.nn.parallel.DistributedDataParallel(self.fm, **kwargs)
        state["ddp"].require_backward_grad_sync = sync
        if self._comm_hook is not None:
            make_state, hook = self._comm_hook
            self.ddp.register_comm_hook(make_state(), hook)
        state["_trainable"] = self._trainable_ids()

    def _agree(self) -> None:
        """All ranks take rank 0's target plan (once per training step)."""
        fm = self.fm
        step = fm.step_count
        if step == self._agreed_step:
            return
        self.__dict__["_agreed_step"] = step
        units = fm.units
        pending = fm.__dict__.get("_pending")
        target = pending if pending is not None else frozenset(fm.frozen)
        device = next(iter(self.module.parameters())).device
        if dist.get_backend(self._group) == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        mask = torch.tensor([u in target for u in units], dtype=torch.uint8, device=device)
        dist.broadcast(mask, src=dist.get_global_rank(self._group, 0) if self._group is not None else 0,
                       group=self._group)
        agreed = frozenset(u for u, keep in zip(units, mask.tolist()) if keep)
        if agreed != target or pending is not None:
            fm.__dict__["_pending"] = agreed  # applied by fm before the call (see FrozenModule._settle)

    def forward(self, *args, **kwargs):
        # (a call with grad on is one the inner DDP prepares a reduction for, in eval mode too: BatchNorm kept
        # frozen by training in eval mode; a grad-enabled call on one rank alone breaks torch's DDP as it does this)
        if torch.is_grad_enabled():
            self._agree()
            self.fm._settle(by_owner=True)  # the agreed plan applied now, before the buckets are checked
            if self._trainable_ids() != self._trainable:
                self._build(init_sync=False)
                self.__dict__["rebuilds"] = self.rebuilds + 1
        return self.ddp(*args, **kwargs)

    def register_comm_hook(self, state, hook) -> None:
        """As torch's `register_comm_hook`, kept across rebuilds. The buckets change at a rebuild, so a hook whose
        state follows the buckets (PowerSGD's error feedback) needs a fresh state each time: pass a function
        making it (`lambda: PowerSGDState(...)`) instead of the state."""
        make_state = state if callable(state) and not isinstance(state, dist.ProcessGroup) else (lambda: state)
        self.__dict__["_comm_hook"] = (make_state, hook)
        self.ddp.register_comm_hook(make_state(), hook)

    @contextlib.contextmanager
    def no_sync(self):
        """torch's `no_sync()`, on whichever inner DDP there is when it ends: a plan change inside it rebuilds the
        inner DDP, which keeps the flag (`_build`), and is the one given the flag back here."""
        was = self.ddp.require_backward_grad_sync
        self.ddp.require_backward_grad_sync = False
        try:
            yield
        finally:
            self.ddp.require_backward_grad_sync = was
