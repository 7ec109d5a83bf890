"""SmartFRZ's freezing predictor: an attention model over a window of weight snapshots of one unit.

Every `interval` steps the runtime records, per unit, a fixed random sample of its weights (fixed indices per
unit). A window of the last T snapshots becomes a sequence of T tokens (`window_features`: how far each snapshot is
from the newest, how large the step into it was, how aligned with the step before, all relative to the
weights' own scale); the newest token is the attention query, the whole history the keys and values; the
output, with a few window statistics, gives the probability that the unit has converged and can be frozen.
Every feature is relative to the unit's weight scale and invariant to which weights were sampled, so one
predictor serves every layer of every model.

Trained offline by `python -m frzcompile.predictor.collect` and `python -m frzcompile.predictor.train`; the
shipped weights and their model card sit beside this file.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

WINDOW = 30           # snapshots per window
SAMPLE_SIZE = 256     # weights sampled per unit
N_TOKEN = 3       # features per snapshot token
N_SCALARS = 6     # window statistics
WEIGHTS = Path(__file__).with_name("smartfrz.pt")


LARGE_UNIT = 1 << 20  # weights above which sample_indices draws without a permutation of them all


def sample_indices(numel: int, k: int = SAMPLE_SIZE, seed: int = 0) -> torch.Tensor:
    """The fixed weight indices recorded for a unit of `numel` weights: `k` distinct ones, sorted. Above LARGE_UNIT
    they are drawn one by one, repeats skipped (a permutation of every index costs 8 bytes a weight and, for a
    large model's unit, seconds: 0.5 s for 10M weights here, at every bind)."""
    g = torch.Generator().manual_seed(seed)
    if numel <= k:
        return torch.arange(numel)
    if numel <= LARGE_UNIT:
        return torch.randperm(numel, generator=g)[:k].sort().values
    picked: dict = {}  # (insertion-ordered: the first k distinct draws)
    while len(picked) < k:
        for i in torch.randint(numel, (2 * k,), generator=g).tolist():
            picked.setdefault(i, None)
    return torch.tensor(list(picked)[:k]).sort().values


def normalize_window(snapshots: torch.Tensor):
    """(T, k) snapshots, oldest first -> (T, k) trajectory shape and (4,) scale-free statistics; batched, (N, T, k)
    -> (N, T, k) and (N, 4).

    The shape is each snapshot's displacement from the newest one, relative to the weights' RMS, divided by its
    own RMS; the statistics keep the scale: log10 of that RMS, log10 of the net movement over the window,
    straightness (net movement / path length: 1 for a steady drift, near 0 for noise around a point) and log10
    of the last interval's movement."""
    w = snapshots.float()
    k = w.shape[-1]
    newest = w[..., -1:, :]
    scale = newest.pow(2).mean((-2, -1), keepdim=True).sqrt() + 1e-8
    d = (w - newest) / scale
    rms = d.pow(2).mean((-2, -1), keepdim=True).sqrt()
    z = d / (rms + 1e-12)
    scale, rms = scale[..., 0, 0], rms[..., 0, 0]
    path = (w[..., 1:, :] - w[..., :-1, :]).norm(dim=-1).sum(-1) / scale
    net = (w[..., -1, :] - w[..., 0, :]).norm(dim=-1) / scale
    last = (w[..., -1, :] - w[..., -2, :]).norm(dim=-1) / scale
    base = torch.stack([
        torch.log10(rms + 1e-12),
        torch.log10(net / math.sqrt(k) + 1e-12),
        net / (path + 1e-12),
        torch.log10(last / math.sqrt(k) + 1e-12),
    ], dim=-1)
    return z, base


def features(z: torch.Tensor, base: torch.Tensor):
    """Predictor inputs from `normalize_window`'s output (batched (N, T, k), (N, 4) or single): per-snapshot
    tokens (distance from the newest snapshot, size of the step into it, cosine with the previous step; all
    relative to the weights' scale, so any layer of any model fits) and window statistics (the four base ones
    plus deceleration, log10 of late over early movement, and the mean cosine of consecutive steps)."""
    single = z.dim() == 2
    if single:
        z, base = z.unsqueeze(0), base.unsqueeze(0)
    z = z.float()
    d = z * (10.0 ** base[:, 0]).view(-1, 1, 1)
    k = d.shape[2]
    dist = torch.log10(d.pow(2).mean(2).sqrt() + 1e-9)
    inc = d[:, 1:] - d[:, :-1]
    step = torch.log10(inc.norm(dim=2) / math.sqrt(k) + 1e-9)
    step = torch.cat([step[:, :1], step], 1)
    cos = torch.nn.functional.cosine_similarity(inc[:, 1:], inc[:, :-1], dim=2)
    tokens = torch.stack([dist, step, torch.cat([cos[:, :1], cos[:, :1], cos], 1)], dim=2)
    moves = inc.norm(dim=2)
    third = max(1, moves.shape[1] // 3)
    decel = torch.log10(moves[:, -third:].mean(1) / (moves[:, :third].mean(1) + 1e-12) + 1e-12)
    scalars = torch.cat([base, torch.stack([decel, cos.mean(1)], 1)], 1)
    return (tokens[0], scalars[0]) if single else (tokens, scalars)


def window_features(snapshots: torch.Tensor):
    """(T, k) snapshots -> (T, 3) tokens and (6,) statistics, the predictor's inputs; batched, (N, T, k) ->
    (N, T, 3) and (N, 6)."""
    return features(*normalize_window(snapshots))


class FreezePredictor(nn.Module):
    """Logit that a unit has converged, from one window's tokens and statistics (see `features`)."""

    def __init__(self, dim: int = 16, heads: int = 2, window: int = WINDOW):
        super().__init__()
        self.embed = nn.Linear(N_TOKEN, dim)
        self.position = nn.Parameter(torch.zeros(window, dim))
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Sequential(nn.Linear(dim + N_SCALARS, dim), nn.GELU(), nn.Linear(dim, 1))
        for name, size in (("token", N_TOKEN), ("scalar", N_SCALARS)):
            self.register_buffer(f"{name}_mean", torch.zeros(size))
            self.register_buffer(f"{name}_std", torch.ones(size))

    def forward(self, tokens: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
        """tokens: (B, T, 3), scalars: (B, 6) -> logits (B,)."""
        t = self.embed((tokens - self.token_mean) / self.token_std) + self.position[: tokens.shape[1]]
        query = t[:, -1:]                            # the newest snapshot asks the history
        attended, _ = self.attention(query, t, t, need_weights=False)
        s = (scalars - self.scalar_mean) / self.scalar_std
        return self.head(torch.cat([attended[:, 0], s], dim=-1)).squeeze(-1)

    @torch.no_grad()
    def probability(self, snapshots: torch.Tensor) -> float:
        tokens, scalars = window_features(snapshots)
        return float(torch.sigmoid(self(tokens.unsqueeze(0), scalars.unsqueeze(0)))[0])




def load_default() -> FreezePredictor:
    """The predictor shipped with frzcompile (see MODEL_CARD.md beside this file), loaded anew (a few
    milliseconds) without drawing from the user's random number generator."""
    if not WEIGHTS.exists():
        raise FileNotFoundError(f"the shipped SmartFRZ weights are missing: {WEIGHTS}")
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    with torch.random.fork_rng(devices=[]):  # the random initialisation is overwritten at once
        model = FreezePredictor(**state["config"])
    model.load_state_dict(state["model"])
    return model.eval()
