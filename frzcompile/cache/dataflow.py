"""What the rest of the model really reads from the frozen prefix: a dataflow probe over one eager forward.

While the model runs (with the prefix's calls intercepted, see intercept.py), a TorchFunctionMode sees every
torch operation. Operations inside a prefix call make "internal" tensors; the outputs of the prefix's top-level
calls are its "leaves"; operations outside make the rest. A backward liveness pass from the model's output (and
from every in-place operation, every operation returning a Python value, which may steer control flow) then
says which leaves are read by anything that matters: only those are cached. The other leaves only feed other
prefix calls, which the cache serves too, so a placeholder of the right shape stands in for them. Shape and
dtype queries do not count as reads.

The probe also finds what would make serving unfaithful: an internal tensor that leaves the prefix other than
as a call's output (a key/value cache object filled inside), random numbers drawn inside the prefix, a prefix
input that requires grad, state changed in place by the prefix, or by the code running before the prefix ends
(which prefix-only runs would repeat).
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch.overrides import TorchFunctionMode

from ..inplace import changes_in_place
from ..torch_private import rng_states, same_rng, tree_flatten

_T = torch.Tensor
_METADATA = {_T.size, _T.dim, _T.numel, _T.__len__, _T.stride, _T.is_floating_point, _T.is_complex,
             _T.is_contiguous, _T.element_size, _T.nelement, _T.ndimension, _T.get_device, _T.storage_offset}
_METADATA_PROPERTIES = {_T.shape, _T.dtype, _T.device, _T.ndim, _T.requires_grad, _T.is_cuda, _T.layout,
                        _T.is_sparse, _T.is_quantized, _T.is_meta, _T.is_leaf}


# operations that change buffers in place without moving their version counters (checked on torch 2.13.0): the
# fused observer and fake-quantize op of quantization-aware training (FusedMovingAvgObsFakeQuantize, the "x86"
# and "fbgemm" QAT qconfigs' activations), refused even while its observer is off (a `fill_` turns it on later)
_UNCOUNTED_WRITES = {torch.fused_moving_avg_obs_fake_quant: "torch.fused_moving_avg_obs_fake_quant (the fused "
                     "observer of quantization-aware training)"}


def _is_metadata(func) -> bool:
    return func in _METADATA or getattr(func, "__self__", None) in _METADATA_PROPERTIES


def _by_name(func, kwargs) -> bool:
    """In place by name (the version check below also sees `inplace=True` functionals and custom ops)."""
    return changes_in_place(getattr(func, "__name__", ""), kwargs)


def _base(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose memory `t` views (`t` itself when it is no view)."""
    return t if t._base is None else t._base


def _tensors(obj):
    leaves, _ = tree_flatten(obj)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def deep_tensors(obj, limit: int = 6):
    """Tensors inside `obj`: pytree containers and also plain objects' attributes (a DynamicCache in an output)."""
    found, seen, stack = [], set(), [(obj, 0)]
    while stack:
        value, depth = stack.pop()
        if id(value) in seen or depth > limit:
            continue
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, torch.nn.Module) or isinstance(value, (str, bytes, int, float, bool, type(None))):
            continue
        elif hasattr(value, "__dict__"):
            stack.extend((v, depth + 1) for v in vars(value).values())
    return found


class ProbeResult:
    def __init__(self):
        self.needed: set = set()        # (key, leaf index) of prefix outputs the cache must store
        self.standins: set = set()      # (key, leaf index) of outputs read only on the way to other prefix calls
        self.problems: list = []        # why serving would not be faithful (empty: fine)
        self.state: list = []           # parameters and buffers read inside the prefix or before it ends
        self.random_between = False     # code before or between prefix calls drew random numbers
        self.unread_args: set = set()   # positions of watched arguments nothing before the prefix's end reads


