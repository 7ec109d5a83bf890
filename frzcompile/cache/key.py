"""What a cache entry is keyed by, besides each sample's input: the call's signature (the structure of the
arguments, per-sample shapes, dtypes and layouts, plain arguments, train/eval, autocast), the Python state of the
modules around the frozen prefix (`PythonState`), and content digests of tensors (an edit through `.data` moves no
version counter)."""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import torch_private
from ..torch_private import tree_flatten, tree_unflatten
from .store import _describe, row_digests

SCALARS = (int, float, bool, str, type(None), torch.dtype, torch.device)
FIELDS = SCALARS + (list, tuple, dict, set, frozenset, torch.Tensor)  # an object's fields that are keyed
_MODULE_FIELDS = frozenset(vars(torch.nn.Module())) | {"forward", "training"}  # nn.Module's own bookkeeping
CONTAINER_ITEMS = 64  # a list, tuple, dict or set held as a module attribute is keyed by content up to this size
ARRAY_BYTES = 4096    # and a numpy array up to this many bytes


def _tensor_token(t: torch.Tensor) -> tuple:
    return id(t), torch_private.tensor_version(t), t.dtype, t.data_ptr()


def _contents(value, depth: int = 0, tensors: list | None = None):
    """A token of a plain container's contents, so that `self.cfg["act"] = "tanh"` or `self.acts[0] = ...` made
    in place is seen: plain values by value, tensors by identity and version (and each appended to `tensors`, for
    a digest of their contents: an edit through `.data` moves no version), containers two deep, anything else
    (and a larger container) by identity."""
    if isinstance(value, SCALARS):
        return value
    if isinstance(value, torch.Tensor):
        if tensors is not None:
            tensors.append(value)
        return _tensor_token(value)
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, value.tobytes()) if value.nbytes <= ARRAY_BYTES else id(value)
    if depth < 2 and isinstance(value, (list, tuple, dict, set, frozenset)) and len(value) <= CONTAINER_ITEMS:
        if isinstance(value, dict):
            return type(value).__name__, tuple((_contents(k, 2), _contents(v, depth + 1, tensors))
                                               for k, v in value.items())
        items = tuple(_contents(v, depth + 1, tensors) for v in value)
        return type(value).__name__, tuple(sorted(items, key=repr)) if isinstance(value, (set, frozenset)) else items
    return id(value)


class PythonState:
    """A digest of the Python state the forward of some modules may read besides tensors' contents: train/eval,
    plain attributes (a temperature, LayerNorm's eps, a flag switching a code path), tensors held as plain
    attributes (by identity, version, dtype, device, storage), the contents of lists, tuples, dicts and sets they
    hold (`_contents`), and the plain and tensor fields of objects they hold (a Hugging Face config's
    output_hidden_states or attention implementation, a helper holding normalisation statistics). Python state
    elsewhere (a global the forward reads) is not seen. The attribute
    names of each module are listed once, and again whenever its number of attributes changes."""

    def __init__(self, modules, watch_data: bool = True):
        self.modules = list(modules)
        self.watch_data = watch_data  # also digest the contents of tensors held as plain attributes (.data edits)
        self._names = [(-1, ()) for _ in self.modules]
        self._names_repr = None

    def _collect(self) -> tuple:
        """(flat tokens in the order of `_names`, object id -> its keyed fields, the tensors held as attributes, in
        their containers and objects)."""
        tokens, objects, tensors = [], {}, []
        for i, m in enumerate(self.modules):
            d = m.__dict__
            size, names = self._names[i]
            if size != len(d):
                names = tuple(k for k in d if k not in _MODULE_FIELDS)
                self._names[i] = (len(d), names)
                self._names_repr = None
            tokens.append(m.training)
            for name in names:
                value = d.get(name)
                if isinstance(value, SCALARS):
                    tokens.append(value)
                elif isinstance(value, torch.Tensor):
                    tokens.append(_tensor_token(value))
                    tensors.append(value)
                elif isinstance(value, (list, tuple, dict, set, frozenset, np.ndarray)):
                    tokens.append((id(value), _contents(value, tensors=tensors)))
                elif isinstance(value, torch.nn.Module) or not hasattr(value, "__dict__"):
                    tokens.append(id(value))
                else:  # an object such as a config: its plain and tensor fields, once per object
                    tokens.append(id(value))
                    if id(value) not in objects:
                        objects[id(value)] = [(k, _contents(v, tensors=tensors)) for k, v in vars(value).items()
                                              if isinstance(v, FIELDS)]
        return tokens, objects, tensors

    def digest(self) -> bytes:
        tokens, objects, tensors = self._collect()
        if self._names_repr is None:
            self._names_repr = repr([names for _, names in self._names])
        h = hashlib.blake2b((self._names_repr + repr(tokens) + repr(objects)).encode(), digest_size=16)
        if self.watch_data and tensors:  # an edit through .data moves no version counter: digest their contents
            h.update(content_digest(tensors))
        return h.digest()

    def named(self) -> dict:
        """(module index, attribute or "training") -> token: what `digest` hashes, for telling what changed."""
        tokens, _, _ = self._collect()
        flat, out = iter(tokens), {}
        for i, (_, names) in enumerate(self._names):
            out[i, "training"] = next(flat)
            for name in names:
                out[i, name] = next(flat)
        return out


