"""The activation cache: serve the frozen prefix's outputs from a store instead of computing them.

    store.py      CacheConfig, the byte-budgeted store (memory chunks, spill files) and the sample fingerprints
    key.py        what an entry is keyed by besides the sample: the call's signature, the modules' Python state,
                  content digests
    plan.py       what the analysis decided for a prefix and call signature, and whether serving pays
    intercept.py  interception of the frozen prefix's module calls within one call of the model
    dataflow.py   the probe that finds which prefix outputs the rest of the model reads
    service.py    ActivationCache: per prefix and call signature, analysis, serving, hit rate, report
"""
from .store import CacheConfig

__all__ = ["CacheConfig"]
