"""Early-bird ticket detection (You et al., "Drawing Early-Bird Tickets", ICLR 2020)."""
from __future__ import annotations

from collections import deque

import torch

from ..errors import ConfigError
from .masks import mask_distance


class EarlyBird:
    """Decides when the pruning mask has stopped changing.

    Each `observe(masks)` appends the masks (e.g. `magnitude_masks(...)` of the current weights, any structure)
    to a FIFO of the last `fifo` observations. The ticket is found once the FIFO is full and the normalized
    Hamming distance from the newest masks to every other entry is below `threshold`. Detection is sticky:
    `found` and `found_at` keep their first values while later observations still update the FIFO and
    `last_distances` (newest vs each older entry, oldest first).
    """

    def __init__(self, fifo=5, threshold=0.1):
        if not isinstance(fifo, int) or fifo < 2:
            raise ConfigError(f"fifo must be an int >= 2 (the newest masks are compared with older ones), got {fifo!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ConfigError(f"threshold must be in (0, 1], got {threshold!r}")
        self.fifo, self.threshold = fifo, threshold
        self._masks = deque(maxlen=fifo)
        self.observations = 0
        self.found = False
        self.found_at = None
        self.last_distances = []

    def observe(self, masks, step=None) -> bool:
        """Record one set of masks; returns `found`. `found_at` is `step` if given, else the observation count.
        Masks over other tensors than the last ones (a unit froze or thawed) start the comparison anew."""
        if self._masks and set(self._masks[-1]) != set(masks):
            self._masks.clear()
        self._masks.append({k: m.detach().to(torch.bool, copy=True) for k, m in masks.items()})
        self.observations += 1
        newest = self._masks[-1]
        self.last_distances = [mask_distance(newest, old) for old in list(self._masks)[:-1]]
        if (not self.found and len(self._masks) == self.fifo
                and all(d < self.threshold for d in self.last_distances)):
            self.found = True
            self.found_at = self.observations if step is None else step
        return self.found

    def state_dict(self) -> dict:
        return {"masks": [{k: m.cpu() for k, m in entry.items()} for entry in self._masks],
                "observations": self.observations, "found": self.found, "found_at": self.found_at,
                "last_distances": list(self.last_distances)}

    def load_state_dict(self, state) -> None:
        if len(state["masks"]) > self.fifo:
            raise ConfigError(f"the state holds {len(state['masks'])} masks but this EarlyBird's fifo is {self.fifo}")
        self._masks = deque(({k: m.to(torch.bool) for k, m in entry.items()} for entry in state["masks"]),
                            maxlen=self.fifo)
        self.observations = int(state["observations"])
        self.found = bool(state["found"])
        self.found_at = state["found_at"]
        self.last_distances = list(state["last_distances"])
