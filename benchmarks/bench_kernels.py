"""The Triton kernels on a CUDA GPU, against what they replace.

Part A, block-sparse matmul: y = x @ W.T for an (N, K) weight with a fraction s of its 64x64 blocks empty
(chosen at random, exactly round(s * blocks)), against dense torch.matmul on the same weight; forward, and the
backward's grad_x = grad_y @ W. Reading only nonzero blocks, the ideal speedup is 1 / (1 - s).
Part B, memory-bound kernels as bandwidth (bytes read + written / time) against the GPU's peak: gather-and-cast of
cached fp32 rows into fp16/bf16, and the row fingerprint (bytes read). The unfused index_select + .to is timed
beside gather_cast and its figure counts the same bytes: an effective bandwidth (it moves twice as many).

Times are triton.testing.do_bench medians in ms with the 20th and 80th percentiles. Prints Markdown tables and
writes JSON to benchmarks/results/kernels.json (or --out). Without a CUDA GPU or without Triton it prints why to
stderr and exits with status 1.

    python benchmarks/bench_kernels.py [--m 4096 --n 4096 --k 4096] [--peak-gbps 3350] [--out FILE.json]
"""
import argparse
import json
import os
import platform
import sys
from functools import partial

import torch

from common import print_table

# Peak DRAM bandwidth in GB/s by device-name substring (first match wins: more specific names first).
PEAK_GBPS = (("H200", 4800), ("H100 PCIe", 2000), ("H100 NVL", 3900), ("H100", 3350), ("A100-SXM4-80GB", 2039),
             ("A100 80GB", 1935), ("A100", 1555), ("L40S", 864), ("L4", 300), ("A10G", 600), ("A10", 600),
             ("RTX 4090", 1008), ("V100", 900), ("T4", 320))
QUANTILES = [0.5, 0.2, 0.8]


def timed(fn):
    """(median, p20, p80) in ms."""
    from triton.testing import do_bench

    return tuple(do_bench(fn, quantiles=QUANTILES))


def fmt(ms):
    return f"{ms[0]:.3f} [{ms[1]:.3f}, {ms[2]:.3f}]"


def block_masked_weight(n, k, block, sparsity, dtype, device):
    """(n, k) random weight with exactly round(sparsity * blocks) of its blocks zeroed."""
    nb_n, nb_k = n // block[0], k // block[1]
    keep = torch.ones(nb_n * nb_k, device=device)
    keep[torch.randperm(nb_n * nb_k, device=device)[:round(sparsity * nb_n * nb_k)]] = 0
    keep = keep.view(nb_n, nb_k).repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return (torch.randn(n, k, device=device) * keep).to(dtype)


def part_a(args, device):
    from frzcompile.kernels import block_sparse_matmul as bsm

    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        x = torch.randn(args.m, args.k, device=device, dtype=dtype)
        grad = torch.randn(args.m, args.n, device=device, dtype=dtype)
        for s in args.sparsities:
            w = block_masked_weight(args.n, args.k, bsm.DEFAULT_BLOCK, s, dtype, device)
            bsw = bsm.BlockSparseWeight.from_dense(w)
            assert bsm.eligibility(x, bsw) == (True, ""), bsm.eligibility(x, bsw)
            grad_x = partial(torch.ops.frzcompile.block_sparse_mm_grad, grad, bsw.blocks, bsw.col_ptr, bsw.row_idx,
                             bsw.block_id, args.k, bsw.row_ptr, bsw.col_idx)
            cases = {"forward": (partial(torch.matmul, x, w.T), partial(bsm.block_sparse_linear, x, bsw)),
                     "grad_x": (partial(torch.matmul, grad, w), grad_x)}
            for name, (dense, sparse) in cases.items():
                torch.testing.assert_close(sparse(), dense(), atol=0.5, rtol=0.05)  # time only correct kernels
                dense_ms, sparse_ms = timed(dense), timed(sparse)
                rows.append({"dtype": dtype_name, "pass": name, "block_sparsity": bsw.block_sparsity,
                             "dense_ms": dense_ms, "block_sparse_ms": sparse_ms,
                             "speedup": dense_ms[0] / sparse_ms[0], "ideal_speedup": 1 / (1 - bsw.block_sparsity)})
    return rows