@dataclass
class Signature:
    """One call's arguments, reduced to what decides how the model's forward runs (`digest`), and the Python state
    of the modules around the frozen prefix (`state`, a PythonState digest); entries are keyed by both."""

    leaves: list
    batch: int | None            # the first tensor argument's leading size
    batch_leaves: tuple          # positions of tensor arguments whose leading size is the batch
    digest: bytes
    unsupported: str = ""        # why these arguments cannot be keyed, if they cannot
    state: bytes = b""
    unread: frozenset = frozenset()  # positions of arguments the prefix never reads (its plan's), left out of keys
    _shared: bytes | None = None
    _rows: list | None = field(default=None, compare=False, repr=False)  # row_digests, kept by with_state's copies

    def with_state(self, state: bytes) -> Signature:
        return dataclasses.replace(self, state=state, _shared=None)

    def for_plan(self, plan) -> Signature:
        """This signature keyed as `plan` keys it (without the arguments its prefix never reads)."""
        return self if plan.unread == self.unread else dataclasses.replace(self, unread=plan.unread, _shared=None)

    def row_digests(self) -> list:
        """Per-sample digests of the batch arguments (computed once: a call is looked up at several levels)."""
        if self._rows is None:
            self._rows = row_digests(self.tensors(self.batch_leaves))
        return self._rows

    @classmethod
    def of(cls, args, kwargs, training: bool, flat=None) -> Signature:
        """`flat`: `tree_flatten((tuple(args), dict(kwargs)))` when the caller has it already."""
        leaves, spec = flat if flat is not None else tree_flatten((tuple(args), dict(kwargs)))
        tensors = [(i, t) for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
        batch = next((t.shape[0] for _, t in tensors if t.dim() > 0), None)
        batch_leaves = tuple(i for i, t in tensors if t.dim() > 0 and t.shape[0] == batch)
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{spec}|train={training}".encode())
        for device_type in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device_type):
                h.update(f"|autocast {device_type} {torch.get_autocast_dtype(device_type)}".encode())
        unsupported = ""
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                shape = tuple(leaf.shape[1:]) if i in batch_leaves else ("whole",) + tuple(leaf.shape)
                h.update(f"|{i}:{leaf.dtype}:{leaf.device}:{shape}:{layout(leaf)}".encode())  # (channels-last)
            elif isinstance(leaf, SCALARS):
                h.update(f"|{i}={leaf!r}".encode())
            else:
                unsupported = f"an argument of type {type(leaf).__name__} (only tensors and plain values are keyed)"
        return cls(leaves, batch, batch_leaves, h.digest(), unsupported)

    def tensors(self, positions):
        return [self.leaves[i] for i in positions]

    def shared_digest(self) -> bytes:
        """The signature, the Python state and the contents of the arguments that are not per sample and that the
        prefix may read (computed once)."""
        if self._shared is None:
            h = hashlib.blake2b(self.digest + self.state, digest_size=16)
            for i, t in enumerate(self.leaves):
                if isinstance(t, torch.Tensor) and i not in self.batch_leaves and i not in self.unread:
                    h.update(_describe(t))
            self._shared = h.digest()
        return self._shared

    def select(self, args, kwargs, index):
        """(args, kwargs) with every batch-first tensor argument cut to rows `index`."""
        leaves, spec = tree_flatten((tuple(args), dict(kwargs)))
        for i in self.batch_leaves:
            leaves[i] = leaves[i][index.to(leaves[i].device)] if isinstance(index, torch.Tensor) else leaves[i][index]
        return tree_unflatten(leaves, spec)


def content_digest(tensors) -> bytes:
    """The sum of each tensor's values (float64 ones accumulated in float64, other floating ones in float32), as
    bytes: changes when a value changes through any route, `.data` included, unless an edit keeps every sum exactly
    (a permutation of a tensor's elements) or is below the sum's rounding (float32: about 1e-7 of the sum of
    magnitudes; accumulating float32 in float64 costs 15x on a CPU). One read of each tensor; one transfer to the
    host per device and accumulation type."""
    by_device: dict = {}  # (device, accumulation dtype) -> sums: one stack and one transfer each
    for t in tensors:
        t = torch.view_as_real(t.detach()) if t.is_complex() else t.detach()
        acc = (torch.float64 if t.dtype == torch.float64 else torch.float32) if t.is_floating_point() else torch.int64
        by_device.setdefault((t.device, acc), []).append(t.sum(dtype=acc))
    return b"".join(torch.stack(sums).cpu().numpy().tobytes() for sums in by_device.values())


def layout(t: torch.Tensor) -> tuple:
    """The order of `t`'s dimensions in memory, outermost first (channels-last, transposed views...)."""
    return tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), d)))
