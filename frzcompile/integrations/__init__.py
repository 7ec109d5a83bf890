"""Where users train: each integration lives in its own module and imports its library only when used, so none
of them becomes a dependency of `import frzcompile`.

- `frzcompile.integrations.hf.FreezeCallback`: a `transformers.TrainerCallback` (an unchanged `Trainer` run);
- `frzcompile.integrations.lightning.FreezeCallback`: a Lightning callback in the shape of `BaseFinetuning`;
- `frzcompile.integrations.ddp.DistributedDataParallel`: DDP whose replicas follow one plan and stop
  all-reducing frozen parameters.

Both callbacks call `frzcompile.optimize` at the first training call of the model, with that call's arguments as
the example batch, and attach the FrozenModule to the model (`fm.attach()`), so the loop's own `model(...)` calls
run through it.
"""
