"""Which calls change a tensor in place, by name: read by the torch.compile backend (its no-grad region) and the
activation cache's dataflow probe (which also watches version counters)."""
from __future__ import annotations

INPLACE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                             "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
                             "__imatmul__"})


def changes_in_place(name: str, kwargs) -> bool:
    """Whether a call named `name` (a Tensor method, a torch function, an `operator` function) changes a tensor in
    place: `add_`, `relu_`, `__iadd__` / `operator.iadd`, `__setitem__` / `operator.setitem`, `out=`,
    `inplace=True`."""
    return (name.endswith("_") and not name.startswith("__")) or f"__{name.strip('_')}__" in INPLACE_DUNDERS \
        or kwargs.get("out") is not None or kwargs.get("inplace") is True


# Calls whose result may share its first argument's memory (a view, or a reshape that returns one): a write through
# it is a write to that tensor. Names as `changes_in_place` takes them; ATen operators say so in their schema.
VIEW_NAMES = frozenset({"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "narrow", "select",
                        "expand", "expand_as", "unsqueeze", "squeeze", "flatten", "unflatten", "t", "chunk",
                        "split", "unbind", "detach", "movedim", "swapaxes", "swapdims", "diagonal", "unfold",
                        "as_strided", "contiguous", "getitem", "__getitem__", "real", "imag", "view_as_real",
                        "view_as_complex"})


def _call_name(node) -> str:
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", "") if node.op == "call_function" else ""


def _written(node) -> list:
    """The argument nodes a graph node changes in place."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if schema is not None:  # an ATen operator (export's graphs): its schema marks the arguments it writes
        out = []
        for i, argument in enumerate(schema.arguments):
            if argument.alias_info is not None and argument.alias_info.is_write:
                value = node.args[i] if i < len(node.args) else node.kwargs.get(argument.name)
                out += value if isinstance(value, (list, tuple)) else [value]
        return [v for v in out if hasattr(v, "op")]
    if node.op in ("call_method", "call_function") and changes_in_place(_call_name(node), node.kwargs):
        target = node.kwargs.get("out") if node.kwargs.get("out") is not None else (node.args[0] if node.args else None)
        return [target] if hasattr(target, "op") else []
    return []


def _aliases_input(node) -> bool:
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if schema is not None:
        return bool(schema.returns) and schema.returns[0].alias_info is not None
    return _call_name(node) in VIEW_NAMES or bool(_written(node))  # (an in-place call returns the tensor it changed)


def reads_of_writes(graph) -> dict:
    """node -> the in-place writes it reads: the calls that changed, earlier in the graph, a tensor it reads or
    shares memory with (`acc.add_(branch(h))` then `mix(acc)`: mix reads acc's node, which the trace recorded before
    the writes; export's `buf[:, :16] = a(x)` is a `copy_` into a slice of buf). Graph edges alone miss them."""
    base, writes, out = {}, {}, {}
    for node in graph.nodes:
        found = []
        for a in node.all_input_nodes:
            found += [w for w in writes.get(base.get(a, a), ()) if w is not node]
        if found:
            out[node] = list(dict.fromkeys(found))
        first = node.args[0] if node.args else None
        if hasattr(first, "op") and _aliases_input(node):
            base[node] = base.get(first, first)
        for w in _written(node):
            writes.setdefault(base.get(w, w), []).append(node)
    return out
