"""The instruction mix of frzcompile's Triton kernels compiled for an sm_90 (H100/H200) target, without a GPU:
Triton's own compiler, ptxas and nvdisasm (shipped with Triton's NVIDIA backend) turn each kernel into SASS, and
this script counts the instructions of each loop body per element each thread handles, its registers, and the
widest global load. For memory-bound kernels it gives the issue-bound ceiling: an SM issues at most one warp
instruction per cycle in each of its 4 schedulers (128 thread instructions per cycle), so a loop that issues I
instructions per 4-byte word cannot read faster than 4 * 128 / I bytes per cycle per SM, whatever the memory.

    python benchmarks/kernel_sass.py [--sms 132] [--clock-ghz 1.98] [--peak-gbps 4800]   (defaults: an H200)

Integer arguments are compiled as multiples of 16 and pointers as 16-byte aligned, as Triton specializes them at
run time for the benchmark's sizes. Nothing here is a timing: bench_kernels.py on a GPU measures.
"""
import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from frzcompile.kernels import gather_cast as gc
from frzcompile.kernels import row_fingerprint as rf

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_sm90(fn, types, constexprs, num_warps=4):
    signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
               if types.get(name, "constexpr") != "constexpr"}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 3})
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", path], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    return sass, int(regs.group(1)) if regs else None


def opcodes(lines):
    out = []
    for line in lines:
        m = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            out.append(m.group(1))
    return out


def loop_bodies(sass):
    """Opcodes of each loop body (a label up to a branch back to it)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) for m in [re.match(r"\s*(\.L_x_\d+):", line)] if m}
    bodies = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i + 1) < i:
            body = opcodes(lines[labels[m.group(1)]:i + 1])
            if len(body) > 4:
                bodies.append(body)
    return bodies


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sms", type=int, default=132)
    parser.add_argument("--clock-ghz", type=float, default=1.98)
    parser.add_argument("--peak-gbps", type=float, default=4800.0)
    args = parser.parse_args()
    fp_types = {"words_ptr": "*i32", "out_ptr": "*i32", "n_words": "i32",
                "split_pairs": "i32", "nbytes": "i32"}
    block = 512
    sass, regs = compile_sm90(rf._row_fingerprint_kernel, fp_types, {"BLOCK": block, "FINISH": True, "PAIRED": True})
    words_per_thread = 2 * block // 128  # BLOCK pairs per iteration over 4 warps
    print(f"row_fingerprint (BLOCK={block} pairs, 4 warps): {regs} registers")
    for body in loop_bodies(sass):
        per_word = len(body) / words_per_thread
        ceiling = 4 * 128 / per_word * args.sms * args.clock_ghz
        loads = sorted({op for op in body if op.startswith("LDG")})
        print(f"  loop: {len(body)} instructions for {words_per_thread} words a thread = {per_word:.1f} per word; "
              f"loads {loads}; issue-bound ceiling {ceiling:.0f} GB/s = {100 * ceiling / args.peak_gbps:.0f}% of "
              f"{args.peak_gbps:.0f} GB/s")
        print("   ", dict(collections.Counter(op.split(".")[0] for op in body).most_common(8)))
    gc_types = {"src_ptr": "*fp32", "index_ptr": "*i64", "out_ptr": "*bf16", "row_len": "i32", "col_blocks": "i32"}
    sass, regs = compile_sm90(gc._gather_cast_kernel, gc_types, {"BLOCK": 2048})
    ops = opcodes(sass.splitlines())
    loads = collections.Counter(o for o in ops if o.startswith("LDG"))
    stores = collections.Counter(o for o in ops if o.startswith("STG"))
    print(f"gather_cast (BLOCK=2048, fp32 -> bf16, 4 warps): {regs} registers, {len(ops)} instructions for "
          f"{2048 // 128} elements a thread; global loads {dict(loads)}, stores {dict(stores)}")


if __name__ == "__main__":
    main()