def unfused_gather_cast(src, index, out_dtype):
    return src.index_select(0, index).to(out_dtype)


def part_b(args, device):
    from frzcompile.kernels.gather_cast import gather_cast
    from frzcompile.kernels.row_fingerprint import row_fingerprint

    src = torch.randn(args.cache_rows, args.row_len, device=device)
    index = torch.randint(0, args.cache_rows, (args.batch,), device=device)
    rows = []
    for out_name in ("float16", "bfloat16"):
        out_dtype = getattr(torch, out_name)
        moved = args.batch * args.row_len * (src.element_size() + out_dtype.itemsize) + index.numel() * 8
        torch.testing.assert_close(gather_cast(src, index, out_dtype), src[index].to(out_dtype), atol=0, rtol=0)
        for name, fn in (("gather_cast", partial(gather_cast, src, index, out_dtype)),
                         ("index_select + to (unfused)", partial(unfused_gather_cast, src, index, out_dtype))):
            rows.append({"kernel": name, "what": f"float32 -> {out_name}", "bytes": moved, "ms": timed(fn)})
    batch = src[index]
    rows.append({"kernel": "row_fingerprint", "what": "float32 rows", "bytes": batch.numel() * 4,
                 "ms": timed(partial(row_fingerprint, batch))})
    for r in rows:
        r["gbps"] = r["bytes"] / (r["ms"][0] * 1e-3) / 1e9
    return rows


def peak_gbps(args, name):
    if args.peak_gbps:
        return args.peak_gbps
    return next((gbps for key, gbps in PEAK_GBPS if key in name), None)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=4096, help="tokens (rows of x)")
    parser.add_argument("--n", type=int, default=4096, help="out features (multiple of 64)")
    parser.add_argument("--k", type=int, default=4096, help="in features (multiple of 64)")
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    parser.add_argument("--cache-rows", type=int, default=32768, help="rows in the gathered-from cache")
    parser.add_argument("--row-len", type=int, default=4096, help="elements per cached row")
    parser.add_argument("--batch", type=int, default=4096, help="rows gathered per call")
    parser.add_argument("--peak-gbps", type=float, default=None, help="peak DRAM bandwidth (default: by GPU name)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "kernels.json"))
    args = parser.parse_args()

    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured.")
    from frzcompile.kernels import triton_available

    if not triton_available():
        sys.exit("bench_kernels.py needs Triton (pip install triton); nothing was measured.")
    import triton

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    torch.manual_seed(0)
    matmul = part_a(args, device)
    bandwidth = part_b(args, device)
    peak = peak_gbps(args, name)

    print(f"Device: {name}; torch {torch.__version__}, triton {triton.__version__}. "
          f"Times: do_bench median [p20, p80] ms.\n")
    print(f"### Block-sparse matmul, M={args.m} N={args.n} K={args.k}, 64x64 blocks\n")
    print_table(["dtype", "pass", "block sparsity", "dense ms", "block-sparse ms", "speedup", "ideal 1/(1-s)",
                 "of ideal"],
                [[r["dtype"], r["pass"], f"{r['block_sparsity']:.2f}", fmt(r["dense_ms"]), fmt(r["block_sparse_ms"]),
                  f"{r['speedup']:.2f}x", f"{r['ideal_speedup']:.2f}x", f"{r['speedup'] / r['ideal_speedup']:.0%}"]
                 for r in matmul])
    print(f"\n### Bandwidth, {args.batch} of {args.cache_rows} rows x {args.row_len}; "
          f"peak {f'{peak:.0f} GB/s' if peak else 'unknown (pass --peak-gbps)'}\n")
    print_table(["kernel", "what", "MB moved", "ms", "GB/s", "of peak"],
                [[r["kernel"], r["what"], f"{r['bytes'] / 1e6:.1f}", fmt(r["ms"]), f"{r['gbps']:.0f}",
                  f"{r['gbps'] / peak:.0%}" if peak else "n/a"] for r in bandwidth])

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": name, "peak_gbps": peak, "torch": torch.__version__, "triton": triton.__version__,
                   "python": platform.python_version(), "args": vars(args), "quantiles": QUANTILES,
                   "block_sparse_matmul": matmul, "bandwidth": bandwidth}, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
