"""Cache pass: the frozen prefix's frontier is served from the activation store.

requires: the `frozen_prefix` region made by the freeze pass, `ctx.cache` (whether the runtime's activation
cache is on).
provides: the region wrapped in a `CachedRegion` (which runs it, as the analysis graph's stand-in), and the
frontier (the tensors leaving the prefix) in `ctx.stats["cache"]`. At run time the activation cache serves
exactly this frontier at the model's own module calls: the outputs of the prefix's unit calls that the rest of
the forward reads; whether a call signature is cacheable is decided per signature, on the model itself
(`frzcompile.cache.service`), and `explain` shows that verdict.
"""
from __future__ import annotations

from torch import fx, nn

from .freeze import REGION


class CachedRegion(nn.Module):
    """The frozen region of the analysis graph, marked as served from the activation cache."""

    def __init__(self, region: nn.Module):
        super().__init__()
        self.region = region

    def forward(self, *args):
        return self.region(*args)


def cache(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    region = getattr(gm, REGION, None)
    if not ctx.cache or region is None:
        return gm
    output = next(n for n in region.graph_module.graph.nodes if n.op == "output")
    returned = output.args[0]
    frontier = [a.name for a in (returned if isinstance(returned, (tuple, list)) else [returned])
                if isinstance(a, fx.Node)]
    delattr(gm, REGION)
    gm.add_module(REGION, CachedRegion(region))
    ctx.stats["cache"] = {"frontier": frontier}
    return gm


cache.requires = (REGION + " submodule (freeze pass)", "cache on")
cache.provides = (REGION + " marked as served from the activation cache", "the frontier's names")
