"""frzcompile: a PyTorch training compiler that makes frozen layers cost nothing.

    fm = frzcompile.optimize(model, example_inputs=(x,), optimizer=opt, cache=True)  # SmartFRZ decides
    print(frzcompile.explain(fm))

Pipeline: capture (capture.py, for analysis) -> units (units.py) -> policy (policies.py, predictor/) -> passes
(passes/: select_tokens, sparsify, freeze, cache) -> runtime (runtime/: the model's own forward with the plan
applied, and the services cache/, sparsity/ and tokens/), and kernels/ for the hot regions on GPU. `torch.compile(model,
backend="frzcompile")` runs the passes on Dynamo's graphs (backend.py); integrations/ (Hugging Face Trainer,
Lightning, DDP) are imported only when used. Importing this package initializes no CUDA, needs no Triton and
changes no global torch setting.
"""
from .api import optimize
from .backend import CompileConfig
from .cache import CacheConfig
from .errors import (CacheError, CaptureError, ConfigError, FrzError, InputMismatchError, PlanError, PolicyError,
                     UnitError)
from .explain import explain
from .policies import ALaST, AutoFreeze, Linear, Manual, Policy, SmartFRZ
from .runtime import FrozenModule, NoLossWarning, NoStepWarning, ResumeWarning
from .sparsity import IndexedDataset, SieveSampler
from .sparsity.training import EarlyBirdConfig, SparsityConfig

__version__ = "0.2.0"

__all__ = [
    "optimize", "explain", "CacheConfig", "CompileConfig", "FrozenModule", "Policy", "SmartFRZ", "Manual", "Linear",
    "AutoFreeze", "ALaST", "SparsityConfig", "EarlyBirdConfig", "SieveSampler", "IndexedDataset",
    "FrzError", "ConfigError", "CaptureError", "InputMismatchError", "UnitError", "PlanError", "PolicyError",
    "CacheError", "NoStepWarning", "NoLossWarning", "ResumeWarning",
]
