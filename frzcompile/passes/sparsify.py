"""Sparsify pass: weight masks, and frozen sparse weights routed to the block-sparse kernel.

requires: `ctx.sparsity` (the runtime's SparseTraining; without it the pass does nothing) and the node units.
provides: in trainable units every use of a masked weight reads `masked_weight(weight, mask)` (weight * mask);
at run time the runtime keeps masked weights at exactly zero and masks their gradient with a tensor hook, which
is the same computation. In frozen units the weight is read as is (the runtime folded the mask into it when the
unit froze). A frozen nn.Linear whose weight has enough empty blocks calls `block_sparse_linear` (Triton on GPU,
its PyTorch reference elsewhere); its weight name goes to `ctx.decisions["block_sparse"]`, and the runtime
routes that module's forward there. Runs before `freeze`, and new nodes join the unit of the node they replace.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten

def masked_weight(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """weight * mask: the weight a masked layer computes with, and the gradient it gets."""
    return weight * mask


def _conv_call(module, x, weight, bias):
    return module._conv_forward(x, weight, bias)


def _module_call(module, x, weight, attr):
    return torch.func.functional_call(module, {attr: weight}, (x,))


def _attr_name(param: str) -> str:
    return "sparsity_mask_" + re.sub(r"\W", "_", param)


def sparsify(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    sp = ctx.sparsity
    stats = {"masked_uses": 0, "frozen_uses": 0, "block_sparse": []}
    ctx.decisions["block_sparse"] = stats["block_sparse"]
    if sp is None:
        ctx.stats["sparsify"] = stats
        return gm
    frozen = ctx.frozen
    graph = gm.graph
    mask_nodes = {}

    def mask_of(name, before):
        if name not in mask_nodes:
            attr = _attr_name(name)
            gm.register_buffer(attr, sp.targets[name].mask, persistent=False)
            with graph.inserting_before(before):
                mask_nodes[name] = graph.get_attr(attr)
        return mask_nodes[name]

    def new_node(unit, op, target, args, kwargs=None):
        node = graph.create_node(op, target, args, kwargs or {})
        if unit is not None:
            ctx.node_unit[node.name] = unit
        return node

    for node in list(graph.nodes):
        unit = ctx.unit_of(node)
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            name = f"{node.target}.weight"
            if name not in sp.targets or not hasattr(module, "weight"):
                continue
            if unit in frozen:
                stats["frozen_uses"] += 1
                if isinstance(module, nn.Linear):
                    bias = f"{node.target}.bias" if module.bias is not None else None
                    _route_block_sparse(gm, node, name, bias, sp, stats, new_node, unit)
                continue
            with graph.inserting_before(node):
                weight = new_node(unit, "get_attr", name, ())
                masked = new_node(unit, "call_function", masked_weight, (weight, mask_of(name, weight)))
                bias = new_node(unit, "get_attr", f"{node.target}.bias", ()) if getattr(
                    module, "bias", None) is not None else None
                owner = new_node(unit, "get_attr", node.target, ())
                x = node.args[0]
                if isinstance(module, nn.Linear):
                    call = new_node(unit, "call_function", F.linear, (x, masked, bias))
                elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                    call = new_node(unit, "call_function", _conv_call, (owner, x, masked, bias))
                else:
                    call = new_node(unit, "call_function", _module_call, (owner, x, masked, "weight"))
            node.replace_all_uses_with(call)
            graph.erase_node(node)
            stats["masked_uses"] += 1
        elif node.op == "get_attr" and node.target in sp.targets:
            name = node.target
            if unit in frozen or all(ctx.unit_of(u) in frozen for u in node.users):
                stats["frozen_uses"] += 1
                for user in list(node.users):
                    if user.target is aten.linear.default and user.args[1] is node:
                        bias = user.args[2] if len(user.args) > 2 else None
                        _route_block_sparse(gm, user, name, bias, sp, stats, new_node, ctx.unit_of(user))
                continue
            with graph.inserting_after(node):
                masked = new_node(unit, "call_function", masked_weight, (node, None))
            masked.update_arg(1, mask_of(name, masked))
            node.replace_all_uses_with(masked, delete_user_cb=lambda user, new=masked: user is not new)
            stats["masked_uses"] += 1
    ctx.stats["sparsify"] = stats
    return gm


class BlockSparseLinear(nn.Module):
    """A frozen masked Linear: `block_sparse_linear` on the weight's block layout, which the runtime's
    SparseTraining rebuilds whenever the weight changes; F.linear when too few blocks are empty."""

    def __init__(self, sparsity, name: str, bias_name: str | None):
        super().__init__()
        self.__dict__["sparsity"] = sparsity  # not a submodule
        self.name, self.bias_name = name, bias_name

    def forward(self, x, bias=None):
        from ..kernels.block_sparse_matmul import block_sparse_linear

        layout = self.sparsity.block_sparse_weight(self.name)
        if layout is None:
            return F.linear(x, self.sparsity.targets[self.name].weight, bias)
        return block_sparse_linear(x, layout, bias)

    def extra_repr(self) -> str:
        return f"weight={self.name}"


def _route_block_sparse(gm, node, name, bias, sp, stats, new_node, unit) -> None:
    """Replace a frozen nn.Linear's call (call_module, or aten.linear on a get_attr weight) by a BlockSparseLinear
    when its folded weight has at least `block_sparse_threshold` empty kernel blocks now."""
    if type(sp.targets[name].module).forward is not nn.Linear.forward or sp.block_sparse_weight(name) is None:
        return  # (only a plain nn.Linear: a subclass may compute more than x W^T + b)
    attr = "block_sparse_" + re.sub(r"\W", "_", name)
    gm.add_module(attr, BlockSparseLinear(sp, name, bias if isinstance(bias, str) else None))
    graph = gm.graph
    with graph.inserting_before(node):
        if isinstance(bias, str):
            bias = new_node(unit, "get_attr", bias, ())
        call = new_node(unit, "call_module", attr, (node.args[0], bias))
    node.replace_all_uses_with(call)
    graph.erase_node(node)
    stats["block_sparse"].append(name)


sparsify.requires = ("node units", "frozen set", "ctx.sparsity (optional)")
sparsify.provides = ("masked weights in trainable units", "folded weights in frozen units",
                     "block-sparse linear for frozen weights with empty blocks")
