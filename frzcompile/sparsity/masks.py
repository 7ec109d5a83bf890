"""Mask sources for sparse training: magnitude pruning, dynamic prune-and-grow, and mask statistics.

Weights come as ``{name: tensor}`` and masks as ``{name: bool tensor}`` of the same shapes; True means kept.
For structured sparsity a weight of shape (O, I, *k) is viewed as the 2-D matrix (O, I * prod(k)): rows are
output channels/neurons, columns the inputs they read. All selections sort stably, so ties always go to the
lower flat index and results are deterministic.
"""
from __future__ import annotations

import math

import torch

from ..errors import ConfigError

STRUCTURES = ("unstructured", "block", "nm", "channel")
SCOPES = ("global", "layer")
GROW_METHODS = ("mest", "rigl")
SCHEDULES = ("cosine", "linear", "constant")


def magnitude_masks(weights, sparsity, *, structure="unstructured", block=(4, 4), nm=(2, 4), scope="global",
                    scores=None) -> dict:
    """Magnitude-pruning masks that remove the fraction `sparsity` of the weights.

    structure:
      "unstructured": single weights; exactly round(sparsity * total) are pruned (round(sparsity * numel) per
        tensor with scope="layer").
      "block": (r, c) blocks of the 2-D view, scored by their RMS (the L2 norm divided by sqrt(block size), so
        blocks of different sizes and layers compare per element; within a layer of full blocks this ranks
        exactly as the L2 norm). -1 in `block` means the full extent, so (head_dim, -1) prunes attention heads
        of a q/k/v projection. Dimensions that are not multiples of the block end in smaller edge blocks.
        Blocks are pruned lowest score first, and the number pruned is the one whose element count is closest
        to round(sparsity * elements) (on a tie, the smaller one).
      "channel": whole rows (output channels/neurons), i.e. block=(1, -1).
      "nm": keep the N largest of every M consecutive weights along the input dim, nm=(N, M). The sparsity is
        then 1 - N/M: pass that or None. `scope` does not apply; the input dim must be a multiple of M.
    scope: "global" ranks all tensors together (raw |w|, or per-element block RMS); "layer" prunes each tensor
      to the target on its own.
    scores: optional {name: tensor} used instead of |w| (e.g. |w * grad|); same keys and shapes as `weights`.
    """
    _check_tensor_dict(weights, "weights")
    if structure not in STRUCTURES:
        raise ConfigError(f"unknown structure {structure!r}; use one of {STRUCTURES}")
    if scope not in SCOPES:
        raise ConfigError(f"unknown scope {scope!r}; use one of {SCOPES}")
    if scores is None:
        scores = {k: w.detach().abs().float() for k, w in weights.items()}
    else:
        _check_same_layout(weights, scores, "weights", "scores")
        scores = {k: s.detach().float() for k, s in scores.items()}
    if structure == "nm":
        return _nm_masks(scores, sparsity, nm)
    if not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ConfigError(f"sparsity must be a number in [0, 1), got {sparsity!r}")

    if structure == "unstructured":
        units = {k: _Units(s.reshape(-1), None, s.shape) for k, s in scores.items()}
    else:
        shape = (1, -1) if structure == "channel" else _check_block(block)
        units = {k: _block_units(k, s, shape) for k, s in scores.items()}

    if scope == "layer":
        pruned = {k: _prune_lowest(u.scores, u.sizes, round(sparsity * scores[k].numel())) for k, u in units.items()}
    else:
        device = next(iter(scores.values())).device
        flat_scores = torch.cat([u.scores.to(device) for u in units.values()])
        sizes = None if structure == "unstructured" else torch.cat([u.sizes.to(device) for u in units.values()])
        total = sum(s.numel() for s in scores.values())
        flat = _prune_lowest(flat_scores, sizes, round(sparsity * total))
        parts = flat.split([u.scores.numel() for u in units.values()])
        pruned = {k: p.to(u.scores.device) for (k, u), p in zip(units.items(), parts)}
    return {k: u.expand(~pruned[k]) for k, u in units.items()}


def mask_distance(a, b) -> float:
    """Normalized Hamming distance: the fraction of all entries (over every tensor) where `a` and `b` differ."""
    _check_same_layout(a, b, "a", "b")
    diff = sum(int((a[k] != b[k].to(a[k].device)).sum()) for k in a)
    return diff / sum(m.numel() for m in a.values())


