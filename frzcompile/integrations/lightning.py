"""Layer freezing by policy in a Lightning run, in the shape of Lightning's `BaseFinetuning` callback:

    from frzcompile.integrations.lightning import FreezeCallback
    trainer = lightning.Trainer(..., callbacks=[FreezeCallback(policy="smartfrz", module="model")])

`module` is the attribute path of the network your `training_step` calls (`self.model(x)` -> "model"); by default
the LightningModule itself (for a `training_step` that calls `self(x)`). At that module's first training call the
callback runs `frzcompile.optimize` on it (the call's arguments are the example; `total_steps` defaults to the
trainer's estimated stepping batches, the optimizers are the trainer's) and attaches it, so your
`training_step` runs the plan unchanged. The freeze state is part of the callback's `state_dict`, saved in
Lightning checkpoints and restored by `trainer.fit(..., ckpt_path=...)`. The training_step's loss goes to the
policy (`fm.observe_loss`). `frozen_units` is logged every step.
`callback.fm` is the FrozenModule once training started.
"""
from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from ..errors import ConfigError
from .lazy import OptimizeAtFirstCall, check_options


class FreezeCallback(Callback):
    """policy: as in `frzcompile.optimize`; module: the attribute path of the network `training_step` calls
    (None: the LightningModule); options: any other keyword argument of `optimize` (`cache=True`, `units=`)."""

    def __init__(self, policy="smartfrz", module: str | None = None, **options):
        check_options(options, "FreezeCallback")
        self.policy = policy
        self.module = module
        self.options = options
        self.fm = None
        self._pending = None
        self._loaded = None
        self._estimated = self._mark = None  # the default total_steps, and (global_step, fm.step_count) at start
        self._ratio = None  # (frzcompile's steps, Lightning's global steps) over the first batch that stepped

    def _target(self, pl_module):
        if self.module is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError as e:
            raise ConfigError(f"FreezeCallback(module={self.module!r}): {type(pl_module).__name__} has no such "
                              "submodule; give the attribute path of the network training_step calls") from e

    def setup(self, trainer, pl_module, stage):
        """(Before a checkpoint's state is loaded.) A callback used again for another module measures its ratio of
        steps anew."""
        if stage == "fit" and (self.fm is None or self.fm.model is not self._target(pl_module)):
            self._ratio = None

    def on_fit_start(self, trainer, pl_module):
        if trainer.world_size > 1:
            raise ConfigError(f"FreezeCallback runs on one process and one device; this run has {trainer.world_size}: "
                              "Lightning wraps the module in torch's DistributedDataParallel, whose gradient buckets "
                              "a freeze would break")
        target = self._target(pl_module)
        if self.fm is not None and self.fm.model is target:  # a second fit() on the same module
            self.fm.attach()
            return

        def options():
            # (the trainer's optimizers that hold some of the target's parameters: a GAN's generator is given its
            # own, not the discriminator's)
            ours = {id(p) for p in target.parameters()}
            optimizers = [o for o in trainer.optimizers
                          if any(id(p) in ours for group in o.param_groups for p in group["params"])]
            out = {"policy": self.policy, "optimizer": optimizers, **self.options}
            if out.get("total_steps") is None:
                steps = trainer.estimated_stepping_batches
                if isinstance(steps, int) and steps > 0:
                    out["total_steps"] = steps
                    # bounded by max_steps, the estimate counts optimizer steps (global_step); by epochs, batches
                    if trainer.max_steps is not None and trainer.max_steps > 0 and steps == trainer.max_steps:
                        self._estimated = steps
                        if self._ratio is not None:  # (resumed: converted as before the checkpoint)
                            out["total_steps"] = max(1, round(steps * self._ratio[0] / self._ratio[1]))
            return out

        def ready(fm):
            if not pl_module.automatic_optimization:  # plans applied at the end of each batch (on_train_batch_end)
                fm.__dict__["_plans_applied_by_owner"] = True
            self._ready(fm)
            # (under automatic optimization fm is made inside the first step's closure, after that step's hooks)
            fm._warn_if_resumed(fm.optimizers())
            if self._estimated is not None and self._ratio is None:
                self._mark = (trainer.global_step, fm.step_count)

        self._estimated = self._mark = None
        self._pending = OptimizeAtFirstCall(target, options, ready)

    def _ready(self, fm) -> None:
        self.fm = fm
        if self._loaded is not None:
            fm.load_freeze_state_dict(self._loaded)
            self._loaded = None

    def _steps_in_frzcompiles_count(self, trainer) -> None:
        """After the first batch that stepped: Lightning's global_step counts every optimizer step, frzcompile one
        per iteration (optimizers stepping one after another count once), so under manual optimization with two
        optimizers a run bounded by max_steps has twice frzcompile's steps: the default total_steps is converted
        (a linear ramp reached only half way, otherwise)."""
        global_start, start = self._mark
        lightning, ours = trainer.global_step - global_start, self.fm.step_count - start
        if lightning > 0 and ours > 0:  # (a batch that stepped no optimizer, accumulating: wait for one that did)
            self._mark = None
            self._ratio = (ours, lightning)  # (kept in checkpoints: a resumed run's first decisions come before its
            # first batch ends, and it may train longer than the first)
            if lightning != ours:
                self.fm.__dict__["_total_steps"] = max(1, round(self._estimated * ours / lightning))

    def on_before_backward(self, trainer, pl_module, loss):
        if self.fm is not None:
            self.fm.observe_loss(loss)  # the safety rules of the policy read the training loss

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.fm is None:
            if self._pending is not None and self._pending.waiting:
                name = "the LightningModule" if self.module is None else repr(self.module)
                raise ConfigError(f"FreezeCallback: {name} was not called during training_step, so nothing can be "
                                  "frozen; pass module='<attribute>' naming the network training_step calls "
                                  "(e.g. module='model' for self.model(x))")
            return
        if not pl_module.automatic_optimization:  # outside any toggle_optimizer (Lightning's GAN example)
            self.fm._settle(by_owner=True)
        if self._mark is not None:
            self._steps_in_frzcompiles_count(trainer)
        if trainer.logger is not None:
            pl_module.log("frozen_units", float(len(self.fm.frozen)), on_step=True, prog_bar=False, logger=True)

    def on_fit_end(self, trainer, pl_module):
        if self._pending is not None:
            self._pending.cancel()
        if self.fm is not None:
            self.fm.detach()  # a plain module again; frozen parameters stay frozen, as BaseFinetuning leaves them

    def state_dict(self):
        state = self.fm.freeze_state_dict() if self.fm is not None else self._loaded
        return {"freeze_state": state, "step_ratio": self._ratio}

    def load_state_dict(self, state_dict):
        self._loaded = state_dict.get("freeze_state")
        self._ratio = state_dict.get("step_ratio")
        if self._loaded is not None and self.fm is not None:
            self.fm.load_freeze_state_dict(self._loaded)
            self._loaded = None
