"""Numerical agreement within measured noise, never exact equality between separate computations.

Two runs of the same computation differ on GPUs (TF32 matmuls and convolutions, cudnn picking algorithms by
batch size, bf16 or fp16 under autocast) and a little on CPUs (blocking depends on the batch size). A check
that compares such runs accepts a relative RMS difference up to the floor of the precision involved plus four
times the noise measured by running the reference twice; a real difference (a wrong graph, an output mixing
samples across the batch) is orders of magnitude larger.
"""
from __future__ import annotations

import math

import torch

from .torch_private import open_tree

# relative RMS difference two runs of one computation may show, per precision
_FLOORS = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2,
           torch.complex128: 1e-10, torch.complex64: 2e-5, torch.complex32: 1e-2}
_TF32_FLOOR = 1e-2  # float32 on a GPU with TF32 allowed: 10 mantissa bits


def _tf32_allowed() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
                or torch.get_float32_matmul_precision() != "highest")


def floor(dtype: torch.dtype, device: torch.device) -> float:
    """The relative RMS difference expected between two runs in this dtype on this device (and autocast)."""
    value = _FLOORS.get(dtype, 0.0)
    if dtype == torch.float32 and device.type == "cuda" and _tf32_allowed():
        value = _TF32_FLOOR
    if dtype.is_floating_point and torch.is_autocast_enabled(device.type):
        value = max(value, _FLOORS.get(torch.get_autocast_dtype(device.type), 0.0))
    return value


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (complex128 for complex values; 0 when both are zero; inf for NaN mismatches
    or shape changes)."""
    if a.shape != b.shape:
        return math.inf
    wide = torch.complex128 if a.is_complex() or b.is_complex() else torch.float64
    a64, b64 = a.detach().to(wide), b.detach().to(wide)
    nan_a, nan_b = torch.isnan(a64), torch.isnan(b64)
    if not torch.equal(nan_a, nan_b):
        return math.inf
    a64, b64 = a64.masked_fill(nan_a, 0), b64.masked_fill(nan_b, 0)
    num = float(torch.linalg.vector_norm(a64 - b64))
    den = float(torch.linalg.vector_norm(b64))
    if num == 0.0:
        return 0.0
    return num / den if den > 0 else math.inf


def agree(a, b, noise: float = 0.0) -> bool:
    """Whether `a` matches the reference `b` within the precision floor plus 4x the measured relative `noise`."""
    if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
        return False
    if not isinstance(a, torch.Tensor):
        return type(a) is type(b) and a == b
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point() and not a.is_complex():
        return torch.equal(a, b)
    return relative_difference(a, b) <= floor(a.dtype, a.device) + 4.0 * noise


def tree_agree(a, b, noise: float = 0.0) -> bool:
    """`agree` leaf by leaf over two nested outputs of the same structure (what torch's pytree keeps whole, a
    `@dataclass` or a torch.distributions object, opened: torch_private.open_tree, not compared with its `==`)."""
    la, sa = open_tree(a)
    lb, sb = open_tree(b)
    return sa == sb and len(la) == len(lb) and all(agree(x, y, noise) for x, y in zip(la, lb))


def tree_noise(a, b) -> float:
    """The largest relative difference between the floating tensors of two runs of the same computation."""
    la, _ = open_tree(a)
    lb, _ = open_tree(b)
    worst = 0.0
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and (x.is_floating_point() or x.is_complex()):
            worst = max(worst, relative_difference(x, y))
    return worst
