"""What the analysis decided for one frozen prefix and call signature (`CallPlan`), and whether serving pays:
`pays_back` from the analysis' timings, `partial_pays` for a batch held in part, `LiveCost` for the times measured
inside the run."""
from __future__ import annotations

from dataclasses import dataclass, field

LIVE_BATCHES = 16  # stored and fully served batches timed inside the run before the cost check is made again


@dataclass
class LiveCost:
    """Seconds spent and samples handled inside the real run, per plan: computing the frozen prefix and storing
    its outputs in calls that miss, and the cache's own work in calls it serves whole (CPU only: on a GPU the
    wall clock would time kernel launches)."""

    compute_s: float = 0.0
    store_s: float = 0.0
    stored: int = 0
    stored_batches: int = 0
    serve_s: float = 0.0
    served: int = 0
    served_batches: int = 0
    next_early: int = LIVE_BATCHES  # stored batches at the next check made before LIVE_BATCHES were served
    judged: bool = False

    def compute_per_sample(self):
        """Seconds to compute the frozen prefix per sample inside the run, or None before a stored batch."""
        return self.compute_s / self.stored if self.stored else None

    def per_batch_ms(self) -> tuple:
        """(compute, serve, store) milliseconds for a batch of the served batches' mean size."""
        batch = self.served / self.served_batches
        return tuple(1000 * seconds / n * batch for seconds, n in
                     ((self.compute_s, self.stored), (self.serve_s, self.served), (self.store_s, self.stored)))


@dataclass
class CallPlan:
    """How one frozen prefix is served for one call signature."""

    prefix: tuple
    cacheable: bool
    reason: str                              # why not, or how it pays
    calls: tuple = ()                        # keys of the prefix's top-level calls, in order
    templates: dict = field(default_factory=dict)  # key -> (TreeSpec, [leaf recipe])
    sample_meta: list = field(default_factory=list)  # per stored per-sample tensor: (dtype, device, layout order)
    shared_count: int = 0
    keep: dict = field(default_factory=dict)  # key -> leaf indexes stored (copied when a real call returns)
    state: bytes = b""                       # the Python state it was analysed with
    placement: tuple = ()                    # the dtype, device and strides of each tensor the prefix read then
    compute_ms: float = 0.0
    serve_ms: float = 0.0
    store_ms: float = 0.0
    noise: float = 0.0
    batch: int = 0                           # the analysed batch's size (compute_ms, serve_ms and store_ms are for it)
    unread: frozenset = frozenset()          # positions of tensor arguments, not per sample, that nothing reads before
                                             # the prefix ends (HF Trainer's num_items_in_batch): not keyed
    live: LiveCost = field(default_factory=LiveCost)

    def stored(self):
        """(key, leaf index, kind, slot) of every output the cache stores, in slot order."""
        out = []
        for key in self.calls:
            for i, recipe in enumerate(self.templates[key][1]):
                if recipe[0] in ("sample", "shared"):
                    out.append((key, i, recipe[0], recipe[1]))
        return out


def pays_back(compute_ms: float, serve_ms: float, store_ms: float) -> bool:
    """Whether caching a batch pays back by the time it is served once: a batch costs `compute_ms` to compute;
    cached, its first pass costs that plus the lookups (about `serve_ms`) and `store_ms`, and its second
    `serve_ms`. A prefix that the policy deepens after every sample has been served once then loses nothing."""
    return compute_ms + serve_ms + store_ms + serve_ms < 2 * compute_ms


def partial_pays(plan, held: int, missing: int) -> bool:
    """Whether a batch that `plan`'s level holds `held` rows of is cheaper served in part (the held rows
    fetched, the `missing` ones computed by a run of the prefix alone, which has overheads of its own: timed
    at 3x the prefix's time inside the run on a ResNet) than computed whole inside the real call. Per sample:
    serving as measured inside the run (else by the analysis), the prefix alone as the analysis timed it, and
    the prefix inside the run once known (until then, as the analysis timed it)."""
    live = plan.live
    alone = plan.compute_ms / 1000 / max(plan.batch, 1)
    serve = live.serve_s / live.served if live.served else plan.serve_ms / 1000 / max(plan.batch, 1)
    inside = live.compute_per_sample()
    inside = alone if inside is None else inside
    return serve * held + alone * missing < inside * (held + missing)
