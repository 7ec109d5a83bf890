"""Train/eval semantics inside a captured graph.

Leaf modules kept as call_module nodes (symbolic_trace) follow their own `.training` flag. Everything else was
traced in train mode and has the mode baked in as a constant argument: `aten.dropout(x, p, True)` after
torch.export, `F.dropout(x, p, training=True)` after symbolic_trace of code that reads `self.training`, the
dropout probability of scaled-dot-product attention, BatchNorm's `training` flag and its
`num_batches_tracked += 1`. `evalize` rewrites those constants so the given nodes behave as in eval mode.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

aten = torch.ops.aten

# target -> (argument name, position, value in eval mode)
_EVAL_ARGS = {
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

# Functional calls whose default is train mode when the argument is not passed at all.
_TRAIN_BY_DEFAULT = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d}


def _is_bn_counter_update(node: fx.Node) -> bool:
    """`num_batches_tracked.add_(1)` that torch.export records for BatchNorm in train mode."""
    if node.op != "call_function" or node.target not in (aten.add_.Tensor, operator.iadd):
        return False
    target = node.args[0]
    return isinstance(target, fx.Node) and target.op == "get_attr" and str(target.target).endswith(
        "num_batches_tracked"
    )


def _set_arg(node: fx.Node, name: str, pos: int, value) -> bool:
    """Set an argument given by keyword or position; returns whether anything changed."""
    if name in node.kwargs:
        if node.kwargs[name] == value:
            return False
        node.update_kwarg(name, value)
        return True
    if len(node.args) > pos:
        if node.args[pos] == value:
            return False
        node.update_arg(pos, value)
        return True
    if node.target in _TRAIN_BY_DEFAULT:
        node.update_kwarg(name, value)
        return True
    return False  # the default is already the eval behaviour


def evalize(graph: fx.Graph, nodes=None) -> int:
    """Rewrite `nodes` (default: all) of `graph` to eval-mode semantics; returns how many nodes changed."""
    selected = set(graph.nodes) if nodes is None else set(nodes)
    changed = 0
    for node in list(graph.nodes):
        if node not in selected or node.op != "call_function":
            continue
        if _is_bn_counter_update(node):
            if not node.users:
                graph.erase_node(node)
                changed += 1
            continue
        rule = _EVAL_ARGS.get(node.target)
        if rule is not None and _set_arg(node, *rule):
            changed += 1
    return changed


def mode_arguments(graph: fx.Graph) -> dict:
    """node name -> the mode argument it was traced with (dropout's `training`, BatchNorm's `training`, ...).

    Dynamo bakes each module's train/eval mode into these arguments, so comparing two graphs' values tells
    which mode changes caused a recompile."""
    out = {}
    for node in graph.nodes:
        rule = _EVAL_ARGS.get(node.target) if node.op == "call_function" else None
        if rule is None:
            continue
        name, pos, _ = rule
        value = node.kwargs.get(name, node.args[pos] if len(node.args) > pos else None)
        out[node.name] = value if not isinstance(value, fx.Node) else "dynamic"
    return out
