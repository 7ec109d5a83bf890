"""Token-selection pass (the ALaST policy): each budgeted transformer layer runs on its kept tokens only.

requires: `ctx.token_layers` (the layers the runtime selects tokens for, in order; empty: the pass does nothing)
and shape metadata on the captured graph (torch.export records it; a symbolic_trace graph has none, and the
pass then says so in its stats).
provides: before each layer after the first, `idx = kept_token_index(hidden, layer)`, `gather_tokens(hidden, idx)`
and `gather_mask(mask, idx, n)` for a 4-d attention mask it reads; after it, `scatter_tokens(hidden, idx, out)`,
so skipped tokens reach the next layer unchanged. The kept indices are a runtime input (the budgets move every
step without a new graph); in this graph `kept_token_index` keeps every token, so the rewritten graph computes
what the captured one does. At run time `frzcompile.tokens.service` does the same at the layers' own calls. The
first layer is left alone: no class-token attention exists before it to rank tokens by. The skipped tokens' own
no-grad run through the layer (`ALaST(skipped="forward")`) happens at run time only and is not drawn here.
"""
from __future__ import annotations

import torch
from torch import fx

from ..tokens.select import gather_mask, gather_tokens, scatter_tokens


def kept_token_index(hidden: torch.Tensor, layer: str) -> torch.Tensor:
    """(B, keep) token indices a layer runs on: supplied by the runtime each step; here every token (budget 1)."""
    b, n = hidden.shape[:2]
    return torch.arange(n, device=hidden.device).expand(b, n)


def _shape(node):
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def select_tokens(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    if not ctx.token_layers:
        return gm
    stats = {"layers": 0, "gathers": 0, "mask_gathers": 0, "scatters": 0, "not_rewritten": []}
    ctx.stats["select_tokens"] = stats
    graph = gm.graph
    for unit in ctx.token_layers[1:]:
        nodes = [n for n in graph.nodes if ctx.unit_of(n) == unit]
        inside = set(nodes)
        inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
        outputs = [n for n in nodes if any(user not in inside for user in n.users)]
        hidden_in = [a for a in inputs if _shape(a) is not None and len(_shape(a)) == 3]
        if len(hidden_in) != 1:
            stats["not_rewritten"].append(f"{unit} (no shape metadata)" if not any(_shape(a) for a in inputs)
                                          else f"{unit} ({len(hidden_in)} inputs of shape (B, n, d))")
            continue
        hidden = hidden_in[0]
        shape = _shape(hidden)
        hidden_out = [n for n in outputs if _shape(n) == shape]
        if len(hidden_out) != 1 or not isinstance(shape[1], int):
            stats["not_rewritten"].append(f"{unit} (no single output of the input's shape)")
            continue
        masks = [a for a in inputs if (m := _shape(a)) is not None and len(m) == 4 and m[-1] == shape[1]]
        read = {hidden, *masks}
        first = next(n for n in nodes if read & set(n.all_input_nodes))  # after hidden and masks exist

        def new(target, args, before=None, after=None, like=None, unit=unit):
            with graph.inserting_before(before) if before is not None else graph.inserting_after(after):
                node = graph.call_function(target, args)
            ctx.node_unit[node.name] = unit
            if like is not None:  # every token kept in this graph: the same shape as what it stands for
                node.meta["val"] = like.meta["val"]
            return node

        idx = new(kept_token_index, (hidden, unit), before=first)
        kept = new(gather_tokens, (hidden, idx), before=first, like=hidden)
        for n in nodes:
            n.replace_input_with(hidden, kept)
        stats["gathers"] += 1
        for mask in masks:
            restricted = new(gather_mask, (mask, idx, shape[1]), before=first, like=mask)
            for n in nodes:
                n.replace_input_with(mask, restricted)
            stats["mask_gathers"] += 1
        out = hidden_out[0]
        users = [u for u in out.users if u not in inside]
        scattered = new(scatter_tokens, (hidden, idx, out), after=out, like=out)
        for u in users:
            u.replace_input_with(out, scattered)
        stats["scatters"] += 1
        stats["layers"] += 1
    return gm


select_tokens.requires = ("node units", "token layers", "shape metadata (node.meta['val'])")
select_tokens.provides = ("gather before and scatter after each budgeted layer, kept indices as a runtime input",)
