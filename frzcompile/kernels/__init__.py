"""Triton kernels for the rewritten hot regions, each file beside its pure-PyTorch reference.

    block_sparse_matmul.py  block_sparse_linear(x, BlockSparseWeight, bias): frozen masked Linear, empty blocks skipped
    gather_cast.py          gather_cast(src, index, out_dtype): serve cached activation rows into a batch
    row_fingerprint.py      row_fingerprint(x): 128-bit hash of each row's bytes, the activation-cache key

Each wrapper runs its Triton kernel (registered with `torch.library.triton_op`, so Inductor sees it) when
`eligibility(...)` in the same file says so, and its reference otherwise; `force_reference=True` forces the latter.
Kernels run on CUDA tensors, and on CPU tensors only through Triton's interpreter: TRITON_INTERPRET=1 must be set
both when the kernel module is imported (`triton.jit` reads it then) and when the call is made.

Import the wrappers from their files (`from frzcompile.kernels.gather_cast import gather_cast`); importing this
package imports neither Triton nor a kernel module.
`with kernels.recording_paths() as log:` records which path the eager calls inside took (`log.counts`,
`log.last`); calls traced by torch.compile are not counted.
"""
import collections
import contextlib
import contextvars
import functools

import torch

__all__ = ["triton_available", "recording_paths", "PathLog"]


class PathLog:
    """Which path eager kernel calls took: `counts[kernel, "triton" | "reference"]` and `last[kernel]`."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self.last: dict = {}


# the PathLog of the innermost `recording_paths()` block of this thread or task, if any
_RECORDING: contextvars.ContextVar = contextvars.ContextVar("frzcompile_kernel_paths", default=None)


@contextlib.contextmanager
def recording_paths():
    log = PathLog()
    token = _RECORDING.set(log)
    try:
        yield log
    finally:
        _RECORDING.reset(token)


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports (it is an optional dependency)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _record(kernel: str, used_triton: bool) -> None:
    # Under torch.compile this would run once at trace time, not once per call: count eager calls only.
    if torch.compiler.is_compiling():
        return
    log = _RECORDING.get()
    if log is None:
        return
    path = "triton" if used_triton else "reference"
    log.last[kernel] = path
    log.counts[kernel, path] += 1


def _interpreted(jit_fn) -> bool:
    """Whether `jit_fn` was decorated under TRITON_INTERPRET=1 (it then runs in Triton's interpreter)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(jit_fn, InterpretedFunction)


def _device_reason(device: torch.device, jit_fn) -> str:
    """'' when the Triton kernel `jit_fn` can run on tensors of `device`, otherwise why not."""
    if device.type == "cuda":
        return ""
    if device.type != "cpu":
        return f"no Triton path for {device.type} tensors"
    if not _interpreted(jit_fn):
        return ("CPU tensors run only in Triton's interpreter, and this kernel module was imported without "
                "TRITON_INTERPRET=1 (triton.jit reads it at decoration time)")
    if torch.compiler.is_compiling():
        return "Triton's interpreter cannot run inside torch.compile"
    import triton

    if not triton.knobs.runtime.interpret:
        return "CPU tensors run only in Triton's interpreter, and TRITON_INTERPRET=1 is not set"
    return ""
