"""frzcompile: a PyTorch training compiler that makes frozen layers cost nothing.

    fm = frzcompile.optimize(model, example_inputs=(x,), optimizer=opt, cache=True)  # SmartFRZ decides
    print(frzcompile.explain(fm))

Pipeline: capture (capture.py) -> units (units.py) -> policy (policies.py, predictor/) -> passes (passes/:
sparsify, freeze, cache) -> runtime (runtime.py, activation_cache.py, activation_store.py, sparsity/), and
kernels/ for the rewritten hot regions on GPU. `torch.compile(model, backend="frzcompile")` runs the passes
on Dynamo's graphs (backend.py). Importing this package initializes no CUDA, needs no Triton and changes no
global torch setting.
"""
from .activation_store import CacheConfig
from .api import optimize
from .errors import CaptureError, FrzError, InputMismatchError, PlanError, PolicyError, UnitError
from .explain import explain
from .policies import AutoFreeze, Linear, Manual, Policy, SmartFRZ
from .runtime import FrozenModule
from .sparsity import IndexedDataset, SieveSampler
from .sparsity.training import EarlyBirdConfig, SparsityConfig

__version__ = "0.1.0"

__all__ = [
    "optimize", "explain", "CacheConfig", "FrozenModule", "Policy", "SmartFRZ", "Manual", "Linear", "AutoFreeze",
    "SparsityConfig", "EarlyBirdConfig", "SieveSampler", "IndexedDataset",
    "FrzError", "CaptureError", "InputMismatchError", "UnitError", "PlanError", "PolicyError",
]
