"""Freeze pass: frozen units run in eval mode, and the frozen prefix runs without autograd.

requires: the unit of every node, the frozen set and its prefix.
provides: a `frozen_prefix` submodule (a `NoGradRegion`) computing the frontier tensors under `torch.no_grad()`,
so no autograd graph is recorded and nothing is saved for backward there; eval-mode constants (dropout off,
BatchNorm on running statistics, no statistics update) in every frozen unit, or everywhere in eval mode.
Parameter state (`requires_grad`, optimizer state) is the runtime's job, not the graph's.
"""
from __future__ import annotations

import torch
from torch import fx, nn
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

from ..modes import evalize

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
    frozen_nodes = [n for n in gm.graph.nodes if ctx.unit_of(n) in ctx.frozen]
    eval_nodes = frozen_nodes if ctx.training else list(gm.graph.nodes)
    rewritten = evalize(gm.graph, eval_nodes) if ctx.evalize else 0

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
    ctx.stats["freeze"] = {"eval_rewrites": rewritten, "region_nodes": len(region_nodes)}
    return gm


freeze.requires = ("node units", "frozen set", "frozen prefix")
freeze.provides = (REGION + " submodule run under no_grad", "eval-mode constants in frozen units")
