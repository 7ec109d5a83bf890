"""Sample independence from the operations themselves: does any operation before the frozen prefix's last call
reduce, sort, index or contract across the batch?

The cache serves each sample's prefix outputs by that sample's key, which is only right when a sample's outputs
depend on that sample alone. Comparing outputs on one example batch (the first check) can miss it: a prefix that
scales by the batch maximum passes when the example's maximum happens to sit in both halves. This check reads
the ATen operations instead. A TorchDispatchMode records every operation of two prefix-only runs, on the whole
batch (B samples) and on its first half (B // 2); the dimensions whose sizes differ between the two runs are the
batch dimensions of each tensor (merged ones, such as B * heads, included). It then rejects
  - an operation that takes a batch dimension and returns none (`x.sum()`, `x.T @ x`),
  - a reduction, scan or sort along a batch dimension (`amax(0)`, `cumsum(0)`, `sort(0)`, `softmax(0)`, BatchNorm
    on batch statistics),
  - indexing, slicing, flipping, rolling, repeating or concatenating along a batch dimension (`x[perm]`,
    `x[:1]`, `x.flip(0)`, `cat([x, y], 0)`),
  - a contraction that makes more batch dimensions than its inputs had (`x @ x.T`: every sample against every
    other),
  - and two runs that make different operations (behaviour that depends on the batch size).
Everything else (elementwise, per-sample matmuls and convolutions, reductions over other dimensions, views) is
per sample. A view that interleaves samples into another dimension (`x.view(x.shape[1], x.shape[0])`) is not
modelled: the example-batch comparison still runs after this check.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from ..torch_private import tree_flatten

aten = torch.ops.aten


@dataclass(frozen=True)
class Shape:
    """A tensor argument, as recorded: its shape and dtype only."""

    size: tuple
    dtype: torch.dtype


@dataclass
class OpCall:
    name: str          # e.g. "aten.amax.default"
    packet: str        # e.g. "amax"
    args: list         # flattened arguments: Shape for tensors, the value for the rest
    arg_names: list    # the schema name of each flattened argument's top-level argument
    outputs: list      # Shape of each tensor output
    sources: list      # for each flattened argument, the index of the recorded operation that made it, or None


class OpRecorder(TorchDispatchMode):
    """Records every ATen operation run inside it (names, argument shapes and plain arguments)."""

    def __init__(self):
        super().__init__()
        self.ops: list = []
        self._made_by = WeakIdKeyDictionary()  # tensor -> index of the operation that returned it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        names, values, sources = [], [], []
        for i, argument in enumerate(func._schema.arguments):  # every argument, defaults included
            if i < len(args):
                value = args[i]
            elif argument.name in kwargs:
                value = kwargs[argument.name]
            elif argument.has_default_value():
                value = argument.default_value
            else:
                continue
            # a list of tensors (cat's, index's) is one entry per tensor; any other list (dims, sizes) stays whole
            split = isinstance(value, (list, tuple)) and "Tensor" in str(argument.type)
            for leaf in value if split else [value]:
                names.append(argument.name)
                values.append(_shape(leaf) if isinstance(leaf, torch.Tensor) else leaf)
                sources.append(self._made_by.get(leaf) if isinstance(leaf, torch.Tensor) else None)
        made = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        for t in made:
            self._made_by[t] = len(self.ops)
        self.ops.append(OpCall(str(func), func._overloadpacket.__name__, values, names, [_shape(t) for t in made],
                               sources))
        return out


def _shape(t: torch.Tensor) -> Shape:
    return Shape(tuple(t.shape), t.dtype)


# packet -> the argument naming the dimension(s) it reduces, scans, sorts or indexes along
_ALONG_DIM = {
    **{p: "dim" for p in ("sum", "mean", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean",
                          "logsumexp", "prod", "argmax", "argmin", "any", "all", "norm", "linalg_vector_norm",
                          "nansum", "nanmean", "count_nonzero", "median", "nanmedian", "mode", "kthvalue",
                          "_softmax", "_log_softmax", "softmax", "log_softmax", "cumsum", "cumprod", "cummax",
                          "cummin", "logcumsumexp", "sort", "argsort", "topk", "index_select", "gather", "scatter",
                          "scatter_add", "scatter_reduce", "index_add", "index_copy", "index_fill", "index_reduce",
                          "select", "narrow", "unbind", "split", "split_with_sizes", "chunk", "tensor_split",
                          "unsafe_split", "unsafe_chunk", "cat", "concat", "concatenate", "diff",
                          "renorm", "glu", "repeat_interleave")},
    **{p: "dims" for p in ("flip", "roll")},
    "unfold": "dimension",
}
# contractions: (first operand, second operand, its contracted dimension) by argument name; the first operand
# always contracts its last dimension
_CONTRACTED = {"mm": ("self", "mat2", 0), "bmm": ("self", "mat2", 1), "matmul": ("self", "other", -2),
               "addmm": ("mat1", "mat2", 0), "baddbmm": ("batch1", "batch2", 1), "addbmm": ("batch1", "batch2", 1),
               "linear": ("input", "weight", -1)}
# reductions whose missing `dim` means every dimension
_FULL_WHEN_NO_DIM = {"sum", "mean", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean", "prod",
                     "argmax", "argmin", "any", "all", "norm", "linalg_vector_norm", "nansum", "nanmean",
                     "count_nonzero", "median", "nanmedian", "logsumexp"}
_CONTRACTIONS = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "matmul", "linear", "einsum", "tensordot", "dot",
                 "vdot", "mv", "addmv", "outer", "ger", "_scaled_mm", "chain_matmul", "kron", "cdist",
                 "_cdist_forward"}
_BATCH_NORMS = {"native_batch_norm", "_native_batch_norm_legit", "batch_norm", "_batch_norm_impl_index",
                "cudnn_batch_norm", "miopen_batch_norm", "_batch_norm_with_update", "_batch_norm_no_update"}
# ops that read only a tensor's dtype and device, not its values
_FACTORIES = {"new_zeros", "new_ones", "new_empty", "new_full", "new_empty_strided", "scalar_tensor",
              "_local_scalar_dense", "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
              "randint_like", "lift_fresh", "lift_fresh_copy", "is_nonzero", "equal", "sym_size",
              "sym_numel", "sym_stride", "sym_storage_offset"}


def _batch_dims(a: Shape, b: Shape) -> set:
    if len(a.size) != len(b.size):
        return {-1}  # the rank itself follows the batch: treated as a batch dimension that cannot be placed
    return {d for d, (x, y) in enumerate(zip(a.size, b.size)) if x != y}


def _dims(value, ndim: int) -> list:
    if value is None:
        return []
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return [v % ndim if ndim else 0 for v in values if isinstance(v, int) and not isinstance(v, bool)]


OTHER_OPERATIONS = ("the frozen prefix runs other operations on half the batch (its code depends on the batch size, or "
                    "on what the batch holds: Hugging Face models skip an attention mask without padding)")


def batch_mixing(full: list, half: list) -> str:
    """Why the recorded operations mix samples across the batch, or '' (see the module docstring). `full` and
    `half` are OpRecorder.ops of the same region run on the whole batch and on its first half."""
    if len(full) != len(half) or any(x.name != y.name for x, y in zip(full, half)):
        return OTHER_OPERATIONS
    consumers: dict = {}
    for j, op in enumerate(full):
        for i in op.sources:
            if i is not None:
                consumers.setdefault(i, []).append(j)
    for i, (x, y) in enumerate(zip(full, half)):
        why = _mixes(x, y, full)
        if why and not _only_steers(i, full, half, consumers):
            return f"{x.name} {why}"
    return ""


_PYTHON_VALUE = {"is_nonzero", "equal"}  # and `.item()` of a bool: values that can only steer a branch


def _only_steers(i: int, full: list, half: list, consumers: dict) -> bool:
    """Whether what operation i computed is only ever read as a Python value (a branch such as Hugging Face's
    `torch.all(mask == 1)` shortcut), never flowing back into a tensor with a batch dimension. Such a
    batch-wide decision is left to the example-batch comparison."""
    if not full[i].outputs:
        return False
    stack, seen = [i], set()
    while stack:
        j = stack.pop()
        if not consumers.get(j):
            return False  # read by nothing recorded: an output of the region, or of a call the cache serves
        for k in consumers.get(j, ()):
            if k in seen:
                continue
            seen.add(k)
            op = full[k]
            if op.packet in _PYTHON_VALUE or (op.packet == "_local_scalar_dense" and op.args
                                              and isinstance(op.args[0], Shape) and op.args[0].dtype == torch.bool):
                continue
            if any(_batch_dims(a, b) for a, b in zip(op.outputs, half[k].outputs)):
                return False
            stack.append(k)
    return True


_VIEWS = {"unsqueeze", "view", "reshape", "_unsafe_view", "expand", "clone", "_to_copy", "alias", "squeeze",
          "contiguous", "detach", "lift_fresh", "lift_fresh_copy"}


def _arg(op: OpCall, name: str, default=None):
    return next((v for n, v in zip(op.arg_names, op.args) if n == name), default)


def _is_arange(j, ops: list, length: int) -> bool:
    """Whether operation j's output is `arange(length)` (through views): indexing the batch dimension with it
    takes every sample in order (Hugging Face's mask functions index masks by `arange(batch)[:, None, ...]`)."""
    while j is not None:
        op = ops[j]
        if op.packet == "arange":
            return (op.outputs[0].size == (length,) and _arg(op, "start", 0) in (None, 0)
                    and _arg(op, "step", 1) in (None, 1))
        if op.packet not in _VIEWS:
            return False
        j = op.sources[0] if op.sources else None
    return False


def _mixes(x: OpCall, y: OpCall, ops: list) -> str:
    shapes = [(i, a, b) for i, (a, b) in enumerate(zip(x.args, y.args)) if isinstance(a, Shape)]
    in_batch = {i: _batch_dims(a, b) for i, a, b in shapes}
    if not any(in_batch.values()) or x.packet in _FACTORIES:
        return ""
    out_batch = [_batch_dims(a, b) for a, b in zip(x.outputs, y.outputs)]
    if x.outputs and not any(out_batch):
        if x.packet in ("slice", "select", "narrow", "index"):
            return "takes part of the batch"
        return "reduces across the batch (its result has no batch dimension)"
    first = next(i for i, _, _ in shapes)
    dims0 = in_batch[first]
    ndim0 = len(x.args[first].size)
    if -1 in dims0:
        return "changes rank with the batch size"
    if x.packet in _BATCH_NORMS:
        # batch statistics reduce every dimension but the channels (1); instance norm runs BatchNorm on a
        # (1, B * C, ...) view, which keeps samples apart
        training = next((v for n, v in zip(x.arg_names, x.args) if n == "training"), False)
        return "normalizes with batch statistics (BatchNorm in training mode)" if training and dims0 - {1} else ""
    if x.packet in _CONTRACTIONS:
        most_in = max(len(d) for d in in_batch.values())
        if any(len(d) > most_in for d in out_batch):
            return "contracts samples against each other (e.g. x @ x.T across the batch)"
        if x.packet in _CONTRACTED:
            first_name, second_name, dim = _CONTRACTED[x.packet]
            pairs = {n: (a, b) for n, a, b in zip(x.arg_names, x.args, y.args) if isinstance(a, Shape)}
            if first_name in pairs and second_name in pairs:
                (a1, b1), (a2, b2) = pairs[first_name], pairs[second_name]
                d1 = _batch_dims(a1, b1)
                d2 = _batch_dims(a2, b2)
                k2 = (dim if len(a2.size) >= 2 else 0) % max(len(a2.size), 1)
                if (a1.size and (len(a1.size) - 1) in d1) or (a2.size and k2 in d2):
                    return "contracts over the batch dimension (sums over samples)"
        return ""
    argument = _ALONG_DIM.get(x.packet)
    if argument is not None:
        value = next((v for n, v in zip(x.arg_names, x.args) if n == argument), None)
        if value is None and x.packet in _FULL_WHEN_NO_DIM:
            return "reduces across the batch" if dims0 else ""
        along = set(_dims(value, ndim0))
        if x.packet in ("cat", "stack", "concat", "concatenate"):
            along = set(_dims(value if value is not None else 0, max(len(a.size) for _, a, _ in shapes) or 1))
            hit = any(along & d for d in in_batch.values())
            return "concatenates along the batch dimension" if hit else ""
        if along & dims0:
            if x.packet == "narrow":
                return "takes part of the batch"
            return f"works along a batch dimension ({x.packet} over dim {sorted(along & dims0)})"
        return ""
    if x.packet == "slice":
        dim = next((v for n, v in zip(x.arg_names, x.args) if n == "dim"), 0)
        start = next((v for n, v in zip(x.arg_names, x.args) if n == "start"), None)
        end = next((v for n, v in zip(x.arg_names, x.args) if n == "end"), None)
        step = next((v for n, v in zip(x.arg_names, x.args) if n == "step"), 1)
        size = x.args[first].size[dim % ndim0] if ndim0 else 0
        whole = (start in (None, 0)) and (end is None or end >= size) and step in (None, 1)
        return "" if whole or (dim % ndim0) not in dims0 else "takes part of the batch (a slice of it)"
    if x.packet in ("index", "_unsafe_index", "index_put", "_index_put_impl", "_unsafe_index_put"):
        positions = [i for i, n in enumerate(x.arg_names) if n == "indices"]
        indices = [x.args[i] for i in positions]
        if x.packet != "index" and len(indices) == 1 and isinstance(indices[0], Shape) and \
                indices[0].dtype == torch.bool and indices[0].size == x.args[first].size:
            return ""  # x[mask] = v with a mask shaped like x: element by element
        for k, (i, index) in enumerate(zip(positions, indices)):
            if index is not None and k in dims0 and not _is_arange(x.sources[i], ops, x.args[first].size[k]):
                return "indexes along the batch dimension"
        return ""
    if x.packet in ("masked_select", "nonzero", "nonzero_static", "unique", "_unique2", "unique_consecutive",
                    "take", "put", "bincount", "histc"):
        return "selects by value across the batch"
    if x.packet in ("repeat", "tile"):
        repeats = next((v for n, v in zip(x.arg_names, x.args) if n in ("repeats", "dims")), None)
        reps = list(repeats or [])
        lead = len(reps) - ndim0
        if any(r != 1 for d, r in enumerate(reps) if d - lead in dims0):
            return "repeats along the batch dimension"
        return ""
    return ""
