"""Layer freezing inside an unchanged Hugging Face `Trainer` run:

    from frzcompile.integrations.hf import FreezeCallback
    trainer = Trainer(model=model, args=args, train_dataset=..., callbacks=[FreezeCallback(policy="smartfrz")])

At the model's first training call the callback runs `frzcompile.optimize` on the Trainer's model (the first
batch is the example; `total_steps` defaults to the run's `max_steps`) and attaches it, so the Trainer's own
`model(**inputs)` calls run the plan: frozen parameters lose gradient and optimizer state in the Trainer's
optimizer (accelerate's wrapper included), frozen units stay in eval mode through the Trainer's `model.train()`,
and `cache=True` serves the frozen prefix. The freeze state is saved in every checkpoint folder
(`frzcompile_freeze_state.pt`) and restored by `trainer.train(resume_from_checkpoint=...)`. The number of frozen
units is added to the Trainer's logs (`frozen_units`). `callback.fm` is the FrozenModule once training started:
`frzcompile.explain(callback.fm)`.
"""
from __future__ import annotations

import os
import warnings

import torch
from transformers import TrainerCallback

from ..errors import ConfigError
from .lazy import OptimizeAtFirstCall, check_options

STATE_FILE = "frzcompile_freeze_state.pt"


class FreezeCallback(TrainerCallback):
    """policy: as in `frzcompile.optimize` ("smartfrz", "linear", "autofreeze", "manual" or a Policy);
    resume_from: the checkpoint folder `trainer.train(resume_from_checkpoint=...)` resumes from, when it is not
        `<output_dir>/checkpoint-<step>` (the Trainer does not tell its callbacks);
    options: any other keyword argument of `optimize` (`cache=True`, `units=[...]`, `total_steps=...`)."""

    def __init__(self, policy="smartfrz", resume_from: str | None = None, **options):
        check_options(options, "FreezeCallback")
        self.policy = policy
        self.resume_from = resume_from
        self.options = options
        self.fm = None
        self._pending = None
        self._resume_state = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if args.world_size > 1 or args.n_gpu > 1:
            raise ConfigError(
                f"FreezeCallback runs on one process and one device; this run has {args.world_size} processes and "
                f"{args.n_gpu} GPUs per process. The Trainer wraps the model in torch's DistributedDataParallel or "
                "DataParallel, whose gradient buckets a freeze would break: use one device, or a loop with "
                "frzcompile.integrations.ddp.DistributedDataParallel")
        self._resume_state = None
        if state.global_step > 0:  # resumed: the Trainer restored its state from a checkpoint of this step
            candidates = [self.resume_from, args.resume_from_checkpoint,
                          os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
            paths = [os.path.join(c, STATE_FILE) for c in candidates if isinstance(c, str)]
            found = [p for p in paths if os.path.isfile(p)]
            if found:
                self._resume_state = torch.load(found[0], weights_only=True)
                if self._resume_state.get("step") != state.global_step:  # (a float16 run skips overflowed steps)
                    warnings.warn(f"frzcompile: {found[0]} was saved at frzcompile step "
                                  f"{self._resume_state.get('step')}, the Trainer resumes at step {state.global_step}; "
                                  "if this is another run's checkpoint, pass FreezeCallback(resume_from=<folder>)",
                                  stacklevel=2)
            else:
                warnings.warn(f"frzcompile: resuming at step {state.global_step} without a freeze state (none of "
                              f"{paths}); the plan starts again with nothing frozen. Pass "
                              "FreezeCallback(resume_from=<the checkpoint folder>)", stacklevel=2)
        if self.fm is not None and self.fm.model is model:  # a second train() on the same model
            if self._resume_state is not None:
                self.fm.load_freeze_state_dict(self._resume_state)
            self.fm.attach()
            return
        options = {"policy": self.policy, "optimizer": optimizer, **self.options}
        if options.get("total_steps") is None and state.max_steps and state.max_steps > 0:
            options["total_steps"] = state.max_steps
        self._pending = OptimizeAtFirstCall(model, lambda: options, self._ready)

    def _ready(self, fm) -> None:
        self.fm = fm
        fm.__dict__["_resume_checked"] = True  # (on_train_begin looked for the checkpoint's freeze state, and warned)
        if self._resume_state is not None:
            fm.load_freeze_state_dict(self._resume_state)

    def on_save(self, args, state, control, **kwargs):
        if self.fm is None or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            torch.save(self.fm.freeze_state_dict(), os.path.join(folder, STATE_FILE))
        else:  # (hyperparameter search saves into per-trial folders)
            warnings.warn(f"frzcompile: no checkpoint folder {folder}: the freeze state of step {state.global_step} "
                          "was not saved", stacklevel=2)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.fm is not None and logs is not None:
            logs["frozen_units"] = len(self.fm.frozen)
            # the Trainer appended a copy of `logs` to its history before calling back: add it there too
            last = state.log_history[-1] if state.log_history else None
            if last is not None and all(last.get(k) == v for k, v in logs.items() if k != "frozen_units"):
                last["frozen_units"] = logs["frozen_units"]

    def on_train_end(self, args, state, control, **kwargs):
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self.fm is not None:
            self.fm.detach()  # the model is a plain model again; frozen parameters stay frozen, as by hand
