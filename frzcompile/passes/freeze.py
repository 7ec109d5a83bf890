"""Freeze pass: the frozen prefix runs without autograd.

requires: the unit of every node, the frozen set and its prefix.
provides: a `frozen_prefix` submodule (a `NoGradRegion`) computing the frontier tensors under `torch.no_grad()`,
so no autograd graph is recorded and nothing is saved for backward there. On a Dynamo graph this is what runs.
On the analysis graph it shows what the model's own forward does once the prefix's parameters stop requiring
grad (the runtime's job, with the frozen modules' eval mode and the optimizer surgery): autograd records
nothing there as long as no input of the prefix requires grad.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from ..torch_private import fuse_by_partitions

REGION = "frozen_prefix"


class NoGradRegion(nn.Module):
    """Runs the wrapped graph with autograd off: its outputs carry no grad_fn and nothing is saved."""

    def __init__(self, graph_module: fx.GraphModule):
        super().__init__()
        self.graph_module = graph_module

    def forward(self, *args):
        with torch.no_grad():
            return self.graph_module(*args)


def freeze(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    prefix = set(ctx.prefix)
    region_nodes = [n for n in gm.graph.nodes if ctx.unit_of(n) in prefix]
    if region_nodes:
        fuse_by_partitions(gm, [dict.fromkeys(region_nodes)], prefix=REGION + "_")
        fused = getattr(gm, REGION + "_0")
        delattr(gm, REGION + "_0")
        gm.add_module(REGION, NoGradRegion(fused))
        for n in gm.graph.nodes:
            if n.op == "call_module" and n.target == REGION + "_0":
                n.target = REGION
    frozen_nodes = sum(ctx.unit_of(n) in ctx.frozen for n in gm.graph.nodes)
    ctx.stats["freeze"] = {"region_nodes": len(region_nodes), "frozen_nodes_outside_region": frozen_nodes}
    return gm


freeze.requires = ("node units", "frozen set", "frozen prefix")
freeze.provides = (REGION + " submodule run under no_grad",)
