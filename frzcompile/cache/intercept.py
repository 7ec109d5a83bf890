"""Interception of the frozen prefix's module calls, for one call of the model.

The activation cache never runs a graph of its own: it runs the model's forward and intercepts the top-level
calls of the frozen prefix's unit modules (`embeddings`, `encoder.layer.0`, ... in the order the forward makes
them), keyed `(module path, n)` for the n-th call of that module. For the duration of one model call, `forward`
of each of those modules is replaced by an instance attribute (removed again on exit, whatever happens), which
the module's `__call__` runs as usual. A call can be
  - run and recorded: its output kept, as a copy taken when the call returns (code after it may change the
    tensors in place);
  - served: its output given by the cache, the module's own forward skipped;
  - the last one the run needs: the run stops right after it (`Stop`), for prefix-only runs on part of a batch;
    such runs also stop before any other unit would run.
A call made from inside another intercepted call (a nested unit call) runs as is.
"""
from __future__ import annotations

import contextlib
import functools
import time

import torch

from ..torch_private import tree_flatten, tree_unflatten


class Stop(BaseException):
    """Ends a prefix-only run. A BaseException, so that model code catching Exception does not swallow it."""


class UnexpectedCall(Exception):
    """A served run made a prefix call the cache has no output for (the forward's calls changed)."""


def snapshot(out, leaves=None):
    """`out` with its tensor leaves copied (only the leaf indexes in `leaves`, when given)."""
    flat, spec = tree_flatten(out)
    copied = [t.detach().clone() if isinstance(t, torch.Tensor) and (leaves is None or i in leaves) else t
              for i, t in enumerate(flat)]
    return tree_unflatten(copied, spec)


class Interception:
    """Replace `forward` of `modules` (path -> module) for the `with` block.

    serve: key -> output for calls to be served, or None (run every call for real). A key missing from a
        `serve` dict raises UnexpectedCall.
    real: paths that run for real even when `serve` is given (newly frozen units on top of a served shallower
        prefix).
    keep: which outputs to copy into `outputs` when a call returns: True (every tensor), a dict key -> set of
        leaf indexes, or False (none; `outputs` then holds the outputs themselves).
    stop_after: the key after whose call the run ends with Stop; `others` (path -> module, the other units) then
        also stop the run before they would run. Without it, `others` are only put in `order`.
    watch: an object with `enter(key, args, kwargs)`, `leave(key, output)` (real calls), `fed(args, kwargs)` and
        `served(key, output)` (served calls), and `muted()`, a context for the interception's own copies.
    """

    def __init__(self, modules: dict, *, serve=None, real=(), keep=False, stop_after=None, watch=None, others=None):
        self.modules = dict(modules)
        self.others = dict(others or {})
        self.serve = serve
        self.real = set(real)
        self.keep = keep
        self.stop_after = stop_after
        self.watch = watch
        self.depth = 0
        self.counts: dict = {}
        self.order: list = []      # ("prefix", key) and ("other", path), in call order
        self.outputs: dict = {}    # key -> output of every top-level call (run or served), see `keep`
        self.stopped = False       # whether the run ended at `stop_after`
        self.call_seconds = 0.0    # wall time inside the real top-level calls (the copies of `keep` left out)
        self.copy_seconds = 0.0    # wall time of those copies
        self._saved: list = []

    def __enter__(self):
        for path, module in list(self.modules.items()) + list(self.others.items()):
            had = "forward" in module.__dict__
            self._saved.append((module, had, module.__dict__.get("forward")))
            inner = module.forward
            wrapper = self._wrap(path, inner) if path in self.modules else self._watch_other(path, inner)
            module.__dict__["forward"] = functools.wraps(inner)(wrapper)
        return self

    def __exit__(self, *exc):
        for module, had, previous in reversed(self._saved):
            if had:
                module.__dict__["forward"] = previous
            else:
                module.__dict__.pop("forward", None)
        self._saved.clear()
        return False

    def _watch_other(self, path, inner):
        def forward(*args, **kwargs):
            if self.depth == 0:
                self.order.append(("other", path))
                if self.stop_after is not None:
                    raise Stop  # a prefix-only run never runs a unit outside the prefix
            return inner(*args, **kwargs)

        return forward

    def _record(self, key, out):
        keep = self.keep
        if keep is False:
            self.outputs[key] = out
            return
        start = time.perf_counter()
        with self.watch.muted() if self.watch is not None else contextlib.nullcontext():
            self.outputs[key] = snapshot(out) if keep is True else snapshot(out, keep.get(key, ()))
        self.copy_seconds += time.perf_counter() - start

    def _wrap(self, path, inner):
        def forward(*args, **kwargs):
            if self.depth > 0:
                return inner(*args, **kwargs)
            index = self.counts.get(path, 0)
            self.counts[path] = index + 1
            key = (path, index)
            self.order.append(("prefix", key))
            if self.serve is not None and path not in self.real:
                try:
                    out = self.serve[key]
                except KeyError:
                    raise UnexpectedCall(key) from None
                if self.watch is not None:
                    self.watch.fed(args, kwargs)
                    self.watch.served(key, out)
            else:
                if self.watch is not None:
                    self.watch.enter(key, args, kwargs)
                self.depth += 1
                start = time.perf_counter()
                try:
                    out = inner(*args, **kwargs)
                finally:
                    self.depth -= 1
                    self.call_seconds += time.perf_counter() - start
                if self.watch is not None:
                    self.watch.leave(key, out)
            self._record(key, out)
            if key == self.stop_after:
                self.stopped = True
                raise Stop
            return out

        return forward
