"""The kernel layer: each Triton kernel against its PyTorch reference, and when each path runs.

Without a GPU the Triton paths run on CPU tensors in Triton's interpreter: conftest.py sets TRITON_INTERPRET=1
before anything imports Triton (`triton.jit` reads it at decoration time), and the wrappers check it again at
call time.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from frzcompile import kernels
from frzcompile.kernels import block_sparse_matmul as bsm
from frzcompile.kernels import gather_cast as gc
from frzcompile.kernels import row_fingerprint as rf

M, N, K = 37, 100, 129  # none a multiple of the blocks: every kernel masks its edges


@pytest.fixture
def interpret(monkeypatch):
    """Run the Triton paths on CPU tensors, in Triton's interpreter; yields the log of the paths taken."""
    pytest.importorskip("triton")
    if not kernels._interpreted(bsm._block_sparse_mm_kernel):
        pytest.skip("the kernel modules were imported without TRITON_INTERPRET=1 (see conftest.py)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with kernels.recording_paths() as log:
        yield log


def masked_weight(n, k, block, density, dtype=torch.float32, seed=0):
    """An (n, k) weight whose (block)-tiles are each kept with probability `density`, others all zero."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(-(-n // block[0]), -(-k // block[1]), generator=g) < density
    keep = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:n, :k]
    return (torch.randn(n, k, generator=g) * keep).to(dtype)


# -- block-sparse matmul ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
def test_layout_round_trip_and_indexes(density):
    w = masked_weight(N, K, (16, 32), density)
    bsw = bsm.BlockSparseWeight.from_dense(w, block=(16, 32))
    nb_n, nb_k = 7, 5  # ceil(100 / 16), ceil(129 / 32)
    assert bsw.blocks.shape[1:] == (16, 32) and bsw.row_ptr.shape == (nb_n + 1,) and bsw.col_ptr.shape == (nb_k + 1,)
    assert torch.equal(bsw.to_dense(), w)
    empty = sum(not w[i * 16:(i + 1) * 16, j * 32:(j + 1) * 32].any() for i in range(nb_n) for j in range(nb_k))
    assert bsw.block_sparsity == pytest.approx(empty / (nb_n * nb_k))
    if density in (0.0, 1.0):
        assert bsw.block_sparsity == 1.0 - density
    # The CSC index lists the same blocks as the CSR one.
    csr = {(i, int(bsw.col_idx[p]), p) for i in range(nb_n) for p in range(bsw.row_ptr[i], bsw.row_ptr[i + 1])}
    csc = {(int(bsw.row_idx[q]), j, int(bsw.block_id[q])) for j in range(nb_k)
           for q in range(bsw.col_ptr[j], bsw.col_ptr[j + 1])}
    assert csr == csc


def test_block_sparse_reference_fallback():
    w = masked_weight(N, K, (16, 32), 0.5)
    bsw = bsm.BlockSparseWeight.from_dense(w, block=(16, 32))
    x, bias = torch.randn(M, K), torch.randn(N)
    with kernels.recording_paths() as log:
        torch.testing.assert_close(bsm.block_sparse_linear(x, bsw, bias, force_reference=True), F.linear(x, w, bias))
    assert log.last["block_sparse_linear"] == "reference"
    assert bsm.eligibility(x, bsw, force_reference=True) == (False, "force_reference=True")
    if not kernels.triton_available():
        assert bsm.eligibility(x, bsw) == (False, "triton is not installed")


def test_block_sparse_eligibility_reasons(interpret, monkeypatch):
    w = masked_weight(N, K, (16, 32), 0.5)
    bsw = bsm.BlockSparseWeight.from_dense(w, block=(16, 32))
    x, bias = torch.randn(M, K), torch.randn(N)
    assert bsm.eligibility(x, bsw, bias) == (True, "")

    def reason(*args, **kwargs):
        ok, why = bsm.eligibility(*args, **kwargs)
        assert not ok and why
        return why

    assert "float64" in reason(x.double(), bsm.BlockSparseWeight.from_dense(w.double(), (16, 32)))
    assert "weight is torch.float32" in reason(x.half(), bsw)
    assert "bias is torch.float16" in reason(x, bsw, bias.half())
    assert "shape" in reason(x[:, :-1], bsw)
    assert "powers of two" in reason(x, bsm.BlockSparseWeight.from_dense(w, (24, 32)))
    with torch.autocast("cpu"):
        assert "autocast" in reason(x, bsw)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET=1 is not set" in reason(x, bsw)


def test_block_sparse_layout_is_a_snapshot():
    w = masked_weight(N, K, (16, 32), 0.5)
    bsw = bsm.BlockSparseWeight.from_dense(w, block=(16, 32))
    w.mul_(2)
    with pytest.raises(RuntimeError, match="rebuild"):
        bsm.block_sparse_linear(torch.randn(2, K), bsw)
    fresh = copy.deepcopy(bsm.BlockSparseWeight.from_dense(w, block=(16, 32)))  # copies restart version counters
    torch.testing.assert_close(bsm.block_sparse_linear(torch.ones(2, K), fresh), F.linear(torch.ones(2, K), w))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2)])
@pytest.mark.parametrize("block", [(16, 32), (32, 16)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_block_sparse_matches_reference(interpret, dtype, tol, block, density):
    w = masked_weight(N, K, block, density, dtype)
    bsw = bsm.BlockSparseWeight.from_dense(w, block=block)
    x = torch.randn(3, 13, K, dtype=dtype, requires_grad=True)  # 39 rows, not a multiple of the row tile
    bias = torch.randn(N, dtype=dtype, requires_grad=True)
    y = bsm.block_sparse_linear(x, bsw, bias)
    assert interpret.counts["block_sparse_linear", "triton"] == 1 and y.shape == (3, 13, N)
    grad = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, (x, bias), grad)
    y_ref = bsm.reference_block_sparse_linear(x, w, bias)
    gx_ref, gb_ref = torch.autograd.grad(y_ref, (x, bias), grad)
    for got, want in [(y, y_ref), (gx, gx_ref), (gb, gb_ref)]:
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    tall = torch.randn(150, K, dtype=dtype)  # two row tiles of 128, no bias
    torch.testing.assert_close(bsm.block_sparse_linear(tall, bsw), F.linear(tall, w), atol=tol, rtol=tol)


def test_block_sparse_double_backward(interpret):
    """A gradient of the input gradient (a gradient penalty) through the kernel: its gradient op had no autograd
    formula ("Trying to backward through frzcompile.block_sparse_mm_grad")."""
    w = masked_weight(N, K, (16, 16), 0.5)
    bsw = bsm.BlockSparseWeight.from_dense(w, block=(16, 16))
    x = torch.randn(7, K, requires_grad=True)
    penalties = []
    for y in (bsm.block_sparse_linear(x, bsw), F.linear(x, w)):
        (gx,) = torch.autograd.grad(y.tanh().sum(), x, create_graph=True)
        (ggx,) = torch.autograd.grad(gx.square().sum(), x)
        penalties.append((gx, ggx))
    assert interpret.counts["block_sparse_linear", "triton"] >= 1
    for got, want in zip(*penalties):  # (fp32 sums in another order, relative to the largest value)
        torch.testing.assert_close(got, want, atol=1e-5 * want.detach().abs().max().item(), rtol=1e-4)
    assert penalties[0][1].abs().sum() > 0


def test_block_sparse_reads_a_strided_bias_and_refuses_no_input_features(interpret):
    w = masked_weight(N, K, (16, 16), 0.5)
    bsw = bsm.BlockSparseWeight.from_dense(w, block=(16, 16))
    x = torch.randn(5, K)
    for bias in (torch.randn(N, 2)[:, 0], torch.tensor([0.5]).expand(N)):  # strided, stride 0
        torch.testing.assert_close(bsm.block_sparse_linear(x, bsw, bias), F.linear(x, w, bias), atol=1e-4, rtol=1e-4)
        assert interpret.last["block_sparse_linear"] == "triton"
    empty = bsm.BlockSparseWeight.from_dense(torch.zeros(8, 0), block=(16, 16))
    bias = torch.randn(8)
    assert "no input features" in bsm.eligibility(torch.randn(3, 0), empty, bias)[1]
    torch.testing.assert_close(bsm.block_sparse_linear(torch.randn(3, 0), empty, bias), bias.expand(3, 8))


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")  # float32 on purpose: the kernel has no float64
def test_block_sparse_gradcheck(interpret):
    w = masked_weight(40, 48, (16, 16), 0.5)
    bsw = bsm.BlockSparseWeight.from_dense(w, block=(16, 16))
    x = torch.randn(3, 48, requires_grad=True)
    bias = torch.randn(40, requires_grad=True)
    # Linear in x and bias, so float32 finite differences are exact up to rounding.
    assert torch.autograd.gradcheck(lambda x, b: bsm.block_sparse_linear(x, bsw, b), (x, bias), eps=1e-2,
                                    atol=1e-3, rtol=1e-3, fast_mode=True)
    assert interpret.counts["block_sparse_linear", "reference"] == 0


def test_block_sparse_triton_path_really_runs(interpret, monkeypatch):
    w = masked_weight(N, K, (16, 32), 0.5)
    bsw = bsm.BlockSparseWeight.from_dense(w, block=(16, 32))
    monkeypatch.setattr(bsm, "reference_block_sparse_linear", lambda *a: pytest.fail("reference ran"))
    monkeypatch.setattr(F, "linear", lambda *a: pytest.fail("F.linear ran"))
    bsm.block_sparse_linear(torch.randn(M, K), bsw)
    assert interpret.last["block_sparse_linear"] == "triton"


def test_block_sparse_bfloat16_falls_back_in_the_interpreter(interpret):
    w = masked_weight(N, K, (16, 32), 0.5, torch.bfloat16)
    bsw = bsm.BlockSparseWeight.from_dense(w, block=(16, 32))
    x = torch.randn(M, K, dtype=torch.bfloat16)
    assert "bfloat16" in bsm.eligibility(x, bsw)[1]
    torch.testing.assert_close(bsm.block_sparse_linear(x, bsw), F.linear(x, w))
    assert interpret.last["block_sparse_linear"] == "reference"


# -- gather and cast ---------------------------------------------------------------------------------------------

def test_gather_cast_reference():
    src, index = torch.randn(10, 3, 7), torch.tensor([4, 0, 4, 9])
    with kernels.recording_paths() as log:
        out = gc.gather_cast(src, index, torch.float16, force_reference=True)
    assert out.dtype == torch.float16 and torch.equal(out, src[index].half())
    assert log.last["gather_cast"] == "reference"
    assert gc.eligibility(src, index, torch.float16, force_reference=True) == (False, "force_reference=True")


def test_gather_cast_eligibility_reasons(interpret):
    src, index = torch.randn(10, 3, 7), torch.tensor([4, 0, 4, 9])
    assert gc.eligibility(src, index, torch.float16) == (True, "")
    assert "contiguous" in gc.eligibility(src.transpose(1, 2), index, torch.float16)[1]
    assert "int16" in gc.eligibility(src.to(torch.int16), index, torch.float16)[1]
    assert "index" in gc.eligibility(src, index.float(), torch.float16)[1]
    assert "grad" in gc.eligibility(src.requires_grad_(), index, torch.float16)[1]
    assert "truncation" in gc.eligibility(src, index, torch.bfloat16)[1]  # an interpreter limitation


def test_gather_cast_reads_strided_indices_and_leaves_double_rounding_to_torch(interpret):
    src = torch.arange(40.0).view(10, 4)
    for index in (torch.tensor([3, 9, 1, 7, 5, 2])[::2], torch.tensor(4).expand(3)):  # strided, stride 0
        got = gc.gather_cast(src, index, torch.float16)
        assert torch.equal(got, gc.reference_gather_cast(src, index, torch.float16))
        assert interpret.last["gather_cast"] == "triton"
    # float64 -> float16: torch rounds through float32 (1 + 2**-11 + 2**-40 -> 1.0), a single cast would not
    src = torch.tensor([[1 + 2**-11 + 2**-40]], dtype=torch.float64)
    assert "float32" in gc.eligibility(src, torch.tensor([0]), torch.float16)[1]
    assert gc.gather_cast(src, torch.tensor([0]), torch.float16).item() == 1.0


@pytest.mark.parametrize("src_dtype,out_dtype", [(torch.float32, torch.float16), (torch.float64, torch.float32),
                                                 (torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
@pytest.mark.parametrize("row_shape", [(3, 37), (1,), (2100,)])  # 111 and 1 elements: masked; 2100: two slices
def test_gather_cast_matches_reference(interpret, src_dtype, out_dtype, row_shape):
    src = torch.randn(9, *row_shape).to(src_dtype)
    for index in (torch.tensor([8, 0, 3, 3, 5]), torch.tensor([2, 7], dtype=torch.int32), torch.zeros(0).long()):
        out = gc.gather_cast(src, index, out_dtype)
        assert interpret.last["gather_cast"] == "triton"
        assert out.dtype == out_dtype and torch.equal(out, gc.reference_gather_cast(src, index.long(), out_dtype))


# -- row fingerprint ---------------------------------------------------------------------------------------------

def fingerprint_set(keys):
    return {tuple(k) for k in keys.tolist()}


def test_row_fingerprint_single_bit_flips_never_collide():
    g = torch.Generator().manual_seed(0)
    row = torch.randint(0, 256, (1, 103), dtype=torch.uint8, generator=g)  # 103 bytes: a padded last word
    flips = row.repeat(103 * 8, 1)
    positions = torch.arange(103 * 8)
    flips[positions, positions // 8] ^= (1 << (positions % 8)).to(torch.uint8)
    keys = rf.row_fingerprint(torch.cat([row, flips]), force_reference=True)
    assert len(fingerprint_set(keys)) == 1 + 103 * 8


def test_row_fingerprint_two_bit_flips_never_collide_in_any_lane():
    """Every row one or two bit flips away from a 20-byte row (five words, so three pairs, the last padded): all
    distinct in each 32-bit lane on its own (a lane that summed u * A + v * D would collide on the top bits of the
    two words of a pair)."""
    g = torch.Generator().manual_seed(1)
    row = torch.randint(0, 256, (1, 20), dtype=torch.uint8, generator=g)
    a, b = torch.triu_indices(160, 160, 1)
    single = torch.arange(160)
    rows = row.repeat(1 + len(single) + len(a), 1)
    rows[1 + single, single // 8] ^= (1 << (single % 8)).to(torch.uint8)
    pairs = 1 + len(single) + torch.arange(len(a))
    rows[pairs, a // 8] ^= (1 << (a % 8)).to(torch.uint8)
    rows[pairs, b // 8] ^= (1 << (b % 8)).to(torch.uint8)
    lanes = rf.row_fingerprint(rows, force_reference=True).view(torch.int32)
    for lane in range(4):
        assert len(set(lanes[:, lane].tolist())) == len(rows)


def test_row_fingerprint_hashes_bytes_and_length():
    def keys(x):
        return rf.row_fingerprint(x, force_reference=True).tolist()

    x = torch.tensor([[0.0, 1.5], [-0.0, 1.5]])
    assert keys(x)[0] != keys(x)[1]  # 0.0 and -0.0 differ in one bit
    assert keys(x.double())[0] != keys(x)[0]  # same values, other bytes
    assert keys(torch.tensor([[7]], dtype=torch.uint8)) != keys(torch.tensor([[7, 0]], dtype=torch.uint8))  # length
    assert keys(x.clone()) == keys(x) and rf.row_fingerprint(x).dtype == torch.int64


@pytest.mark.parametrize("x", [
    torch.randn(5, 3, 7),                                  # whole words
    torch.randn(4, 3).half(),                              # 6 bytes a row: padded
    torch.randint(0, 256, (6, 13), dtype=torch.uint8),     # 13 bytes, rows not word aligned
    torch.rand(3, 5) > 0.5,                                # bool
    torch.randn(2, 1500, dtype=torch.float64),             # 3000 words: several kernel blocks
    torch.randn(3, 0),                                     # empty rows
    torch.randn(0, 5),                                     # no rows
    torch.randn(8, 2, 4)[:, :, 1],                         # not contiguous
    torch.randn(17).half()[1:].view(4, 4),                 # whole words, but starting mid-word
    torch.randn(4, 3).t()[:, :1],                          # (B, 1) whose last stride is not 1 ("contiguous")
], ids=["f32", "f16-odd", "u8-odd", "bool", "long-rows", "empty", "no-rows", "strided", "misaligned", "column"])
def test_row_fingerprint_bitwise_equals_reference(interpret, x):
    got = rf.row_fingerprint(x)
    assert interpret.last["row_fingerprint"] == "triton"
    assert torch.equal(got, rf.reference_row_fingerprint(x))


@pytest.mark.parametrize("x", [torch.randn(2, 20000), torch.randint(-2**31, 2**31 - 1, (3, 9001), dtype=torch.int32)],
                         ids=["even-splits", "short-last-split"])
def test_row_fingerprint_splits_long_rows_across_programs(interpret, x):
    """Few long rows: several programs share a row and a second kernel adds up their partial sums."""
    assert rf._splits(x.shape[0], (x.shape[1] + 1) // 2, 512, x.device) > 1
    x[1, -1] += 1  # a change in the last split's last word shows in the key
    keys = rf.row_fingerprint(x)
    assert interpret.last["row_fingerprint"] == "triton"
    assert torch.equal(keys, rf.reference_row_fingerprint(x)) and not torch.equal(keys[1], keys[0])


def test_row_fingerprint_single_bit_flips_in_the_kernel(interpret):
    row = torch.randn(1, 9).half()  # 18 bytes
    flips = row.view(torch.int16).repeat(18 * 8, 1)
    positions = torch.arange(18 * 8)
    flips[positions, positions // 16] ^= (1 << (positions % 16)).to(torch.int16)
    x = torch.cat([row, flips.view(torch.float16)])
    keys = rf.row_fingerprint(x)
    assert torch.equal(keys, rf.reference_row_fingerprint(x)) and len(fingerprint_set(keys)) == 1 + 18 * 8


# -- the package -------------------------------------------------------------------------------------------------

def run_python(code):
    """Run `code` in a fresh interpreter with TRITON_INTERPRET off; fail with its stderr."""
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "0"},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


def test_import_is_lean_and_works_without_triton():
    """A fresh interpreter with Triton made unimportable: the package imports, no CUDA starts, references run."""
    code = """
import sys
sys.modules["triton"] = None  # `import triton` now raises ImportError
import torch, frzcompile, frzcompile.kernels as k
from frzcompile.kernels import block_sparse_matmul as bsm, gather_cast as gc, row_fingerprint as rf
assert not k.triton_available() and not torch.cuda.is_initialized()
w = torch.zeros(40, 40); w[:16, :16] = 1
x = torch.randn(3, 40)
with k.recording_paths() as log:
    assert torch.equal(bsm.block_sparse_linear(x, bsm.BlockSparseWeight.from_dense(w)), x @ w.T)
    assert bsm.eligibility(x, bsm.BlockSparseWeight.from_dense(w)) == (False, "triton is not installed")
    assert gc.gather_cast(x, torch.tensor([2, 0]), torch.float16).dtype == torch.float16
    assert rf.row_fingerprint(x).shape == (3, 2)
assert log.last == {"block_sparse_linear": "reference", "gather_cast": "reference", "row_fingerprint": "reference"}
"""
    lean = "import sys, frzcompile, frzcompile.kernels; assert 'triton' not in sys.modules"
    run_python(code)
    run_python(lean)


def test_wrappers_trace_under_torch_compile():
    """Dynamo traces the wrappers without graph breaks (here on the reference paths, as the interpreter is eager)."""
    w = masked_weight(N, K, (16, 32), 0.5)
    bsw = bsm.BlockSparseWeight.from_dense(w, block=(16, 32))
    index = torch.tensor([1, 0])

    @torch.compile(backend="eager", fullgraph=True)
    def f(x):
        return bsm.block_sparse_linear(x, bsw), gc.gather_cast(x, index, torch.float16), rf.row_fingerprint(x)

    x = torch.randn(4, K)
    y, gathered, keys = f(x)
    torch.testing.assert_close(y, F.linear(x, w))
    assert torch.equal(gathered, x[index].half()) and torch.equal(keys, rf.reference_row_fingerprint(x))


GPU_CHECK = '''
import torch, triton
from torch._functorch.aot_autograd import aot_function
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from frzcompile.kernels import block_sparse_matmul as bsm, gather_cast as gc, row_fingerprint as rf

def compile_for_h100(fn, types, constexprs):
    signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})

for dt, forward in (("fp16", True), ("bf16", False)):
    types = {"a_ptr": "*" + dt, "blocks_ptr": "*" + dt, "ptr_ptr": "*i32", "idx_ptr": "*i32", "out_ptr": "*" + dt,
             "M": "i32", "IN": "i32", "OUT": "i32", **({"bias_ptr": "*" + dt} if forward else {"bid_ptr": "*i32"})}
    constexprs = dict(IB=64, OB=64, STRIDE_IB=1 if forward else 64, STRIDE_OB=64 if forward else 1, BM=128,
                      INDIRECT=not forward, HAS_BIAS=forward, INPUT_PRECISION="tf32",
                      **{("bid_ptr" if forward else "bias_ptr"): None})
    assert "wgmma" in compile_for_h100(bsm._block_sparse_mm_kernel, types, constexprs).asm["ptx"]
compile_for_h100(gc._gather_cast_kernel, {"src_ptr": "*fp32", "index_ptr": "*i64", "out_ptr": "*bf16",
                                          "row_len": "i32", "col_blocks": "i32"}, {"BLOCK": 2048})
for finish in (True, False):
    for paired in (True, False):
        compile_for_h100(rf._row_fingerprint_kernel, {"words_ptr": "*i32", "out_ptr": "*i32", "n_words": "i32",
                                                      "split_pairs": "i32", "nbytes": "i32"},
                         {"BLOCK": 512, "FINISH": finish, "PAIRED": paired})
compile_for_h100(rf._finish_kernel, {"part_ptr": "*i32", "out_ptr": "*i32", "n_splits": "i32", "nbytes": "i32"},
                 {"SPLITS": 16})

# What Inductor receives: the kernels themselves, forward and backward, not an opaque custom op.
graphs = []
def keep(gm, _):
    graphs.append(gm.code)
    return gm
bsw = bsm.BlockSparseWeight.from_dense(torch.randn(40, 48), block=(16, 16))
layout = (bsw.blocks, bsw.row_ptr, bsw.col_idx, bsw.col_ptr, bsw.row_idx, bsw.block_id)
with FakeTensorMode() as mode:
    x = mode.from_tensor(torch.randn(5, 48)).requires_grad_()
    y = aot_function(lambda x, *l: torch.ops.frzcompile.block_sparse_mm(x, *l, None, 40), keep, keep)(
        x, *(mode.from_tensor(t) for t in layout))
    y.sum().backward()
assert len(graphs) == 2 and all("triton_kernel_wrapper_functional" in g for g in graphs), graphs
# the fingerprint, one kernel for short rows and two (partial sums, then the finish) for few long ones
for shape, kernels in (((3, 8), 1), ((2, 20000), 2)):
    graphs.clear()
    with FakeTensorMode() as mode:
        aot_function(lambda w: torch.ops.frzcompile.row_fingerprint(w, 4 * shape[1]), keep)(
            mode.from_tensor(torch.zeros(shape, dtype=torch.int32)))
    assert graphs[0].count("triton_kernel_wrapper_functional(") == kernels, graphs
'''


def test_kernels_compile_for_the_gpu_and_trace_for_inductor():
    """Without a GPU: the kernels go through Triton's real compiler for an H100 (the interpreter accepts code the
    compiler rejects), and AOTAutograd traces the ops into Triton kernel nodes, forward and backward."""
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    run_python(GPU_CHECK)
