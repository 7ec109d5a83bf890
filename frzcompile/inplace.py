"""Which calls change a tensor in place, by name: read by the torch.compile backend (its no-grad region) and the
activation cache's dataflow probe (which also watches version counters)."""
from __future__ import annotations

import torch

from .torch_private import storage_key

INPLACE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                             "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
                             "__imatmul__"})


def changes_in_place(name: str, kwargs) -> bool:
    """Whether a call named `name` (a Tensor method, a torch function, an `operator` function) changes a tensor in
    place: `add_`, `relu_`, `__iadd__` / `operator.iadd`, `__setitem__` / `operator.setitem`, `out=`,
    `inplace=True`."""
    return (name.endswith("_") and not name.startswith("__")) or f"__{name.strip('_')}__" in INPLACE_DUNDERS \
        or kwargs.get("out") is not None or kwargs.get("inplace") is True


# Calls whose result may share its first argument's memory (a view, or a call that returns its input or a view
# of it when nothing changes): a write through it is a write to that tensor. Names as `changes_in_place` takes
# them, and attributes read by symbolic_trace's `getattr` nodes; ATen operators say so in their schema.
VIEW_NAMES = frozenset({"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "narrow", "select",
                        "expand", "expand_as", "broadcast_to", "unsqueeze", "squeeze", "flatten", "unflatten",
                        "ravel", "t", "chunk", "split", "split_with_sizes", "tensor_split", "unbind", "detach",
                        "alias", "movedim", "moveaxis", "swapaxes", "swapdims", "diagonal", "unfold", "as_strided",
                        "contiguous", "to", "type_as", "float", "getitem", "__getitem__", "real", "imag",
                        "view_as_real", "view_as_complex"})
VIEW_ATTRIBUTES = frozenset({"T", "mT", "H", "mH", "data", "real", "imag"})
# writes that replace what they write into, without reading it first
OVERWRITES = frozenset({"copy_", "fill_", "zero_", "setitem", "__setitem__"})


# the running statistics a batch or instance norm updates when it normalises by the batch's: function ->
# ((positions of running_mean and running_var), (position, name and default of the flag that says it does))
_NORM_STATISTICS = {
    torch.nn.functional.batch_norm: ((1, 2), (5, "training", False)),
    torch.batch_norm: ((3, 4), (5, "training", True)),
    torch.nn.functional.instance_norm: ((1, 2), (5, "use_input_stats", True)),
    torch.instance_norm: ((3, 4), (5, "use_input_stats", True)),
}


def _call_name(node) -> str:
    if node.op == "call_method":
        return str(node.target)
    if node.op != "call_function":
        return ""
    packet = getattr(node.target, "overloadpacket", None)  # (an ATen operator: aten.copy_.default -> "copy_")
    return getattr(packet if packet is not None else node.target, "__name__", "")


def _argument(node, schema, i, argument):
    return node.args[i] if i < len(node.args) else node.kwargs.get(argument.name)


def written(node) -> list:
    """The argument nodes a graph node changes in place: by its schema (an ATen operator), by its name (`add_`,
    `out=`, a foreach call's list), and the running statistics a batch or instance norm updates when it uses the
    batch's (`F.batch_norm(x, mean, var, training=True)`, as Dynamo records a BatchNorm in training)."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if schema is not None:  # an ATen operator (export's graphs): its schema marks the arguments it writes
        out = []
        for i, argument in enumerate(schema.arguments):
            if argument.alias_info is not None and argument.alias_info.is_write:
                value = _argument(node, schema, i, argument)
                out += value if isinstance(value, (list, tuple)) else [value]
        return [v for v in out if hasattr(v, "op")]
    if node.op == "call_function" and node.target in _NORM_STATISTICS:
        (mean, var), (flag, name, default) = _NORM_STATISTICS[node.target]
        on = node.kwargs.get(name, node.args[flag] if len(node.args) > flag else default)
        stats = [node.args[i] if len(node.args) > i else node.kwargs.get(k)
                 for i, k in ((mean, "running_mean"), (var, "running_var"))]
        return [t for t in stats if hasattr(t, "op")] if on is not False else []
    if node.op in ("call_method", "call_function") and changes_in_place(_call_name(node), node.kwargs):
        target = node.kwargs.get("out") if node.kwargs.get("out") is not None else (node.args[0] if node.args else None)
        targets = target if isinstance(target, (list, tuple)) else [target]  # (torch._foreach_add_([a, b], ...))
        return [t for t in targets if hasattr(t, "op")]
    return []


def written_storages(nodes) -> set:
    """The storages (Dynamo's example values tell them) of the tensors `nodes` change in place, views included."""
    return {k for n in nodes for w in written(n) if (k := storage_key(w.meta.get("example_value"))) is not None}


def reads_storage(node, storages: set) -> bool:
    """Whether `node` reads a tensor held in one of `storages` (a view of it included)."""
    return any(storage_key(i.meta.get("example_value")) in storages for i in node.all_input_nodes)


def _aliased(node, written: list):
    """The argument node whose memory the node's result shares, or None (`written`: `written(node)`)."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if schema is not None:  # the argument whose alias set the first result's is (`add.out` returns `out`)
        if not schema.returns or schema.returns[0].alias_info is None:
            return None
        sets = schema.returns[0].alias_info.before_set
        for i, argument in enumerate(schema.arguments):
            if argument.alias_info is not None and argument.alias_info.before_set == sets:
                value = _argument(node, schema, i, argument)
                return value if hasattr(value, "op") else None
        return None
    first = node.args[0] if node.args else None
    if not hasattr(first, "op") or (node.op == "call_function" and node.target in _NORM_STATISTICS):
        return None  # (a norm's result is new memory, not its running statistics)
    if node.op == "call_function" and node.target is getattr:
        return first if len(node.args) > 1 and node.args[1] in VIEW_ATTRIBUTES else None
    # (an in-place call returns the tensor it changed)
    return written[0] if written else first if _call_name(node) in VIEW_NAMES else None


def reads_of_writes(graph) -> dict:
    """node -> the in-place writes it reads: the calls that changed, earlier in the graph, a tensor it reads or
    shares memory with (`acc.add_(branch(h))` then `mix(acc)`: mix reads acc's node, which the trace recorded before
    the writes; export's `buf[:, :16] = a(x)` is a `copy_` into a slice of buf). Graph edges alone miss them. A
    view reads no values (its readers do), and a write that replaces what it writes into does not read it."""
    base, writes, out = {}, {}, {}
    for node in graph.nodes:
        if node.op == "get_attr":  # (symbolic_trace reads a buffer anew at each use: one tensor per target)
            base[node] = base.setdefault(("get_attr", node.target), node)
        changed = written(node)
        aliased = _aliased(node, changed)
        skip = set(changed) if _call_name(node) in OVERWRITES else set()
        if aliased is None or changed:
            found = []
            for a in node.all_input_nodes:
                if a not in skip:
                    found += [w for w in writes.get(base.get(a, a), ()) if w is not node]
            if found:
                out[node] = list(dict.fromkeys(found))
        if aliased is not None:
            base[node] = base.get(aliased, aliased)
        for w in changed:
            writes.setdefault(base.get(w, w), []).append(node)
    return out
