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
