"""Block-sparse Linear for frozen masked weights: y = x @ W.T + bias, skipping W's all-zero blocks.

    bsw = BlockSparseWeight.from_dense(weight)        # once per frozen weight: (N, K), many empty 64x64 blocks
    y = block_sparse_linear(x, bsw, bias)             # x (..., K) -> (..., N); differentiable in x and bias

The layout stores the nonzero blocks packed (nnz, BN, BK) and two indexes into them: CSR by block row (for each
N-block the K-blocks to read, for the forward) and CSC by block column (for each K-block the N-blocks, for
grad_x = grad_y @ W). Both directions run the same kernel: one program computes a (BM, block) tile of the output
and loops only over that tile's nonzero blocks, so the work is proportional to 1 - block_sparsity.

The weight is frozen: there is no weight gradient. The layout is a snapshot; rebuild it after changing the weight.
Skipping a zero block also skips the NaN/Inf it would have produced from a NaN/Inf in x, which dense matmul keeps.
"""
import torch
import torch.nn.functional as F

from ..torch_private import tensor_version
from . import _device_reason, _interpreted, _record

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEFAULT_BLOCK = (64, 64)  # tensor-core friendly for fp16/bf16/fp32 (tl.dot needs each side >= 16)


class BlockSparseWeight:
    """A frozen (N, K) weight as its nonzero (BN, BK) blocks, padded with zeros where N or K is not a multiple of
    the block. `dense` is the weight it was built from (not a copy), which the reference path uses."""

    def __init__(self, dense, block, blocks, row_ptr, col_idx, col_ptr, row_idx, block_id):
        self.dense = dense
        self.block = block
        self.blocks = blocks        # (nnz, BN, BK), ordered by block row then block column
        self.row_ptr = row_ptr      # (N-blocks + 1,) int32: blocks[row_ptr[i]:row_ptr[i+1]] are block row i
        self.col_idx = col_idx      # (nnz,) int32: the block column of each packed block
        self.col_ptr = col_ptr      # (K-blocks + 1,) int32: entries col_ptr[j]:col_ptr[j+1] below are block column j
        self.row_idx = row_idx      # (nnz,) int32: their block rows
        self.block_id = block_id    # (nnz,) int32: their index in `blocks`
        self.version = tensor_version(dense)

    @classmethod
    @torch.no_grad()
    def from_dense(cls, weight: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> "BlockSparseWeight":
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D (out_features, in_features) weight, got shape {tuple(weight.shape)}")
        bn, bk = block
        n, k = weight.shape
        nb_n, nb_k = -(-n // bn), -(-k // bk)
        w = weight.detach()
        tiles = F.pad(w, (0, nb_k * bk - k, 0, nb_n * bn - n)).view(nb_n, bn, nb_k, bk).transpose(1, 2)
        nonzero = tiles.ne(0).any(-1).any(-1)  # (nb_n, nb_k)
        rows, cols = nonzero.nonzero(as_tuple=True)  # row-major order: CSR
        ids = torch.full((nb_n, nb_k), -1, dtype=torch.int32, device=w.device)
        ids[rows, cols] = torch.arange(rows.numel(), dtype=torch.int32, device=w.device)
        t_cols, t_rows = nonzero.T.nonzero(as_tuple=True)  # column-major order: CSC

        def pointers(counts):
            return F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)

        return cls(w, (bn, bk), tiles[rows, cols], pointers(nonzero.sum(1)), cols.to(torch.int32),
                   pointers(nonzero.sum(0)), t_rows.to(torch.int32), ids[t_rows, t_cols])

    def __setstate__(self, state):
        # A copy (deepcopy, pickle) holds new tensors, whose version counters start again.
        self.__dict__.update(state)
        self.version = tensor_version(self.dense)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.dense.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks.dtype

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    @property
    def block_sparsity(self) -> float:
        """Fraction of the (padded) weight's blocks that are all zero."""
        total = (self.row_ptr.numel() - 1) * (self.col_ptr.numel() - 1)
        return 1.0 - self.blocks.shape[0] / total if total else 0.0

    def to_dense(self) -> torch.Tensor:
        """The weight rebuilt from the packed blocks (equal to `dense` as long as it was not changed since)."""
        bn, bk = self.block
        nb_n, nb_k = self.row_ptr.numel() - 1, self.col_ptr.numel() - 1
        tiles = self.blocks.new_zeros(nb_n, nb_k, bn, bk)
        rows = torch.arange(nb_n, device=self.device).repeat_interleave(self.row_ptr.diff())
        tiles[rows, self.col_idx.long()] = self.blocks
        n, k = self.shape
        return tiles.transpose(1, 2).reshape(nb_n * bn, nb_k * bk)[:n, :k]

    def __repr__(self):
        return (f"BlockSparseWeight(shape={self.shape}, block={self.block}, dtype={self.dtype}, "
                f"device={self.device}, block_sparsity={self.block_sparsity:.3f})")


def reference_block_sparse_linear(x: torch.Tensor, dense_weight: torch.Tensor, bias=None) -> torch.Tensor:
    return F.linear(x, dense_weight, bias)


def eligibility(x: torch.Tensor, bsw: BlockSparseWeight, bias=None, *,
                force_reference: bool = False) -> tuple[bool, str]:
    """(True, "") when `block_sparse_linear` would run the Triton kernels, else (False, why it runs the reference)."""
    if force_reference:
        return False, "force_reference=True"
    if triton is None:
        return False, "triton is not installed"
    if x.device != bsw.device:
        return False, f"x on {x.device}, the weight layout on {bsw.device}"
    if bias is not None and bias.device != x.device:
        return False, f"x on {x.device}, bias on {bias.device}"
    reason = _device_reason(x.device, _block_sparse_mm_kernel)
    if reason:
        return False, reason
    if x.dtype not in DTYPES:
        return False, f"dtype {x.dtype} not supported (supported: {', '.join(map(str, DTYPES))})"
    if x.dtype != bsw.dtype:
        return False, f"x is {x.dtype} but the weight is {bsw.dtype}"
    if bias is not None and bias.dtype != x.dtype:
        return False, f"x is {x.dtype} but the bias is {bias.dtype}"
    if x.dtype == torch.bfloat16 and _interpreted(_block_sparse_mm_kernel):
        return False, "Triton's interpreter gets tl.dot on bfloat16 wrong (triton 3.9); bf16 runs on the GPU only"
    if torch.is_autocast_enabled(x.device.type):
        return False, "autocast is enabled (the reference's F.linear applies it; the kernel would not)"
    if x.dim() == 0 or x.shape[-1] != bsw.shape[1]:
        return False, f"x has shape {tuple(x.shape)}, the weight {bsw.shape}"
    if bias is not None and tuple(bias.shape) != (bsw.shape[0],):
        return False, f"bias has shape {tuple(bias.shape)}, expected ({bsw.shape[0]},)"
    if any(b < 16 or b & (b - 1) for b in bsw.block):
        return False, f"block {bsw.block}: the kernel needs powers of two >= 16"
    if bsw.shape[1] == 0:
        return False, "the weight has no input features"
    return True, ""


def block_sparse_linear(x: torch.Tensor, bsw: BlockSparseWeight, bias=None, *,
                        force_reference: bool = False) -> torch.Tensor:
    """F.linear(x, W, bias) for the W that `bsw` was built from, reading only its nonzero blocks."""
    if not torch.compiler.is_compiling() and tensor_version(bsw.dense) != bsw.version:
        raise RuntimeError("the weight changed in place after its BlockSparseWeight was built; rebuild the layout")
    ok, _ = eligibility(x, bsw, bias, force_reference=force_reference)
    _record("block_sparse_linear", ok)
    if not ok:
        return reference_block_sparse_linear(x, bsw.dense, bias)
    bias = bias.contiguous() if bias is not None else None  # the kernel reads it as packed
    y = torch.ops.frzcompile.block_sparse_mm(x.reshape(-1, x.shape[-1]), bsw.blocks, bsw.row_ptr, bsw.col_idx,
                                             bsw.col_ptr, bsw.row_idx, bsw.block_id, bias, bsw.shape[0])
    return y.view(*x.shape[:-1], bsw.shape[0])


if triton is not None:
    @triton.jit
    def _block_sparse_mm_kernel(a_ptr, blocks_ptr, ptr_ptr, idx_ptr, bid_ptr, bias_ptr, out_ptr, M, IN, OUT,
                                IB: tl.constexpr, OB: tl.constexpr, STRIDE_IB: tl.constexpr, STRIDE_OB: tl.constexpr,
                                INDIRECT: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr,
                                INPUT_PRECISION: tl.constexpr):
        """out (M, OUT) = a (M, IN) @ W', W' the block-sparse (IN, OUT) matrix in `blocks`, seen as (IB, OB) tiles
        with element strides (STRIDE_IB, STRIDE_OB). Program (m, o) owns out[m*BM:, o*OB:] and reads the entries
        ptr[o]:ptr[o+1]: idx is the input block of each, bid its packed block (or the entry itself unless INDIRECT).
        Forward: W' = W.T, CSR index; backward (grad_x = grad_y @ W): W' = W, CSC index."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        o = tl.program_id(1)
        r_in = tl.arange(0, IB)
        r_out = tl.arange(0, OB)
        a_rows = a_ptr + rows.to(tl.int64)[:, None] * IN
        tile = r_in[:, None] * STRIDE_IB + r_out[None, :] * STRIDE_OB
        acc = tl.zeros((BM, OB), dtype=tl.float32)
        for e in range(tl.load(ptr_ptr + o), tl.load(ptr_ptr + o + 1)):
            cols = tl.load(idx_ptr + e) * IB + r_in
            a = tl.load(a_rows + cols[None, :], mask=(rows[:, None] < M) & (cols[None, :] < IN), other=0.0)
            if INDIRECT:
                b = tl.load(bid_ptr + e)
            else:
                b = e
            w = tl.load(blocks_ptr + b.to(tl.int64) * (IB * OB) + tile)  # zero-padded: no mask
            acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
        cols_out = o * OB + r_out
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols_out, mask=cols_out < OUT, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * OUT + cols_out[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rows[:, None] < M) & (cols_out[None, :] < OUT))

    def _launch(a, blocks, ptr, idx, bid, bias, out_features, forward):
        m, in_features = a.shape
        bn, bk = blocks.shape[1:]
        ib, ob = (bk, bn) if forward else (bn, bk)
        out = torch.empty((m, out_features), dtype=a.dtype, device=a.device)
        if out.numel() == 0:
            return out
        bm = max(16, min(128, triton.next_power_of_2(m)))
        # fp32 follows torch's matmul setting: TF32 tensor cores only where torch would use them too
        precision = "tf32" if a.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"
        grid = (triton.cdiv(m, bm), ptr.numel() - 1)
        torch.library.wrap_triton(_block_sparse_mm_kernel)[grid](
            a, blocks, ptr, idx, bid, bias, out, m, in_features, out_features,
            IB=ib, OB=ob, STRIDE_IB=1 if forward else bk, STRIDE_OB=bk if forward else 1, INDIRECT=not forward,
            HAS_BIAS=bias is not None, BM=bm, INPUT_PRECISION=precision, num_warps=4,
            num_stages=3 if a.element_size() == 2 else 2)  # fp32 tiles are twice as big: fewer in shared memory
        return out

    @torch.library.triton_op("frzcompile::block_sparse_mm", mutates_args=())
    def _block_sparse_mm(x: torch.Tensor, blocks: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                         col_ptr: torch.Tensor, row_idx: torch.Tensor, block_id: torch.Tensor,
                         bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
        """x (M, K) -> x @ W.T + bias, (M, N). The CSC index (col_ptr, row_idx, block_id) is for the backward."""
        return _launch(x.contiguous(), blocks, row_ptr, col_idx, None, bias, out_features, forward=True)

    @torch.library.triton_op("frzcompile::block_sparse_mm_grad", mutates_args=())
    def _block_sparse_mm_grad(grad: torch.Tensor, blocks: torch.Tensor, col_ptr: torch.Tensor,
                              row_idx: torch.Tensor, block_id: torch.Tensor, in_features: int,
                              row_ptr: torch.Tensor, col_idx: torch.Tensor) -> torch.Tensor:
        """grad (M, N) -> grad @ W, (M, K). The CSR index (row_ptr, col_idx) is for its own backward (double
        backward: a gradient of the input gradient)."""
        return _launch(grad.contiguous(), blocks, col_ptr, row_idx, block_id, None, in_features, forward=False)

    def _setup_context(ctx, inputs, output):
        x, blocks, row_ptr, col_idx, col_ptr, row_idx, block_id, _, _ = inputs
        ctx.save_for_backward(blocks, row_ptr, col_idx, col_ptr, row_idx, block_id)
        ctx.in_features = x.shape[1]

    def _backward(ctx, grad):
        blocks, row_ptr, col_idx, col_ptr, row_idx, block_id = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.frzcompile.block_sparse_mm_grad(grad, blocks, col_ptr, row_idx, block_id,
                                                               ctx.in_features, row_ptr, col_idx)
        if ctx.needs_input_grad[7]:
            grad_bias = grad.sum(0)
        return grad_x, None, None, None, None, None, None, grad_bias, None

    _block_sparse_mm.register_autograd(_backward, setup_context=_setup_context)

    def _setup_grad_context(ctx, inputs, output):
        grad, blocks, col_ptr, row_idx, block_id, _, row_ptr, col_idx = inputs
        ctx.save_for_backward(blocks, row_ptr, col_idx, col_ptr, row_idx, block_id)
        ctx.out_features = grad.shape[1]

    def _grad_backward(ctx, gg):
        """The input gradient grad @ W is linear in grad: its gradient is gg @ W.T, the forward op."""
        blocks, row_ptr, col_idx, col_ptr, row_idx, block_id = ctx.saved_tensors
        grad_grad = torch.ops.frzcompile.block_sparse_mm(gg, blocks, row_ptr, col_idx, col_ptr, row_idx, block_id,
                                                         None, ctx.out_features) if ctx.needs_input_grad[0] else None
        return grad_grad, None, None, None, None, None, None, None

    _block_sparse_mm_grad.register_autograd(_grad_backward, setup_context=_setup_grad_context)
