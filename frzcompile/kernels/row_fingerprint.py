"""A 128-bit fingerprint of each row's bytes: the key under which the activation cache stores a sample.

    keys = row_fingerprint(x)   # x (B, ...) of any dtype -> (B, 2) int64

The hash reads the raw bytes (two tensors that compare equal, like 0.0 and -0.0 or the same values in
different dtypes, get different keys), as little-endian 32-bit words with the last one zero-padded, and mixes in
the row length in bytes (so zero padding cannot make two rows of different length collide). Four independent
32-bit lanes each map word w at position i to fmix32(w * A + i * B + S), a bijection in w for fixed i (A is odd;
fmix32 is murmur3's finalizer), add these up modulo 2**32, then finalize the sum with the length. Because each
term is a bijection in its word and the sum is taken in a group, changing a single word (a single bit, say)
changes every lane: such rows never collide. Otherwise the lanes are well mixed but not cryptographic.

Kernel and reference are bitwise identical: the kernel works in uint32 (wrapping), the reference in int64 with
every product split so that it never overflows, masked to 32 bits.
"""
import math

import torch

from . import _device_reason, _record

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

M32 = 0xFFFFFFFF
# Rows: the word multipliers A (odd), position multipliers B and seeds S; column l is lane l's. (xxhash and
# murmur3 primes, digits of pi: any odd A and distinct B, S would do.)
LANES = (
    (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F),
    (0x165667B1, 0xCC9E2D51, 0x1B873593, 0x7FEB352D),
    (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
)
LENGTH_MUL = 0x9E3779B9
_WORDS_PER_CHUNK = 1 << 20  # reference: words hashed per step, bounding its temporaries at 4 lanes x 8 MiB


def _row_words(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The rows of x as (B, W) int32 words (bytes in memory order, the last word zero-padded), and the row length
    in bytes. No copy when x is contiguous with whole, aligned words."""
    data = x.reshape(x.shape[0], math.prod(x.shape[1:])).contiguous().view(torch.uint8)
    nbytes = data.shape[1]
    if nbytes == 0:  # (viewing empty rows as another dtype trips over their strides)
        return data.new_empty((data.shape[0], 0), dtype=torch.int32), 0
    # Rows of 4- or 8-byte elements start on whole words; smaller ones may not (torch.compile cannot check).
    aligned = x.element_size() >= 4 or (not torch.compiler.is_compiling() and data.storage_offset() % 4 == 0)
    if nbytes % 4 or not aligned:
        padded = data.new_zeros(data.shape[0], -(-nbytes // 4) * 4)
        padded[:, :nbytes] = data
        data = padded
    return data.view(torch.int32), nbytes


def _mul32(a, c):
    """(a * c) mod 2**32 for a, c in [0, 2**32) (int64 tensors or ints), with no intermediate above 2**49."""
    return (a * (c & 0xFFFF) + (((a * (c >> 16)) & 0xFFFF) << 16)) & M32


def _fmix32_reference(h):
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def reference_row_fingerprint(x: torch.Tensor) -> torch.Tensor:
    """Pure PyTorch: (B, ...) -> (B, 2) int64, bitwise equal to the kernel."""
    words, nbytes = _row_words(x.detach())
    rows, n_words = words.shape
    mul_w, mul_p, seed = (torch.tensor(c, dtype=torch.int64, device=words.device)[:, None, None] for c in LANES)
    acc = torch.zeros(len(LANES[0]), rows, 1, dtype=torch.int64, device=words.device)
    step = max(1, _WORDS_PER_CHUNK // max(rows, 1))
    for start in range(0, n_words, step):
        w = words[None, :, start:start + step].to(torch.int64) & M32  # reinterpret as unsigned
        pos = torch.arange(start, start + w.shape[-1], device=words.device)
        m = _fmix32_reference((_mul32(w, mul_w) + _mul32(pos, mul_p) + seed) & M32)
        acc = (acc + m.sum(-1, keepdim=True)) & M32
    h = _fmix32_reference(((acc + _mul32(nbytes & M32, LENGTH_MUL)) & M32) ^ seed)[:, :, 0].T  # (B, 4)
    # Lane pairs (0, 1) and (2, 3) become the low and high halves of two int64 values, as the kernel stores them.
    return torch.where(h >= 2**31, h - 2**32, h).to(torch.int32).contiguous().view(torch.int64)


def eligibility(x: torch.Tensor, *, force_reference: bool = False) -> tuple[bool, str]:
    """(True, "") when `row_fingerprint` would run the Triton kernel, else (False, why it runs the reference)."""
    if force_reference:
        return False, "force_reference=True"
    if triton is None:
        return False, "triton is not installed"
    reason = _device_reason(x.device, _row_fingerprint_kernel)
    if reason:
        return False, reason
    if x.dim() == 0:
        return False, "x must have a batch dimension"
    return True, ""


def row_fingerprint(x: torch.Tensor, *, force_reference: bool = False) -> torch.Tensor:
    """x (B, ...) of any dtype -> (B, 2) int64: a 128-bit fingerprint of each row's bytes and length."""
    ok, _ = eligibility(x, force_reference=force_reference)
    _record("row_fingerprint", ok)
    if not ok:
        return reference_row_fingerprint(x)
    words, nbytes = _row_words(x.detach())
    return torch.ops.frzcompile.row_fingerprint(words, nbytes)


if triton is not None:
    _LENGTH_MUL = tl.constexpr(LENGTH_MUL)  # jitted code reads only constexpr globals

    @triton.jit
    def _fmix32(h):
        # murmur3's finalizer: a bijection on uint32 that spreads every input bit over all output bits
        h ^= h >> 16
        h *= 0x85EBCA6B
        h ^= h >> 13
        h *= 0xC2B2AE35
        h ^= h >> 16
        return h

    @triton.jit
    def _row_fingerprint_kernel(words_ptr, lanes_ptr, out_ptr, n_words, nbytes, BLOCK: tl.constexpr):
        # One program per row; the 4 lanes are the rows of (4, BLOCK) tiles.
        row = tl.program_id(0)
        lane = tl.arange(0, 4)
        mul_w = tl.load(lanes_ptr + lane).to(tl.uint32)[:, None]
        mul_p = tl.load(lanes_ptr + 4 + lane).to(tl.uint32)[:, None]
        seed = tl.load(lanes_ptr + 8 + lane).to(tl.uint32)
        acc = tl.zeros((4,), dtype=tl.int64)
        row_ptr = words_ptr + row.to(tl.int64) * n_words
        for start in range(0, n_words, BLOCK):
            pos = start + tl.arange(0, BLOCK)
            valid = pos < n_words
            w = tl.load(row_ptr + pos, mask=valid, other=0).to(tl.uint32, bitcast=True)
            m = _fmix32(w[None, :] * mul_w + pos.to(tl.uint32)[None, :] * mul_p + seed[:, None])
            acc = (acc + tl.sum(tl.where(valid[None, :], m, 0).to(tl.int64), axis=1)) & 0xFFFFFFFF
        h = _fmix32((acc.to(tl.uint32) + tl.cast(nbytes, tl.uint32) * _LENGTH_MUL) ^ seed)
        tl.store(out_ptr + row * 4 + lane, h.to(tl.int32, bitcast=True))

    @torch.library.triton_op("frzcompile::row_fingerprint", mutates_args=())
    def _row_fingerprint_op(words: torch.Tensor, nbytes: int) -> torch.Tensor:
        """words (B, W) int32 from `_row_words` -> (B, 2) int64."""
        rows, n_words = words.shape
        out = torch.empty((rows, 2), dtype=torch.int64, device=words.device)
        if rows == 0:
            return out
        lanes = torch.tensor(LANES, dtype=torch.int64, device=words.device)
        block = max(16, min(1024, triton.next_power_of_2(n_words)))
        torch.library.wrap_triton(_row_fingerprint_kernel)[(rows,)](
            words, lanes, out.view(torch.int32), n_words, nbytes & M32, BLOCK=block, num_warps=4)
        return out
