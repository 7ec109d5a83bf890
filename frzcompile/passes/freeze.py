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

from ..capture import clone_graph_module
from ..inplace import reads_storage, written, written_storages
from ..torch_private import fuse_by_partitions, remade_view, tree_map

REGION = "frozen_prefix"


class NoGradRegion(nn.Module):
    """Runs the wrapped graph with autograd off: its outputs carry no grad_fn and nothing is saved."""

    def __init__(self, graph_module: fx.GraphModule):
        super().__init__()
        self.graph_module = graph_module

    def forward(self, *args):
        with torch.no_grad():
            out = self.graph_module(*args)
        # a view made under no_grad cannot be changed in place once grad is on (`x += pos` after a patch
        # embedding's `.transpose`): each view leaves made again, with grad on, over the same memory (a copy
        # would lose what an in-place change of its base does to it)
        return tree_map(remade_view, out)


# what draws random numbers (a region holding one is not moved past one outside it): dropout of any kind (in
# training and with p > 0), attention with dropout, these functions and methods, these modules in training
RANDOM = frozenset({"rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "bernoulli",
                    "bernoulli_", "normal", "normal_", "uniform_", "exponential_", "geometric_", "log_normal_",
                    "cauchy_", "random_", "multinomial", "poisson", "rrelu", "rrelu_", "gumbel_softmax",
                    "binomial", "_standard_gamma", "_sample_dirichlet"})  # (the last two: Gamma's, Dirichlet's rsample)
RANDOM_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
                  nn.RReLU)


def draws_random(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, RANDOM_MODULES) and module.training and getattr(module, "p", 1) > 0
    if node.op in ("call_function", "call_method"):
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
        name = name.split(".")[0]
        if "dropout" in name:  # (a frozen unit's, in eval mode, draws nothing: `training=False` in the graph)
            training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
            p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
            return not (training is False or p == 0)
        if name == "scaled_dot_product_attention":
            p = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
            return p != 0
        return name in RANDOM
    return False


def reordered(gm: fx.GraphModule, region_nodes: list) -> tuple | None:
    """Two nodes whose order matters (a random draw, an in-place write, a read of a tensor some node writes in place)
    that fusing `region_nodes` would swap, by name, or None. The fusion is tried on a copy of the graph."""
    changed = written_storages(gm.graph.nodes)
    ordered = [n for n in gm.graph.nodes if draws_random(gm, n) or written(n) or reads_storage(n, changed)]
    if not ordered:
        return None
    copy = clone_graph_module(gm)  # (node names carry over)
    by_name = {n.name: n for n in copy.graph.nodes}
    fuse_by_partitions(copy, [dict.fromkeys(by_name[n.name] for n in region_nodes)], prefix=REGION + "_")
    position = {n.name: i for i, n in enumerate(copy.graph.nodes)}
    fused = next(i for i, n in enumerate(copy.graph.nodes) if n.op == "call_module" and n.target == REGION + "_0")
    members = set(region_nodes)
    new = [(fused if n in members else position[n.name], n) for n in ordered]  # (members share the fused one's)
    for (p, node), (q, later) in zip(new, new[1:]):
        if q < p:
            return later.name, node.name
    return None


def freeze(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    prefix = set(ctx.prefix)
    region_nodes = [n for n in gm.graph.nodes if ctx.unit_of(n) in prefix]
    members = set(region_nodes)
    if ctx.runs and any(draws_random(gm, n) for n in region_nodes) and any(
            draws_random(gm, n) for n in gm.graph.nodes if n not in members):
        # the fused region runs where its last input is ready: random draws inside it could then come after
        # draws outside it that came before, and dropout would not draw what eager draws. Left unfused (its
        # inputs need no grad, so autograd records nothing there anyway).
        ctx.stats["freeze"] = {"region_nodes": 0, "left_unfused": "random draws inside and outside the region"}
        return gm
    moved = ctx.runs and region_nodes and reordered(gm, region_nodes)
    if moved:
        # fused, the region runs where its last node was and what reads it from before moves after it: a random
        # draw, an in-place write or a read of a tensor written in place would change places with another
        ctx.stats["freeze"] = {"region_nodes": 0, "left_unfused": f"fusing would move {moved[0]} past {moved[1]}"}
        return gm
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
