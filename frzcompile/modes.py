"""Train/eval mode as Dynamo bakes it into a graph.

Dynamo traces each module in its current mode and records it as constant arguments: dropout's `training`, the
dropout probability of scaled-dot-product attention, BatchNorm's `training`. `mode_arguments` reads them back,
so comparing two graphs of one frame tells which mode change made Dynamo recompile.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import fx

aten = torch.ops.aten

# target -> (argument name, position, value in eval mode)
MODE_ARGS = {
    aten.dropout.default: ("train", 2, False),
    aten.feature_dropout.default: ("train", 2, False),
    aten.alpha_dropout.default: ("train", 2, False),
    aten.feature_alpha_dropout.default: ("train", 2, False),
    aten.native_dropout.default: ("train", 2, False),
    aten.batch_norm.default: ("training", 5, False),
    aten.scaled_dot_product_attention.default: ("dropout_p", 4, 0.0),
    torch.dropout: ("train", 2, False),
    torch.feature_dropout: ("train", 2, False),
    torch.alpha_dropout: ("train", 2, False),
    torch.batch_norm: ("training", 5, False),
    F.dropout: ("training", 2, False),
    F.dropout1d: ("training", 2, False),
    F.dropout2d: ("training", 2, False),
    F.dropout3d: ("training", 2, False),
    F.alpha_dropout: ("training", 2, False),
    F.feature_alpha_dropout: ("training", 2, False),
    F.batch_norm: ("training", 5, False),
    F.scaled_dot_product_attention: ("dropout_p", 4, 0.0),
    F.rrelu: ("training", 3, False),
}

def mode_arguments(graph: fx.Graph) -> dict:
    """node name -> the mode argument it was traced with (dropout's `training`, BatchNorm's `training`, ...).

    Dynamo bakes each module's train/eval mode into these arguments, so comparing two graphs' values tells
    which mode changes caused a recompile."""
    out = {}
    for node in graph.nodes:
        rule = MODE_ARGS.get(node.target) if node.op == "call_function" else None
        if rule is None:
            continue
        name, pos, _ = rule
        value = node.kwargs.get(name, node.args[pos] if len(node.args) > pos else None)
        out[node.name] = value if not isinstance(value, fx.Node) else "dynamic"
    return out


@contextlib.contextmanager
def modes_kept(model: torch.nn.Module):
    """Every module's train/eval flag restored after the block (which runs the model in eval: the capture, a FLOP
    count). A module the forward created meanwhile (Hugging Face's BigBird swaps new attention modules into its
    layers for short inputs, in the layer's mode) takes its parent's restored mode: the one it would have been
    created in without the block."""
    was = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        for m, mode in was.items():
            m.training = mode
        stack = [model]  # parents before children: a new module's new children follow it
        while stack:
            parent = stack.pop()
            for child in parent._modules.values():
                if child is not None:
                    if child not in was:
                        child.training = parent.training
                    stack.append(child)
