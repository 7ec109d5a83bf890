"""Interception of the frozen prefix's module calls, for one call of the model.

The activation cache never runs a graph of its own: it runs the model's forward and intercepts the top-level
calls of the frozen prefix's unit modules (`embeddings`, `encoder.layer.0`, ... in the order the forward makes
them), keyed `(module path, n)` for the n-th call of that module. For the duration of one model call, `forward`
of each of those modules is replaced by an instance attribute (removed again on exit, whatever happens), which
the module's `__call__` runs as usual. A call can be
  - run and recorded (its output kept): filling the cache, and the analysis;
  - served: its output given by the cache, the module's own forward skipped;
  - the last one the run needs: the run stops right after it (`Stop`), for prefix-only runs on part of a batch.
A call made from inside another intercepted call (a nested unit call) runs as is.
"""
from __future__ import annotations



class Stop(BaseException):
    """Ends a prefix-only run after the frozen prefix's last call. A BaseException, so that model code catching
    Exception does not swallow it."""


class UnexpectedCall(Exception):
    """A served run made a prefix call the cache has no output for (the forward's calls changed)."""


class Interception:
    """Replace `forward` of `modules` (path -> module) for the `with` block.

    serve: key -> output for calls to be served, or None (run every call for real). A key missing from a
        `serve` dict raises UnexpectedCall.
    real: keys (or paths) that run for real even when `serve` is given (newly frozen units on top of a served
        shallower prefix).
    stop_after: the key after whose call the run ends with Stop.
    watch: an object with `enter(key, args, kwargs)` and `leave(key, output)`, told about real top-level calls,
        and `served(key, output)`, told about served ones.
    others: further modules (path -> module) whose calls are only put in `order` as ("other", path).
    """

    def __init__(self, modules: dict, *, serve=None, real=(), stop_after=None, watch=None, others=None):
        self.modules = dict(modules)
        self.others = dict(others or {})
        self.serve = serve
        self.real = set(real)
        self.stop_after = stop_after
        self.watch = watch
        self.depth = 0
        self.counts: dict = {}
        self.order: list = []      # ("prefix", key) and ("other", path), in call order
        self.outputs: dict = {}    # key -> output of every top-level call (run or served)
        self._saved: list = []

    def __enter__(self):
        for path, module in list(self.modules.items()) + list(self.others.items()):
            had = "forward" in module.__dict__
            self._saved.append((module, had, module.__dict__.get("forward")))
            inner = module.forward
            wrapper = self._wrap(path, inner) if path in self.modules else self._watch_other(path, inner)
            module.__dict__["forward"] = wrapper
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
            return inner(*args, **kwargs)

        return forward

    def _wrap(self, path, inner):
        def forward(*args, **kwargs):
            if self.depth > 0:
                return inner(*args, **kwargs)
            index = self.counts.get(path, 0)
            self.counts[path] = index + 1
            key = (path, index)
            self.order.append(("prefix", key))
            if self.serve is not None and key not in self.real and path not in self.real:
                try:
                    out = self.serve[key]
                except KeyError:
                    raise UnexpectedCall(key) from None
                if self.watch is not None:
                    self.watch.served(key, out)
                self.outputs[key] = out
            else:
                if self.watch is not None:
                    self.watch.enter(key, args, kwargs)
                self.depth += 1
                try:
                    out = inner(*args, **kwargs)
                finally:
                    self.depth -= 1
                if self.watch is not None:
                    self.watch.leave(key, out)
                self.outputs[key] = out
            if key == self.stop_after:
                raise Stop
            return out

        return forward
