"""A 128-bit fingerprint of each row's bytes: the key under which the activation cache stores a sample.

    keys = row_fingerprint(x)   # x (B, ...) of any dtype -> (B, 2) int64

The hash reads the raw bytes (two tensors that compare equal, like 0.0 and -0.0 or the same values in
different dtypes, get different keys), as little-endian 32-bit words taken in pairs (the last pair zero-padded),
and mixes in the row length in bytes (so zero padding cannot make two rows of different length collide). Four
independent 32-bit lanes each map the pair (u, v) at pair position i to fmix32(xs(u * A + i * B + S) + v * D),
with xs(h) = h ^ (h >> 15): a bijection in u for fixed v and i, and in v for fixed u and i (A and D are odd; xs
and murmur3's finalizer fmix32 are bijections; xs keeps a flip of u's top bit from equalling a flip of v's, as it
would in u * A + v * D). Each lane adds its terms up modulo 2**32 and finalizes the sum with the length. Because
each term is a bijection in each of its words and the sum is taken in a group, changing a single word (a single
bit, say) changes every lane: such rows never collide. Otherwise the lanes are well mixed but not cryptographic
(in a test, every row one or two bit flips away from a 20-byte row differs from the others in each lane; two
rows differing in more than one word can share a lane, as in any such hash, but not all four). Pairs halve the
finalizer's work per word, and the instructions issued per word bound the kernel's speed: compiled for sm_90 its
loop issues about 31 per word, 67 with one finalizer per word (`python benchmarks/kernel_sass.py`).

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
# Rows: the first and second word's multipliers A and D (odd), position multipliers B and seeds S; column l is
# lane l's. (xxhash, murmur3 and splitmix primes, digits of pi: any odd A and D and distinct B, S would do.)
LANES = (
    (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F),
    (0x2545F491, 0x7F4A7C15, 0xD6E8FEB9, 0x94D049BB),
    (0x165667B1, 0xCC9E2D51, 0x1B873593, 0x7FEB352D),
    (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
)
LENGTH_MUL = 0x9E3779B9
_WORDS_PER_CHUNK = 1 << 20  # reference: words hashed per step, bounding its temporaries at 4 lanes x 8 MiB


def _row_words(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The rows of x as (B, W) int32 words (bytes in memory order, the last word zero-padded), and the row length
    in bytes. No copy when x is contiguous with whole, aligned words."""
    data = x.reshape(x.shape[0], math.prod(x.shape[1:]))
    if data.shape[1] and data.stride(1) != 1:  # (B, 1) with another last stride counts as contiguous to torch
        data = data.clone(memory_format=torch.contiguous_format)
    data = data.contiguous().view(torch.uint8)
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
    if words.shape[1] % 2:
        words = torch.cat([words, words.new_zeros(words.shape[0], 1)], 1)
    rows, n_pairs = words.shape[0], words.shape[1] // 2
    mul_u, mul_v, mul_p, seed = (torch.tensor(c, dtype=torch.int64, device=words.device)[:, None, None]
                                 for c in LANES)
    acc = torch.zeros(len(LANES[0]), rows, 1, dtype=torch.int64, device=words.device)
    step = max(1, _WORDS_PER_CHUNK // 2 // max(rows, 1))
    for start in range(0, n_pairs, step):
        pairs = words[None, :, 2 * start:2 * (start + step)].to(torch.int64) & M32  # reinterpret as unsigned
        u, v = pairs[..., 0::2], pairs[..., 1::2]
        pos = torch.arange(start, start + u.shape[-1], device=words.device)
        h = (_mul32(u, mul_u) + _mul32(pos, mul_p) + seed) & M32
        m = _fmix32_reference(((h ^ (h >> 15)) + _mul32(v, mul_v)) & M32)
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
    # lane l's constants A_l, D_l, B_l, S_l, which its instructions take as immediates
    _A0, _A1, _A2, _A3 = (tl.constexpr(c) for c in LANES[0])
    _D0, _D1, _D2, _D3 = (tl.constexpr(c) for c in LANES[1])
    _B0, _B1, _B2, _B3 = (tl.constexpr(c) for c in LANES[2])
    _S0, _S1, _S2, _S3 = (tl.constexpr(c) for c in LANES[3])

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
    def _term(u, v, pos, A: tl.constexpr, D: tl.constexpr, B: tl.constexpr, S: tl.constexpr):
        h = u * A + pos * B + S
        return _fmix32((h ^ (h >> 15)) + v * D)

    @triton.jit
    def _load_pairs(row_ptr, pos, n_words, MASKED: tl.constexpr, PAIRED: tl.constexpr):
        # (u, v): the words of pairs `pos`, as uint32. As 64-bit pairs where rows start on whole pairs (vectorized
        # loads), else as two strided loads, the second reading the sectors the first brought into L1.
        if MASKED:
            u = tl.load(row_ptr + 2 * pos, mask=2 * pos < n_words, other=0).to(tl.uint32, bitcast=True)
            v = tl.load(row_ptr + 2 * pos + 1, mask=2 * pos + 1 < n_words, other=0).to(tl.uint32, bitcast=True)
        elif PAIRED:
            pair = tl.load(row_ptr.to(tl.pointer_type(tl.uint64)) + pos)
            u, v = pair.to(tl.uint32), (pair >> 32).to(tl.uint32)
        else:
            u = tl.load(row_ptr + 2 * pos).to(tl.uint32, bitcast=True)
            v = tl.load(row_ptr + 2 * pos + 1).to(tl.uint32, bitcast=True)
        return u, v

    @triton.jit
    def _row_fingerprint_kernel(words_ptr, out_ptr, n_words, split_pairs, nbytes, BLOCK: tl.constexpr,
                                FINISH: tl.constexpr, PAIRED: tl.constexpr):
        # Program (row, split) hashes pairs [split * split_pairs, ...) of its row, so that a few long rows still
        # fill the GPU. Each thread keeps running sums of its own pairs' terms, one BLOCK-long uint32 vector per
        # lane in the load's own layout (adds wrap modulo 2**32, as the hash wants), reduced once at the end;
        # whole blocks load without masks, the rest in one masked block. With FINISH (one split) the program
        # finalizes its row's key; otherwise it writes its 4 partial sums to out_ptr[row, split] for
        # _finish_kernel.
        row = tl.program_id(0)
        split = tl.program_id(1)
        acc0 = tl.zeros((BLOCK,), dtype=tl.uint32)
        acc1 = tl.zeros((BLOCK,), dtype=tl.uint32)
        acc2 = tl.zeros((BLOCK,), dtype=tl.uint32)
        acc3 = tl.zeros((BLOCK,), dtype=tl.uint32)
        row_ptr = words_ptr + row.to(tl.int64) * n_words
        begin = split * split_pairs
        end = tl.minimum(begin + split_pairs, (n_words + 1) // 2)
        whole = begin + tl.maximum(tl.minimum(end, n_words // 2) - begin, 0) // BLOCK * BLOCK
        for start in range(begin, whole, BLOCK):
            pos = start + tl.arange(0, BLOCK)
            u, v = _load_pairs(row_ptr, pos, n_words, MASKED=False, PAIRED=PAIRED)
            p = pos.to(tl.uint32)
            acc0 += _term(u, v, p, _A0, _D0, _B0, _S0)
            acc1 += _term(u, v, p, _A1, _D1, _B1, _S1)
            acc2 += _term(u, v, p, _A2, _D2, _B2, _S2)
            acc3 += _term(u, v, p, _A3, _D3, _B3, _S3)
        pos = whole + tl.arange(0, BLOCK)
        u, v = _load_pairs(row_ptr, pos, n_words, MASKED=True, PAIRED=PAIRED)
        p = pos.to(tl.uint32)
        valid = pos < end
        acc0 += tl.where(valid, _term(u, v, p, _A0, _D0, _B0, _S0), 0)
        acc1 += tl.where(valid, _term(u, v, p, _A1, _D1, _B1, _S1), 0)
        acc2 += tl.where(valid, _term(u, v, p, _A2, _D2, _B2, _S2), 0)
        acc3 += tl.where(valid, _term(u, v, p, _A3, _D3, _B3, _S3), 0)
        s0, s1, s2, s3 = tl.sum(acc0), tl.sum(acc1), tl.sum(acc2), tl.sum(acc3)
        if FINISH:
            _store_key(out_ptr + row * 4, s0, s1, s2, s3, nbytes)
        else:
            dest = out_ptr + (row * tl.num_programs(1) + split) * 4
            tl.store(dest + 0, s0.to(tl.int32, bitcast=True))
            tl.store(dest + 1, s1.to(tl.int32, bitcast=True))
            tl.store(dest + 2, s2.to(tl.int32, bitcast=True))
            tl.store(dest + 3, s3.to(tl.int32, bitcast=True))

    @triton.jit
    def _store_key(dest, s0, s1, s2, s3, nbytes):
        # finalize the four lane sums with the row length in bytes
        length = tl.cast(nbytes, tl.uint32) * _LENGTH_MUL
        tl.store(dest + 0, _fmix32((s0 + length) ^ _S0).to(tl.int32, bitcast=True))
        tl.store(dest + 1, _fmix32((s1 + length) ^ _S1).to(tl.int32, bitcast=True))
        tl.store(dest + 2, _fmix32((s2 + length) ^ _S2).to(tl.int32, bitcast=True))
        tl.store(dest + 3, _fmix32((s3 + length) ^ _S3).to(tl.int32, bitcast=True))

    @triton.jit
    def _finish_kernel(part_ptr, out_ptr, n_splits, nbytes, SPLITS: tl.constexpr):
        # One program per row: add up its splits' partial lane sums and finalize them with the row length.
        row = tl.program_id(0)
        split = tl.arange(0, SPLITS)
        mask = split < n_splits
        base = part_ptr + (row * n_splits + split) * 4
        s0 = tl.sum(tl.load(base + 0, mask=mask, other=0).to(tl.uint32, bitcast=True))
        s1 = tl.sum(tl.load(base + 1, mask=mask, other=0).to(tl.uint32, bitcast=True))
        s2 = tl.sum(tl.load(base + 2, mask=mask, other=0).to(tl.uint32, bitcast=True))
        s3 = tl.sum(tl.load(base + 3, mask=mask, other=0).to(tl.uint32, bitcast=True))
        _store_key(out_ptr + row * 4, s0, s1, s2, s3, nbytes)

    def _splits(rows: int, n_pairs: int, block: int, device: torch.device) -> int:
        """How many programs share a row: enough for about 4 programs per multiprocessor, each with at least 4
        blocks of pairs."""
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        wanted = -(-4 * sms // max(rows, 1))
        return max(1, min(wanted, n_pairs // (4 * block), 1024))

    @torch.library.triton_op("frzcompile::row_fingerprint", mutates_args=())
    def _row_fingerprint_op(words: torch.Tensor, nbytes: int) -> torch.Tensor:
        """words (B, W) int32 from `_row_words` -> (B, 2) int64."""
        rows, n_words = words.shape
        out = torch.empty((rows, 2), dtype=torch.int64, device=words.device)
        if rows == 0:
            return out
        n_pairs = (n_words + 1) // 2
        block = max(16, min(512, triton.next_power_of_2(n_pairs)))
        splits = _splits(rows, n_pairs, block, words.device)
        split_pairs = -(-triton.cdiv(n_pairs, splits) // block) * block  # whole blocks, so loads stay aligned
        splits = triton.cdiv(n_pairs, split_pairs) if n_pairs else 1
        # every row starts on a whole 64-bit pair (torch's allocators align storages further; data_ptr() is not
        # there when torch.compile traces this op)
        paired = n_words % 2 == 0 and words.storage_offset() % 2 == 0
        kernel = torch.library.wrap_triton(_row_fingerprint_kernel)
        if splits == 1:
            kernel[(rows, 1)](words, out.view(torch.int32), n_words, max(split_pairs, 1), nbytes & M32,
                              BLOCK=block, FINISH=True, PAIRED=paired, num_warps=4)
            return out
        parts = torch.empty((rows, splits, 4), dtype=torch.int32, device=words.device)
        kernel[(rows, splits)](words, parts, n_words, split_pairs, nbytes & M32, BLOCK=block, FINISH=False,
                               PAIRED=paired, num_warps=4)
        torch.library.wrap_triton(_finish_kernel)[(rows,)](
            parts, out.view(torch.int32), splits, nbytes & M32, SPLITS=triton.next_power_of_2(splits),
            num_warps=1)
        return out