def density(masks) -> float:
    """Fraction of kept entries over all masks."""
    _check_tensor_dict(masks, "masks")
    return sum(int(m.count_nonzero()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def per_tensor_sparsity(masks) -> dict:
    """{name: fraction of pruned entries} for each mask."""
    _check_tensor_dict(masks, "masks")
    return {k: (m.numel() - int(m.count_nonzero())) / m.numel() for k, m in masks.items()}


def prune_and_grow(weights, masks, fraction, *, method="mest", grads=None, generator=None):
    """One dynamic-sparse-training update; returns (new_masks, grown).

    For each mask, k = round(fraction * active) active weights of smallest |w| are dropped and k positions that
    are inactive after the drop are grown, so every tensor keeps exactly its number of active weights.
    method="mest" (Yuan et al., 2021) grows at random, preferring positions that were not just dropped;
    method="rigl" (Evci et al., 2020) grows where |grad| is largest (`grads` {name: tensor} required), and, as in
    RigL, a just-dropped weight may be grown again. `grown` marks the k grown positions of each tensor, which the
    caller should zero-initialise. `generator` drives MEST's random choice.
    """
    _check_tensor_dict(masks, "masks")
    if not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ConfigError(f"fraction must be a number in [0, 1], got {fraction!r}")
    if method not in GROW_METHODS:
        raise ConfigError(f"unknown method {method!r}; use one of {GROW_METHODS}")
    if method == "rigl" and grads is None:
        raise ConfigError("method='rigl' grows where |grad| is largest: pass grads={name: gradient}")
    new_masks, grown = {}, {}
    for name, mask in masks.items():
        if mask.dtype != torch.bool:
            raise ConfigError(f"mask {name!r} must be a bool tensor, got {mask.dtype}")
        w = _matching(weights, name, mask, "weights")
        active = mask.reshape(-1)
        k = round(fraction * int(active.count_nonzero()))
        # Inactive positions score +inf, so only active weights can be dropped (k <= active count).
        dropped = _lowest(torch.where(active, w.detach().abs().reshape(-1).float(), math.inf), k)
        kept = active & ~dropped
        if method == "rigl":
            grow_score = _matching(grads, name, mask, "grads").detach().abs().reshape(-1).float()
        else:
            device = generator.device if generator is not None else active.device
            noise = torch.rand(active.numel(), generator=generator, device=device).to(active.device)
            grow_score = noise + (~active).float()  # noise < 1: positions inactive before the drop come first
        # At least k candidates exist: everything inactive before the drop plus the k just dropped.
        grow = _lowest(-torch.where(kept, -math.inf, grow_score), k)
        new_masks[name] = (kept | grow).reshape(mask.shape)
        grown[name] = grow.reshape(mask.shape)
    return new_masks, grown


def update_fraction(step, total_steps, initial=0.3, schedule="cosine") -> float:
    """Fraction of active weights to update at `step`; 0 from `total_steps` on (updates stop).

    "cosine" (RigL): initial / 2 * (1 + cos(pi * step / total_steps)); "linear": initial * (1 - step /
    total_steps); "constant": initial.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")
    if total_steps <= 0 or step < 0:
        raise ConfigError(f"need total_steps > 0 and step >= 0, got step={step}, total_steps={total_steps}")
    if not 0 <= initial <= 1:
        raise ConfigError(f"initial must be in [0, 1], got {initial}")
    if step >= total_steps:
        return 0.0
    progress = step / total_steps
    if schedule == "cosine":
        return initial / 2 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return initial * (1 - progress)
    return float(initial)


class _Units:
    """The scoring units of one tensor: 1-D unit scores, unit sizes (None: all 1) and how to expand a unit keep
    vector back to an element mask of the tensor's shape."""

    def __init__(self, scores, sizes, shape, expand=None):
        self.scores, self.sizes, self.shape = scores, sizes, shape
        self._expand = expand

    def expand(self, keep):
        return (self._expand(keep) if self._expand else keep).reshape(self.shape)


def _block_units(name, score, block):
    if score.dim() < 2:
        raise ConfigError(f"structured pruning needs weights with 2 or more dims; {name!r} has shape "
                         f"{tuple(score.shape)}: prune it unstructured or leave it out")
    mat = score.reshape(score.shape[0], -1)
    rows, cols = mat.shape
    r = rows if block[0] == -1 else block[0]
    c = cols if block[1] == -1 else block[1]
    nr, nc = -(-rows // r), -(-cols // c)
    # Zero padding to whole blocks leaves the sums of squares unchanged; sizes count only the real elements.
    padded = torch.nn.functional.pad(mat.square(), (0, nc * c - cols, 0, nr * r - rows))
    sums = padded.reshape(nr, r, nc, c).sum((1, 3))
    row_sizes = (rows - torch.arange(nr, device=mat.device) * r).clamp(max=r)
    col_sizes = (cols - torch.arange(nc, device=mat.device) * c).clamp(max=c)
    sizes = torch.outer(row_sizes, col_sizes)

    def expand(keep):
        keep = keep.reshape(nr, nc).repeat_interleave(r, 0).repeat_interleave(c, 1)
        return keep[:rows, :cols]

    return _Units((sums / sizes).sqrt().reshape(-1), sizes.reshape(-1), score.shape, expand)


def _nm_masks(scores, sparsity, nm):
    if not (len(nm) == 2 and all(isinstance(v, int) for v in nm) and 0 < nm[0] <= nm[1]):
        raise ConfigError(f"nm must be (N, M) with 0 < N <= M, got {nm!r}")
    n, m = nm
    if sparsity is not None and not math.isclose(sparsity, 1 - n / m, abs_tol=1e-9):
        raise ConfigError(f"{n}:{m} sparsity is {1 - n / m:g}, which conflicts with sparsity={sparsity!r}; "
                         "pass sparsity=None or the matching value")
    masks = {}
    for name, s in scores.items():
        if s.dim() < 2 or s[0].numel() % m:
            raise ConfigError(f"{n}:{m} sparsity needs a 2-D view whose input dim is a multiple of {m}; "
                             f"{name!r} has shape {tuple(s.shape)}: leave it out or prune it another way")
        groups = s.reshape(s.shape[0], -1, m)
        top = groups.sort(dim=-1, descending=True, stable=True).indices[..., :n]
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
        masks[name] = keep.reshape(s.shape)
    return masks


def _prune_lowest(scores, sizes, target):
    """Bool mask of the units to prune: the lowest-score prefix whose total size is closest to `target`."""
    if sizes is None:
        return _lowest(scores, target)
    order = scores.sort(stable=True).indices
    cum = torch.cat([sizes.new_zeros(1), sizes[order].cumsum(0)])
    k = int((cum - target).abs().argmin())  # argmin returns the first minimum: the smaller count on a tie
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    pruned[order[:k]] = True
    return pruned


def _lowest(scores, k, by_sort=None):
    """Bool mask of the k lowest entries of a 1-D tensor (ties: lower index first).

    On CPU kthvalue is linear time, several times faster than a full sort on large models; the entries equal to
    the k-th value are then taken in index order, which gives the same result as a stable sort (used on CUDA).
    """
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if (scores.is_cuda if by_sort is None else by_sort):  # (CUDA's kthvalue runs one block per slice: far
        # slower than a sort there, pytorch#75599)
        chosen = torch.zeros_like(scores, dtype=torch.bool)
        chosen[scores.sort(stable=True).indices[:k]] = True
        return chosen
    kth = scores.kthvalue(k).values
    chosen = scores < kth
    ties = (scores == kth).nonzero().squeeze(1)
    chosen[ties[:k - int(chosen.count_nonzero())]] = True
    return chosen


def _check_block(block):
    if not (len(block) == 2 and all(isinstance(v, int) and (v > 0 or v == -1) for v in block)):
        raise ConfigError(f"block must be (rows, cols) of positive ints or -1 (full extent), got {block!r}")
    return tuple(block)


def _check_tensor_dict(d, what):
    if not isinstance(d, dict) or not d:
        raise ConfigError(f"{what} must be a non-empty dict of name -> tensor")
    for k, v in d.items():
        if not isinstance(v, torch.Tensor):
            raise ConfigError(f"{what}[{k!r}] is a {type(v).__name__}, not a tensor")


def _check_same_layout(a, b, name_a, name_b):
    _check_tensor_dict(a, name_a)
    _check_tensor_dict(b, name_b)
    if a.keys() != b.keys():
        raise ConfigError(f"{name_a} and {name_b} have different names: {sorted(a.keys() ^ b.keys())}")
    for k in a:
        if a[k].shape != b[k].shape:
            raise ConfigError(f"{k!r}: {name_a} has shape {tuple(a[k].shape)}, {name_b} {tuple(b[k].shape)}")


def _matching(d, name, mask, what):
    if name not in d:
        raise ConfigError(f"{what} has no entry for mask {name!r}")
    if d[name].shape != mask.shape:
        raise ConfigError(f"{what}[{name!r}] has shape {tuple(d[name].shape)}, mask {tuple(mask.shape)}")
    return d[name]