class DataflowProbe(TorchFunctionMode):
    """Use as `with Interception(..., watch=probe) as ic: probe.interception = ic; with probe: model(...)`."""

    def __init__(self, state_tensors=(), generators=()):
        super().__init__()
        self._generators = list(generators)  # the model's own torch.Generators, watched with torch's, random's, numpy's
        self.interception = None
        self._state = {id(t) for t in state_tensors}  # parameters and buffers of the model
        self._serials: dict = {}      # id(tensor) -> (weakref, serial)
        self._next = 0
        self._internal: set = set()   # serials of tensors made inside prefix calls
        self._leaves: dict = {}       # serial -> [(key, leaf index)]
        self._leaf_bases: dict = {}   # serial of a leaf's base -> the leaves viewing it (or itself)
        self._changed_leaves: set = set()  # (leaf serial, operation) changed in place by a later prefix call
        self._ops: list = []          # outside prefix calls: (input serials, output serials, sink)
        self._last_prefix_op = -1     # index into _ops when the last prefix call returned
        self._state_changed_early: list = []  # op indexes that changed model state outside prefix calls
        self._state_reads: list = []  # (op index or -1 inside the prefix, tensor) for model state read
        self._seen_read: set = set()  # serials read outside prefix calls (by an operation or as a call's argument)
        self._rng = None
        self._rng_left = None         # the generators' state when the last prefix call returned
        self.random_between = False   # whether code before or between prefix calls drew random numbers
        self._busy = False            # the probe's own bookkeeping is not the model's
        self.problems: list = []
        self._arguments: dict = {}    # position -> serial of the call's arguments watched (watch_arguments)
        self._python_value_inside = False  # an operation inside a prefix call returned a Python value
        self._read_inside: set = set()  # serials made outside the prefix and read by operations inside it

    def watch_arguments(self, tensors: dict) -> None:
        """Tensors the model is called with (position -> tensor): `result` says which of them nothing reads
        before the prefix ends (not its calls, not code before or between them, not a Python value taken), and
        none when any Python value was taken before then (`_steered`: another call could read what this one
        did not)."""
        self._arguments = {position: self._serial(t) for position, t in tensors.items()}

    # -- tensor identities (ids are reused once a tensor dies, serials never are) --------------------------
    def _serial(self, t, new=False) -> int:
        entry = self._serials.get(id(t))
        if entry is not None and not new and entry[0]() is t:
            return entry[1]
        serial = self._next
        self._next += 1
        self._serials[id(t)] = (weakref.ref(t), serial)
        return serial

    def _known(self, t) -> int | None:
        entry = self._serials.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    # -- the mode ---------------------------------------------------------------------------------------
    def __enter__(self):
        # the model's call starts: a draw before the first prefix call counts too
        self._rng_left = rng_states(self._generators)
        return super().__enter__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._busy or _is_metadata(func):
            return func(*args, **kwargs)
        inputs = _tensors((args, kwargs))
        versions = [t._version for t in inputs]
        out = func(*args, **kwargs)
        changed = [t for t, v in zip(inputs, versions) if t._version != v]
        if _by_name(func, kwargs) and inputs and not changed:
            changed = [inputs[0]]
        input_ids = {id(t) for t in inputs}
        outputs = _tensors(out)
        inside = self.interception is not None and self.interception.depth > 0
        for t in inputs:
            if id(t) in self._state:
                self._state_reads.append((-1 if inside else len(self._ops), t))
        if inside:
            self._read_inside.update(s for s in (self._known(t) for t in inputs) if s is not None)
            if any(t.requires_grad and t.is_leaf and id(t) not in self._state for t in inputs):
                self._problem("the frozen prefix reads a tensor that requires grad and is neither a parameter nor a "
                              "buffer (a plain tensor attribute trained by hand): a served output would carry no "
                              "gradient to it")
            if not outputs:
                self._python_value_inside = True  # (a branch inside the prefix may read other arguments)
            if func in _UNCOUNTED_WRITES:
                self._problem(f"the frozen prefix calls {_UNCOUNTED_WRITES[func]}, which updates buffers without "
                              "torch's version counters seeing it (when its observer is on), and serving would skip "
                              "those updates")
            # (through a view, the tensor changed is the view's base: `x[:, :2] *= 2` changes x)
            bases = [self._known(_base(t)) for t in changed]
            name = getattr(func, "__name__", str(func))
            if any(b not in self._internal for b in bases):
                self._problem(f"the frozen prefix changes a tensor it did not create in place ({name}), which "
                              "serving from the cache would skip")
            for t, b in zip(changed, bases):  # another call's output (judged in `result`: if it is stored)
                hit = self._leaf_bases.get(b, set()) | ({self._known(t)} & self._leaves.keys())
                self._changed_leaves.update((serial, name) for serial in hit)
            input_bases = {id(_base(t)) for t in inputs}
            for t in outputs:
                if id(t) not in input_ids:
                    self._internal.add(self._serial(t, new=True))
                    # an output that views a tensor the operation made and did not return (F.linear on a 3-d
                    # input returns a view of its matmul's result): that tensor is the prefix's own too
                    if t._base is not None and id(t._base) not in input_bases and self._known(t._base) is None:
                        self._internal.add(self._serial(t._base, new=True))
            return out
        ins = tuple(self._serial(t) for t in inputs)
        self._seen_read.update(ins)
        outs = tuple(self._serial(t, new=id(t) not in input_ids) for t in outputs)
        sink = bool(changed) or not outputs
        if any(id(t) in self._state for t in changed):
            self._state_changed_early.append(len(self._ops))
        self._ops.append((ins, outs, sink))
        return out

    # -- told by the Interception ---------------------------------------------------------------------------
    def enter(self, key, args, kwargs) -> None:
        self._busy = True
        try:
            tensors = _tensors((args, kwargs))
            if any(t.requires_grad for t in tensors):
                self._problem("an input of the frozen prefix requires grad (gradients must flow through it)")
            self._seen_read.update(s for s in (self._known(t) for t in tensors) if s is not None)
            self._rng = rng_states(self._generators)
            if self._rng_left is not None and not same_rng(self._rng_left, self._rng):
                self.random_between = True
        finally:
            self._busy = False

    def leave(self, key, out) -> None:
        self._busy = True
        try:
            self._rng_left = rng_states(self._generators)
            if not same_rng(self._rng, self._rng_left):
                self._problem(f"the frozen prefix draws random numbers (in {key[0]}), which serving from the "
                              "cache would skip")
            self._register(key, out)
        finally:
            self._busy = False

    def served(self, key, out) -> None:
        """A call served from a shallower prefix's entries: its outputs are leaves like any other call's."""
        self._busy = True
        try:
            self._register(key, out)
        finally:
            self._busy = False

    def fed(self, args, kwargs) -> None:
        """Tensors handed to a served prefix call (they count as fed to the prefix, like a real call's)."""
        self._seen_read.update(s for s in (self._known(t) for t in _tensors((args, kwargs))) if s is not None)

    def _register(self, key, out) -> None:
        leaves, _ = tree_flatten(out)
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                self._leaves.setdefault(self._serial(leaf), []).append((key, i))
                self._leaf_bases.setdefault(self._serial(_base(leaf)), set()).add(self._serial(leaf))
        self._last_prefix_op = len(self._ops)

    @contextlib.contextmanager
    def muted(self):
        """Operations inside are the cache's own (copying outputs), not the model's."""
        busy, self._busy = self._busy, True
        try:
            yield
        finally:
            self._busy = busy

    def _problem(self, text: str) -> None:
        if text not in self.problems:
            self.problems.append(text)

    # -- after the call ---------------------------------------------------------------------------------
    def result(self, model_output) -> ProbeResult:
        res = ProbeResult()
        res.problems = list(self.problems)
        res.random_between = self.random_between
        live = {s for s in (self._known(t) for t in deep_tensors(model_output)) if s is not None}
        for ins, outs, sink in reversed(self._ops):
            if sink or any(o in live for o in outs):
                live.update(ins)
        for serial, leaves in self._leaves.items():
            if serial in live or serial not in self._seen_read:
                res.needed.update(leaves)
            else:
                res.standins.update(leaves)
        for serial, name in sorted(self._changed_leaves):
            if any(leaf in res.needed for leaf in self._leaves[serial]):
                res.problems.append(f"a frozen unit changes another's output in place ({name}: an in-place "
                                    "activation on its input), which the code around reads: the cache would serve "
                                    "that output as it was before the change")
                break
        if any(serial in self._internal and serial not in self._leaves for serial in live):
            res.problems.append("a tensor computed inside the frozen prefix leaves it other than as a unit's "
                                "output (e.g. a key/value cache filled inside: call a decoder with use_cache=False "
                                "while training)")
        if any(i < self._last_prefix_op for i in self._state_changed_early):
            res.problems.append("code running before the frozen prefix ends changes a parameter or buffer in "
                                "place (e.g. a BatchNorm outside every unit), which prefix-only runs would repeat")
        if not self._steered():
            res.unread_args = {position for position, serial in self._arguments.items() if not self._reaches(serial)}
        seen = set()
        for i, t in self._state_reads:
            if (i < 0 or i < self._last_prefix_op) and id(t) not in seen:
                seen.add(id(t))
                res.state.append(t)
        return res

    def close(self) -> None:
        """Drop the weak references to the call's tensors (the model's parameters among them: torch.utils.swap_tensors,
        which .double() uses under swap_module_params_on_conversion, refuses a tensor that has one) and the link to
        the interception (a cycle that would keep them until the next garbage collection)."""
        self._serials.clear()
        self.interception = None

    def _steered(self) -> bool:
        """Whether any operation before the prefix's last call returned took a Python value or changed a tensor in
        place, inside the prefix or outside it (a branch there may read, on another call, an argument this one
        did not: from the arguments, the prefix's outputs or anything else)."""
        return self._python_value_inside or any(sink for _, _, sink in self._ops[:self._last_prefix_op])

    def _reaches(self, serial) -> bool:
        """Whether `serial`, or anything computed from it before the prefix's last call returned, was read by an
        operation inside a prefix call or returned by one (asked only when nothing was `_steered`). Handed to a
        prefix call and never read there (Hugging Face passes its `**kwargs` down to every layer) does not count."""
        tainted = {serial}
        for ins, outs, _ in self._ops[:self._last_prefix_op]:
            if not tainted.isdisjoint(ins):
                tainted.update(outs)
        return not tainted.isdisjoint(self._read_inside) or not tainted.isdisjoint(self._leaves)
