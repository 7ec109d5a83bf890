"""Cache pass: serve the frozen prefix's frontier from the activation store.

requires: the `frozen_prefix` region made by the freeze pass, the runtime's ActivationCache, example inputs.
provides: the region wrapped in a `CachedRegion`, when the cache judged this prefix sound and worth caching
(the verdict and its reason are kept on the cache for `explain`).
"""
from __future__ import annotations

from torch import fx, nn

from ..activation_cache import region_example_args
from .freeze import REGION


class CachedRegion(nn.Module):
    """Looks the batch up in the activation cache; only misses run the wrapped no-grad region."""

    def __init__(self, region: nn.Module, cache, plan):
        super().__init__()
        self.region = region
        self.cache = cache
        self.plan = plan

    def forward(self, *args):
        if not self.cache.enabled:
            return self.region(*args)
        return self.cache.serve(self.plan, self.region, args)


def cache(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    store = ctx.cache
    region = getattr(gm, REGION, None)
    if store is None or region is None or not store.enabled:
        return gm
    call = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == REGION)
    region_graph = region.graph_module
    output_node = next(n for n in region_graph.graph.nodes if n.op == "output")
    returned = output_node.args[0]
    output_names = [a.name for a in (returned if isinstance(returned, (tuple, list)) else [returned])]
    plan = store.prepare(ctx.prefix, region, region_graph, lambda: region_example_args(gm, region, *ctx.example),
                         [a.name for a in call.args], output_names, ctx.node_unit)
    ctx.stats["cache"] = {"cacheable": plan.cacheable, "reason": plan.reason,
                          "reuses": [list(p) for p in plan.deltas]}
    if plan.cacheable:
        delattr(gm, REGION)
        gm.add_module(REGION, CachedRegion(region, store, plan))
    return gm


cache.requires = (REGION + " submodule (freeze pass)", "activation cache", "example inputs")
cache.provides = (REGION + " served from the activation cache",)
