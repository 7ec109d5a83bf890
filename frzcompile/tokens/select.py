"""Token selection for ALaST-style budgets: which tokens a layer runs on, and moving them in and out.

A layer with budget b runs on the class token (position 0) plus the ceil(b * (n - 1)) other tokens that the class
token attended to most in the last layer that saw them; the other tokens skip the layer and reach the next one
unchanged, or (`ALaST(skipped="forward")`) run through it without gradient, among themselves. Gathering and
scattering keep token order, so the kept sequence is a subsequence of the full one and
position-dependent code inside the layer (none in BERT or ViT layers) would see the same relative order.
"""
from __future__ import annotations

import math

import torch


def keep_count(budget: float, n_tokens: int) -> int:
    """Tokens a layer with this budget runs on: the class token plus ceil(budget * (n - 1)) others."""
    if n_tokens <= 1:
        return n_tokens
    return min(n_tokens, 1 + math.ceil(budget * (n_tokens - 1) - 1e-9))


def top_tokens(scores: torch.Tensor, keep: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, keep) indices, ascending, always starting with the class token 0: the `keep - 1` highest-scoring of
    the others, padding (valid False) only once every real token is in."""
    s = scores.detach().float().clone()
    if valid is not None:
        s = s.masked_fill(~valid, float("-inf"))  # padding ranks below any token
    s[:, 0] = float("inf")
    idx = s.topk(keep, dim=1, sorted=False).indices
    return idx.sort(dim=1).values


def sampled_tokens(scores: torch.Tensor, keep: int, valid: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
    """As `top_tokens`, but the `keep - 1` others are drawn without replacement with probability proportional to
    scores ** (1 / temperature) (Gumbel-top-k), from `generator` (the user's random stream is untouched)."""
    logits = scores.detach().float().clamp_min(1e-30).log() / temperature
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_(1e-20, 1.0 - 1e-7)
    return top_tokens(logits - uniform.log().neg().log(), keep, valid)


def gather_tokens(hidden: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """hidden (B, n, d) -> (B, keep, d) at `idx`."""
    return hidden.gather(1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def scatter_tokens(full: torch.Tensor, idx: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """`full` with the rows at `idx` replaced by `kept` (out of place: gradients reach both)."""
    return full.scatter(1, idx.unsqueeze(-1).expand(-1, -1, full.shape[-1]), kept.to(full.dtype))


def other_tokens(idx: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """(B, n - keep) indices, ascending: the tokens not in `idx` (B, keep), the ones a layer skips."""
    kept = torch.zeros(idx.shape[0], n_tokens, dtype=torch.int8, device=idx.device).scatter_(1, idx, 1)
    return kept.argsort(dim=1, stable=True)[:, :n_tokens - idx.shape[1]]  # (no boolean indexing: no device sync)


def forwarded(full: torch.Tensor, idx: torch.Tensor, out: torch.Tensor, valid: torch.Tensor | None = None):
    """`full` with the rows at `idx` taking the values `out`, which the layer computed for them without
    gradient, while their gradient stays the identity, as when they skip the layer (a straight-through
    estimate). Rows that are padding (valid False) keep their values: a group of padding alone may have
    attended to nothing."""
    with torch.no_grad():
        moved = out.to(full.dtype) - gather_tokens(full, idx)
        if valid is not None:
            moved = moved.masked_fill(~valid.gather(1, idx).unsqueeze(-1), 0)
        moved = torch.zeros_like(full).scatter_(1, idx.unsqueeze(-1).expand(-1, -1, full.shape[-1]), moved)
    return full + moved


def gather_mask(mask: torch.Tensor, idx: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """An attention mask (B or 1, heads or 1, n or 1, n) restricted to the kept tokens, as queries and keys."""
    batch = idx.shape[0]
    if mask.shape[-1] == n_tokens:
        i = idx.view(batch, 1, 1, -1).expand(batch, mask.shape[1], mask.shape[2], -1)
        mask = mask.expand(batch, *mask.shape[1:]).gather(3, i)
    if mask.shape[-2] == n_tokens:
        i = idx.view(batch, 1, -1, 1).expand(batch, mask.shape[1], -1, mask.shape[3])
        mask = mask.gather(2, i)
    return mask


def valid_tokens(mask: torch.Tensor | None, n_tokens: int, batch: int) -> torch.Tensor | None:
    """(batch, n) bool: the tokens some query may attend to under a 4-d attention mask (bool: True = attend;
    float: additive, 0 = attend): padding is False. None when there is no such mask."""
    if mask is None or mask.dim() != 4 or mask.shape[-1] != n_tokens:
        return None
    rows = mask[:, 0]  # (B or 1, queries, n)
    allowed = rows if rows.dtype == torch.bool else rows > torch.finfo(rows.dtype).min / 2
    return allowed.any(dim=1).expand(batch, n_tokens)


def cls_attention(q: torch.Tensor, k: torch.Tensor, heads: int, valid: torch.Tensor | None = None,
                  v: torch.Tensor | None = None) -> torch.Tensor:
    """(B, n): the class token's attention to each token from the layer's query and key projections (B, n, d),
    which the layer computed anyway (this costs B * n * d). With the value projection `v`, each head's weight is
    scaled by the norm of the value it moves (Kobayashi et al., 2020): BERT's class token parks much of its
    attention on [SEP] and punctuation, whose values are small, and plain weights would keep those tokens first.
    Normalised to sum to 1 per sample."""
    b, n, d = k.shape
    dh = d // heads
    q0 = q[:, 0].detach().float().view(b, heads, 1, dh)
    kh = k.detach().float().view(b, n, heads, dh).transpose(1, 2)
    with torch.autocast(q.device.type, enabled=False):  # (in float32 under autocast too: the ranking's precision)
        logits = (q0 @ kh.transpose(-1, -2)).squeeze(2) / math.sqrt(dh)  # (B, heads, n)
    if valid is not None:
        logits = logits.masked_fill(~valid.unsqueeze(1), float("-inf"))
    weights = logits.softmax(-1)
    if v is not None:
        weights = weights * v.detach().float().view(b, n, heads, dh).norm(dim=-1).transpose(1, 2)
    scores = weights.mean(1)
    return scores / scores.sum(1, keepdim=True).clamp_min(1e-30)
