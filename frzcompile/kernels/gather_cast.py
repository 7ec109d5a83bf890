"""Gather-and-cast: serve cached activation rows into a batch in the compute dtype, in one pass over memory.

    out = gather_cast(src, index, torch.float16)   # == src.index_select(0, index).to(torch.float16)

src (R, ...) is the cache (e.g. fp32 or bf16 rows), index (B,) the rows of this batch, out (B, ...). The unfused
version reads each row, writes it, reads it again for the cast and writes it again; the kernel reads and writes
each element once.
"""
import math

import torch

from . import _device_reason, _interpreted, _record

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def reference_gather_cast(src: torch.Tensor, index: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return src.index_select(0, index).to(out_dtype)


def eligibility(src: torch.Tensor, index: torch.Tensor, out_dtype: torch.dtype, *,
                force_reference: bool = False) -> tuple[bool, str]:
    """(True, "") when `gather_cast` would run the Triton kernel, else (False, why it runs the reference)."""
    if force_reference:
        return False, "force_reference=True"
    if triton is None:
        return False, "triton is not installed"
    if index.device != src.device:
        return False, f"src on {src.device} but index on {index.device}"
    reason = _device_reason(src.device, _gather_cast_kernel)
    if reason:
        return False, reason
    if src.dtype not in DTYPES or out_dtype not in DTYPES:
        return False, f"{src.dtype} -> {out_dtype}: the kernel casts between {', '.join(map(str, DTYPES))}"
    if out_dtype == torch.bfloat16 and src.dtype != out_dtype and _interpreted(_gather_cast_kernel):
        return False, "Triton's interpreter rounds to bfloat16 by truncation, not to nearest (triton 3.9)"
    if src.dtype == torch.float64 and out_dtype in (torch.float16, torch.bfloat16):
        return False, ("float64 -> a 16-bit float: torch rounds through float32 (twice), the kernel's cast once; "
                       "they differ by an ulp on about 1 value in 15,000")
    if index.dtype not in INDEX_DTYPES or index.dim() != 1:
        return False, f"index must be 1-D int32/int64, got {index.dim()}-D {index.dtype}"
    if src.dim() == 0 or not src.is_contiguous():
        return False, "src must be a contiguous tensor of rows (copying the whole cache would defeat the purpose)"
    if src.requires_grad:
        return False, "src requires grad and the kernel has no backward"
    return True, ""


def gather_cast(src: torch.Tensor, index: torch.Tensor, out_dtype: torch.dtype, *,
                force_reference: bool = False) -> torch.Tensor:
    """`src.index_select(0, index).to(out_dtype)` in one kernel. On the Triton path the indices are not
    bounds-checked (the reference raises on an out-of-range index; the kernel would read out of bounds)."""
    ok, _ = eligibility(src, index, out_dtype, force_reference=force_reference)
    _record("gather_cast", ok)
    if not ok:
        return reference_gather_cast(src, index, out_dtype)
    index = index.contiguous()  # the kernel reads the indices as packed (a strided or expanded one is copied)
    out = torch.ops.frzcompile.gather_cast(src.view(src.shape[0], math.prod(src.shape[1:])), index, out_dtype)
    return out.view(index.shape[0], *src.shape[1:])


if triton is not None:
    @triton.jit
    def _gather_cast_kernel(src_ptr, index_ptr, out_ptr, row_len, col_blocks, BLOCK: tl.constexpr):
        # One program per (output row, BLOCK-wide slice of it), flattened into axis 0, whose limit (2**31 - 1)
        # is far above axis 1's (65535).
        pid = tl.program_id(0)
        b = pid // col_blocks
        cols = (pid % col_blocks) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < row_len  # the last slice of a row whose length is not a multiple of BLOCK
        row = tl.load(index_ptr + b).to(tl.int64)
        values = tl.load(src_ptr + row * row_len + cols, mask=mask)
        tl.store(out_ptr + b.to(tl.int64) * row_len + cols, values.to(out_ptr.dtype.element_ty), mask=mask)

    @torch.library.triton_op("frzcompile::gather_cast", mutates_args=())
    def _gather_cast_op(src: torch.Tensor, index: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """src (R, D) contiguous, index (B,) -> (B, D) of out_dtype."""
        rows, row_len = index.shape[0], src.shape[1]
        out = torch.empty((rows, row_len), dtype=out_dtype, device=src.device)
        if out.numel() == 0:
            return out
        # Contiguous slices let Triton vectorize the loads and stores (16 bytes a thread when row_len is a
        # multiple of 16, which it specializes on); a short row gets one slice of about its own size.
        block = max(16, min(2048, triton.next_power_of_2(row_len)))
        col_blocks = triton.cdiv(row_len, block)
        torch.library.wrap_triton(_gather_cast_kernel)[(rows * col_blocks,)](
            src, index, out, row_len, col_blocks, BLOCK=block, num_warps=4 if block >= 512 else 1)
        return out
