"""Pure building blocks for sparse training (SpFDE-style): mask sources, early-bird ticket detection and data
sieving. Imports torch only; the graph pass and runtime wire these in.
"""
from .early_bird import EarlyBird
from .masks import density, magnitude_masks, mask_distance, per_tensor_sparsity, prune_and_grow, update_fraction
from .sieve import IndexedDataset, SieveSampler

__all__ = [
    "magnitude_masks", "mask_distance", "density", "per_tensor_sparsity", "prune_and_grow", "update_fraction",
    "EarlyBird", "IndexedDataset", "SieveSampler",
]
