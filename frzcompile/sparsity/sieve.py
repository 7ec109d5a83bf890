"""Data sieving: train on a fixed-size subset of the data and rotate out the least informative samples.

SpFDE's circular sieving, ranked by forgetting events (Toneva et al., "An Empirical Study of Example Forgetting",
ICLR 2019): a sample is forgotten when it was classified correctly at one presentation and wrongly at the next.
Samples that were learned and never forgotten are the least informative and leave the active subset first; the
removed pool comes back oldest first, so every sample is revisited over time.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset, Sampler

from ..errors import ConfigError


class IndexedDataset(Dataset):
    """Wraps a dataset so each item carries its index: `(index, *item)` for tuple/list items, else `(index, item)`.

    The index lets the training loop call `SieveSampler.record(indices, correct)` for the batch.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        item = self.dataset[index]
        return (index, *item) if isinstance(item, (tuple, list)) else (index, item)


class SieveSampler(Sampler[int]):
    """Yields a shuffled active subset of round(keep_ratio * n) sample indices each epoch.

    Feed it the batch results with `record(indices, correct)` and call `set_epoch(epoch)` before each epoch (the
    DistributedSampler convention). Every `interval` epochs, `set_epoch` swaps the round(refresh * active) least
    informative active samples for the same number from the removed pool, oldest removed first. Least informative
    first: fewest forgetting events; then currently correct before currently wrong; then the longest current run
    of correct predictions; then the most presentations; then the lower index. Samples never predicted correctly
    (including those never recorded) are the most informative and are swapped out last.
    The epoch's order depends only on `seed`, the epoch and the active set.
    """

    def __init__(self, data_source_or_length, keep_ratio=0.8, refresh=0.1, interval=1, seed=0):
        n = data_source_or_length if isinstance(data_source_or_length, int) else len(data_source_or_length)
        if n < 1:
            raise ConfigError("SieveSampler needs at least one sample")
        if not 0 < keep_ratio <= 1:
            raise ConfigError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
        if not 0 <= refresh <= 1:
            raise ConfigError(f"refresh must be in [0, 1], got {refresh!r}")
        if not isinstance(interval, int) or interval < 1:
            raise ConfigError(f"interval must be an int >= 1, got {interval!r}")
        self.num_samples, self.keep_ratio, self.refresh = n, keep_ratio, refresh
        self.interval, self.seed = interval, seed
        size = max(1, round(keep_ratio * n))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        self._active = perm[:size].sort().values
        self._removed = perm[size:]  # a queue: the head was removed longest ago
        self._seen = torch.zeros(n, dtype=torch.long)
        self._forgetting = torch.zeros(n, dtype=torch.long)
        self._streak = torch.zeros(n, dtype=torch.long)  # current run of correct predictions
        self._last = torch.full((n,), -1, dtype=torch.int8)  # last prediction: -1 none, 0 wrong, 1 correct
        self._learned = torch.zeros(n, dtype=torch.bool)  # ever predicted correctly
        self.epoch = 0
        self.refreshes = 0
        self.swapped = 0

    def __len__(self):
        return self._active.numel()

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from self._active[torch.randperm(self._active.numel(), generator=g)].tolist()

    @property
    def active_indices(self) -> list:
        return self._active.tolist()

    @property
    def removed_indices(self) -> list:
        """The removed pool in the order it comes back (removed longest ago first)."""
        return self._removed.tolist()

    @property
    def forgetting_counts(self):
        return self._forgetting.clone()

    def record(self, indices, correct) -> None:
        """Record a batch: `indices` of its samples and a bool tensor of whether each prediction was correct."""
        idx = torch.as_tensor(indices).detach().reshape(-1).cpu().long()
        ok = torch.as_tensor(correct).detach().reshape(-1).cpu()
        if ok.dtype != torch.bool:
            raise ConfigError(f"correct must be a bool tensor, got {ok.dtype}")
        if idx.numel() != ok.numel():
            raise ConfigError(f"{idx.numel()} indices but {ok.numel()} correct flags")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise ConfigError(f"sample indices must be in [0, {self.num_samples}), got {idx.min()}..{idx.max()}")
        # Presentations of one sample must be applied in order: take each index's first occurrence per round.
        while idx.numel():
            uniq, inverse = torch.unique(idx, return_inverse=True)
            first = torch.full((uniq.numel(),), idx.numel()).scatter_reduce(0, inverse, torch.arange(idx.numel()),
                                                                             "amin")
            self._update(idx[first], ok[first])
            rest = torch.ones(idx.numel(), dtype=torch.bool)
            rest[first] = False
            idx, ok = idx[rest], ok[rest]

    def _update(self, idx, ok):
        self._forgetting[idx] += ((self._last[idx] == 1) & ~ok).long()
        self._streak[idx] = torch.where(ok, self._streak[idx] + 1, 0)
        self._seen[idx] += 1
        self._learned[idx] |= ok
        self._last[idx] = ok.to(torch.int8)

    def set_epoch(self, epoch) -> None:
        """Set the epoch (its shuffle) and refresh the active set when `epoch // interval` has advanced."""
        if epoch // self.interval > self.epoch // self.interval:
            self._refresh()
        self.epoch = epoch

    def _refresh(self):
        k = min(round(self.refresh * self._active.numel()), self._removed.numel())
        if k == 0:
            return
        order = self._active  # sorted: the final tie-break is the lower index
        never_learned = torch.iinfo(torch.long).max
        # Stable sorts from the least to the most significant key give the lexicographic order.
        for key in (-self._seen, -self._streak, (self._last != 1).long(),
                    torch.where(self._learned, self._forgetting, never_learned)):
            order = order[key[order].sort(stable=True).indices]
        out = order[:k]
        self._active = torch.cat([order[k:], self._removed[:k]]).sort().values
        self._removed = torch.cat([self._removed[k:], out])
        self.refreshes += 1
        self.swapped += k

    def summary(self) -> dict:
        """Counts for reporting."""
        seen = self._seen > 0
        return {"epoch": self.epoch, "num_samples": self.num_samples, "active": self._active.numel(),
                "removed": self._removed.numel(), "keep_ratio": self.keep_ratio, "refreshes": self.refreshes,
                "swapped": self.swapped, "seen": int(seen.sum()),
                "forgetting_events": int(self._forgetting.sum()),
                "unforgettable": int((self._learned & (self._forgetting == 0)).sum()),
                "never_learned": int((seen & ~self._learned).sum())}

    def state_dict(self) -> dict:
        return {"num_samples": self.num_samples, "epoch": self.epoch, "active": self._active.clone(),
                "removed": self._removed.clone(), "seen": self._seen.clone(), "forgetting": self._forgetting.clone(),
                "streak": self._streak.clone(), "last": self._last.clone(), "learned": self._learned.clone(),
                "refreshes": self.refreshes, "swapped": self.swapped}

    def load_state_dict(self, state) -> None:
        if state["num_samples"] != self.num_samples:
            raise ConfigError(f"the state is for {state['num_samples']} samples, this sampler has {self.num_samples}")
        if state["active"].numel() != self._active.numel():
            raise ConfigError(f"the state has {state['active'].numel()} active samples, but keep_ratio="
                             f"{self.keep_ratio} gives {self._active.numel()}: use the keep_ratio it was saved with")
        self.epoch = int(state["epoch"])
        self.refreshes, self.swapped = int(state["refreshes"]), int(state["swapped"])
        for name in ("active", "removed", "seen", "forgetting", "streak", "last", "learned"):
            setattr(self, f"_{name}", state[name].clone())
