"""The activation cache: serve the frozen prefix's outputs from the store instead of computing them, inside the
model's own forward.

Per frozen prefix and per call signature (the structure of the arguments, per-sample shapes and dtypes,
non-tensor arguments, train/eval, autocast), the first call runs the model for real under a dataflow probe
(dataflow.py), which finds the prefix calls whose outputs the rest of the model reads. The prefix is then run
alone (intercept.py: the run stops after the prefix's last call) on the same batch again, on its first half and
reversed: each read output must be deterministic, and either the same whatever the batch holds ("shared", e.g.
an attention mask of these shapes) or batch-first with each sample's rows depending on that sample alone
("sample"), all within the measured numerical noise (numerics.py). Serving must also cost less than computing
(both timed). Then, per call: fingerprint each sample's inputs; serve hits from the store by intercepting the
prefix's calls (their forwards do not run); compute misses with a prefix-only run on the missing rows (or, when
all miss, within the real call) and store them; when the prefix has just deepened, serve the shallower prefix's
entries and run only the newly frozen units.

The cache steps aside, for that call, whenever serving could differ from running: no frozen prefix, inference
mode, an input that requires grad, hooks on a module inside the prefix (or global module hooks), a prefix
module whose forward someone else replaced. It turns itself off, and says why, when the hit rate stays low.
Every internal run (analysis, prefix-only) runs without autograd, with the random number generators forked
and the user's forward hooks suspended, so the user's run sees nothing of it.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass, field

import torch

from .. import torch_private
from ..errors import CacheError, ConfigError, InputMismatchError
from ..numerics import agree, relative_difference
from ..runtime.services import FORWARD_MARK, Service
from ..torch_private import tree_flatten, tree_unflatten
from .dataflow import DataflowProbe
from .intercept import Interception, Stop, UnexpectedCall
from .store import ActivationStore, CacheConfig, _describe, fingerprints

MAX_SIGNATURES = 64  # distinct call signatures analysed per prefix before the cache stops analysing new ones
MAX_NOISE = 0.05     # relative difference between two runs of the prefix on one batch beyond which it is random
_SCALARS = (int, float, bool, str, type(None), torch.dtype, torch.device)


@dataclass
class Signature:
    """One call's arguments, reduced to what decides how the model's forward runs."""

    leaves: list
    batch: int | None            # the first tensor argument's leading size
    batch_leaves: tuple          # positions of tensor arguments whose leading size is the batch
    digest: bytes
    unsupported: str = ""        # why these arguments cannot be keyed, if they cannot

    @classmethod
    def of(cls, args, kwargs, training: bool) -> Signature:
        leaves, spec = tree_flatten((tuple(args), dict(kwargs)))
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
                h.update(f"|{i}:{leaf.dtype}:{leaf.device}:{shape}".encode())
            elif isinstance(leaf, _SCALARS):
                h.update(f"|{i}={leaf!r}".encode())
            else:
                unsupported = f"an argument of type {type(leaf).__name__} (only tensors and plain values are keyed)"
        return cls(leaves, batch, batch_leaves, h.digest(), unsupported)

    def tensors(self, positions):
        return [self.leaves[i] for i in positions]

    def shared_tensors(self):
        return [t for i, t in enumerate(self.leaves) if isinstance(t, torch.Tensor) and i not in self.batch_leaves]

    def select(self, args, kwargs, index):
        """(args, kwargs) with every batch-first tensor argument cut to rows `index`."""
        leaves, spec = tree_flatten((tuple(args), dict(kwargs)))
        for i in self.batch_leaves:
            leaves[i] = leaves[i][index.to(leaves[i].device)] if isinstance(index, torch.Tensor) else leaves[i][index]
        return tree_unflatten(leaves, spec)


@dataclass
class CallPlan:
    """How one frozen prefix is served for one call signature."""

    prefix: tuple
    cacheable: bool
    reason: str                              # why not, or how it pays
    calls: tuple = ()                        # keys of the prefix's top-level calls, in order
    templates: dict = field(default_factory=dict)  # key -> (TreeSpec, [leaf recipe])
    sample_meta: list = field(default_factory=list)  # per served per-sample tensor: (dtype, device)
    shared_count: int = 0
    compute_ms: float = 0.0
    serve_ms: float = 0.0
    noise: float = 0.0

    @property
    def last_call(self):
        return self.calls[-1]

    def needed_slots(self):
        """(key, leaf index, kind, slot) of every output the cache stores, in slot order."""
        out = []
        for key in self.calls:
            for i, recipe in enumerate(self.templates[key][1]):
                if recipe[0] in ("sample", "shared"):
                    out.append((key, i, recipe[0], recipe[1]))
        return out


def _forked_rng():
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)


def _sync(tensors):
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            torch.cuda.synchronize(t.device)
            return


class ActivationCache(Service):
    """The activation cache of one FrozenModule (see the module docstring)."""

    name = "cache"

    def __init__(self, config: CacheConfig, model: torch.nn.Module, unit_graph, weights_version):
        self.config = config
        self.model = model
        self.unit_graph = unit_graph
        self.weights_version = weights_version    # callable: prefix -> hashable version of its weights
        self.store = ActivationStore(config)
        self.prefix: tuple = ()
        self.plans: dict = {}                     # (prefix, signature digest) -> CallPlan
        self.enabled = True
        self.off_reason = ""
        self.sample_ids = None
        self.last_plan: CallPlan | None = None
        self.steps_aside: dict = {}               # reason -> calls the cache stepped aside for
        self.stats = dict(lookups=0, hits=0, reused_from_shallower=0, computed=0, stored=0, batches=0,
                          fully_served_batches=0, verified_batches=0, analysed_signatures=0)
        self._window = [0, 0]                     # lookups, hits since the last hit-rate check
        self._modules_cache: dict = {}

    # -- hook points ------------------------------------------------------------------------------------
    def on_plan(self, change, analysis) -> None:
        """Unfreezing a unit invalidates every level that contains it (its weights will change)."""
        self.prefix = tuple(change.prefix)
        frozen = set(change.frozen)
        self.store.drop(lambda prefix: not set(prefix) <= frozen)

    def on_structure_change(self) -> None:
        self.clear()

    def on_tensors_moved(self) -> None:
        self.clear()  # cached tensors belong to the old device or dtype

    def clear(self) -> None:
        self.store.drop(lambda prefix: True)
        self.plans.clear()
        self._modules_cache.clear()

    def close(self) -> None:
        self.store.close()

    @contextlib.contextmanager
    def using_sample_ids(self, ids):
        if self.config.key != "sample_id":
            raise ConfigError("sample ids are only used with CacheConfig(key='sample_id', deterministic_inputs=True)")
        self.sample_ids = torch.as_tensor(ids).reshape(-1).tolist()
        try:
            yield
        finally:
            self.sample_ids = None

    def call(self, run, args, kwargs):
        prefix = self.prefix
        why = self._step_aside(prefix, args, kwargs)
        if why:
            self.steps_aside[why] = self.steps_aside.get(why, 0) + 1
            return run(args, kwargs)
        sig = Signature.of(args, kwargs, self.model.training)
        why = sig.unsupported or ("" if sig.batch else "no batched tensor argument")
        if not why and sig.batch < 2 and (prefix, sig.digest) not in self.plans:
            why = "a batch of one sample cannot be analysed (the next larger batch will be)"
        if why:
            self.steps_aside[why] = self.steps_aside.get(why, 0) + 1
            return run(args, kwargs)
        plan = self.plans.get((prefix, sig.digest))
        if plan is None:
            if sum(p == prefix for p, _ in self.plans) >= MAX_SIGNATURES:
                why = f"more than {MAX_SIGNATURES} call signatures for this prefix"
                self.steps_aside[why] = self.steps_aside.get(why, 0) + 1
                return run(args, kwargs)
            return self._probe(prefix, sig, run, args, kwargs)
        self.last_plan = plan
        if not plan.cacheable:
            return run(args, kwargs)
        return self._serve(plan, sig, run, args, kwargs)

    # -- when to step aside -------------------------------------------------------------------------------
    def _modules(self, prefix) -> tuple:
        """(path -> module of each prefix unit, every module inside the prefix, other units' path -> module)."""
        cached = self._modules_cache.get(prefix)
        if cached is None:
            units = self.unit_graph.units
            top = {}
            for u in prefix:
                for path in self.unit_graph.paths(u):
                    top[path] = self.model.get_submodule(path)
            inside = [m for u in prefix for m in units[u].modules]
            others = {path: self.model.get_submodule(path) for u in units if u not in prefix
                      for path in self.unit_graph.paths(u)}
            cached = self._modules_cache[prefix] = (top, inside, others)
        return cached

    def _step_aside(self, prefix, args, kwargs) -> str:
        if not self.enabled:
            return "the cache is off"
        if not prefix:
            return "no frozen prefix"
        if torch.is_inference_mode_enabled():
            return "inference mode"
        if torch.compiler.is_compiling():
            return "inside torch.compile"
        leaves, _ = tree_flatten((tuple(args), dict(kwargs)))
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in leaves):
            return "an input requires grad"
        top, inside, _ = self._modules(prefix)
        if torch_private.global_module_hooks() or any(torch_private.has_call_hooks(m) for m in inside):
            return "hooks on a module inside the frozen prefix must see it run"
        for m in top.values():
            own = m.__dict__.get("forward")
            if own is not None and not getattr(own, FORWARD_MARK, False):
                return "a frozen module's forward was replaced by other code"
        return ""

    # -- internal runs ----------------------------------------------------------------------------------
    def _prefix_run(self, plan_calls, top, args, kwargs, select=None):
        """Run the model only as far as the prefix's last call, on all rows or rows `select`; returns
        key -> output for the prefix's calls. Nothing of it is visible to the user's run."""
        sig_args, sig_kwargs = args, kwargs
        if select is not None:
            sig_args, sig_kwargs = select
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            stack.enter_context(_forked_rng())
            stack.enter_context(torch_private.forward_hooks_suspended(self.model.modules()))
            ic = stack.enter_context(Interception(top, stop_after=plan_calls[-1]))
            try:
                self.model(*sig_args, **sig_kwargs)
            except Stop:
                pass
        return ic.outputs

    # -- analysis (once per prefix and signature) -------------------------------------------------------------
    def _probe(self, prefix, sig, run, args, kwargs):
        """The first call of a signature: run it for real under the dataflow probe (serving a shallower prefix's
        entries when they cover the batch), analyse, and store its outputs when the verdict is to cache."""
        top, _, others = self._modules(prefix)
        state = list(self.model.parameters()) + list(self.model.buffers())
        probe = DataflowProbe(state)
        keys = self._keys(sig)
        shallower = self._shallower_cover(prefix, sig, keys)
        served, real = None, ()
        if shallower is not None:
            other, lvl = shallower
            served = self._build(other, sig, lvl, keys, list(range(sig.batch)))
            shallow_top, _, _ = self._modules(other.prefix)
            real = [path for path in top if path not in shallow_top]
        with Interception(top, watch=probe, others=others, serve=served, real=real) as ic:
            probe.interception = ic
            with probe:
                out = run(args, kwargs)
        result = probe.result(out)
        plan = self._analyse(prefix, sig, ic, result, top, args, kwargs)
        self.plans[(prefix, sig.digest)] = plan
        self.stats["analysed_signatures"] += 1
        self.last_plan = plan
        if plan.cacheable:
            self._store_outputs(plan, sig, ic.outputs, keys)
            if shallower is not None:
                self.stats["reused_from_shallower"] += sig.batch
            else:
                self.stats["computed"] += sig.batch
        return out

    def _shallower_cover(self, prefix, sig, keys):
        """(CallPlan, level) of the deepest shallower prefix whose entries cover every row of this batch."""
        for shallower in sorted((p for p in self.store.levels if set(p) < set(prefix)), key=len, reverse=True):
            other = self.plans.get((shallower, sig.digest))
            lvl = self.store.levels.get(shallower)
            if other is None or not other.cacheable or lvl is None:
                continue
            if lvl.weights_version != self.weights_version(shallower):
                continue
            if other.shared_count and self._shared_key(sig) not in lvl.shared:
                continue
            if all(key in lvl.index for key in keys):
                return other, lvl
        return None

    def _analyse(self, prefix, sig, ic, result, top, args, kwargs) -> CallPlan:
        def no(reason):
            return CallPlan(prefix, False, reason)

        calls = tuple(k for kind, k in ic.order if kind == "prefix")
        if result.problems:
            return no(result.problems[0])
        if not calls:
            return no("the frozen prefix's modules are not called by the forward")
        last = max(i for i, (kind, _) in enumerate(ic.order) if kind == "prefix")
        first_other = next((i for i, (kind, _) in enumerate(ic.order) if kind == "other"), len(ic.order))
        if first_other < last:
            return no("a trainable unit runs before the frozen prefix's last call")
        batch = sig.batch
        first = ic.outputs
        try:
            start = time.perf_counter()
            again = self._prefix_run(calls, top, args, kwargs)
            _sync(tree_flatten(again)[0])
            compute_ms = 1000 * (time.perf_counter() - start)
            k = batch // 2
            half = self._prefix_run(calls, top, args, kwargs, select=sig.select(args, kwargs, slice(0, k)))
            perm = torch.arange(batch - 1, -1, -1)
            flipped = self._prefix_run(calls, top, args, kwargs, select=sig.select(args, kwargs, perm))
        except Exception as exc:  # noqa: BLE001 -- a prefix that cannot run on part of a batch is not cached
            return no(f"the frozen prefix cannot run on part of the batch ({type(exc).__name__}: {exc})"[:300])
        if any(key not in run_out for key in calls for run_out in (again, half, flipped)):
            return no("the frozen prefix makes other calls on part of the batch (data-dependent control flow)")
        noise = 0.0  # of the prefix run twice on the same batch: the tolerance of every comparison below
        for key, i in result.needed:
            a, b = tree_flatten(again[key])[0][i], tree_flatten(first[key])[0][i]
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                noise = max(noise, relative_difference(a, b))
        if noise > MAX_NOISE:
            return no(f"the frozen prefix is not deterministic (two runs on the same batch differ by "
                      f"{100 * noise:.1f}%)")
        templates, sample_meta, shared_count = {}, [], 0
        for key in calls:
            leaves, spec = tree_flatten(first[key])
            other = [tree_flatten(o[key])[0] for o in (again, half, flipped)]
            if any(len(o) != len(leaves) for o in other):
                return no(f"the output of {key[0]} changes structure with the batch")
            recipes = []
            for i, f in enumerate(leaves):
                a, h, p = (o[i] for o in other)
                needed = (key, i) in result.needed
                if isinstance(f, torch.Tensor):
                    same_shape = h.shape == f.shape and p.shape == f.shape
                    batch_first = f.dim() > 0 and f.shape[0] == batch and h.shape[0] == k and p.shape[0] == batch
                    if not needed:
                        if batch_first:
                            recipes.append(("empty", f.dtype, f.device, tuple(f.shape[1:]), True))
                        elif same_shape:
                            recipes.append(("empty", f.dtype, f.device, tuple(f.shape), False))
                        else:
                            return no(f"an output of {key[0]} has a shape that follows the batch in an unknown way")
                    elif same_shape and agree(h, f, noise) and agree(p, f, noise):
                        recipes.append(("shared", shared_count))
                        shared_count += 1
                    elif batch_first:
                        if not (agree(f[:k], h, noise) and agree(f[perm], p, noise)):
                            return no(f"an output of {key[0]} mixes samples across the batch (a sample's output "
                                      "depends on the others, e.g. BatchNorm on batch statistics)")
                        recipes.append(("sample", len(sample_meta)))
                        sample_meta.append((f.dtype, f.device))
                    else:
                        return no(f"an output of {key[0]} (shape {tuple(f.shape)}) is not batch-first")
                elif isinstance(f, int) and not isinstance(f, bool) and f == batch and h == k and p == batch:
                    recipes.append(("batch_size",))
                elif isinstance(f, _SCALARS) and f == a == h == p:
                    recipes.append(("const", f))
                else:
                    return no(f"an output of {key[0]} ({type(f).__name__}) depends on the batch in an unknown way")
            templates[key] = (spec, recipes)
        plan = CallPlan(prefix, True, "", calls, templates, sample_meta, shared_count, compute_ms=compute_ms,
                        noise=noise)
        plan.serve_ms = self._serve_cost(plan, sig, first)
        if self.config.check_cost and plan.serve_ms >= plan.compute_ms:
            plan.cacheable = False
            plan.reason = (f"does not pay: serving a batch from the cache takes {plan.serve_ms:.2f} ms, computing "
                           f"the frozen prefix {plan.compute_ms:.2f} ms")
        else:
            plan.reason = f"pays: {plan.compute_ms:.2f} ms to compute vs {plan.serve_ms:.2f} ms to serve a batch"
        return plan

    def _serve_cost(self, plan, sig, outputs) -> float:
        """Best of three: fingerprinting the batch and a store round trip of its per-sample outputs."""
        scratch = ActivationStore(CacheConfig(memory_bytes=1 << 40, storage_dtype=self.config.storage_dtype,
                                              device=self.config.device))
        samples = self._samples_of(plan, outputs)
        best = float("inf")
        for i in range(3):
            start = time.perf_counter()
            keys = self._keys(sig)
            lvl = scratch.level(("scratch", i), 0)
            scratch.put(lvl, keys, samples)
            dest = [torch.empty_like(o) for o in samples]
            scratch.get(lvl, keys, range(len(keys)), dest)
            _sync(dest)
            best = min(best, time.perf_counter() - start)
        scratch.close()
        return 1000 * best

    # -- keys and entries -----------------------------------------------------------------------------------
    def _keys(self, sig) -> list:
        if self.config.key == "sample_id":
            if self.sample_ids is None:
                raise ConfigError("CacheConfig(key='sample_id'): call the model inside `with fm.sample_ids(ids):`")
            if len(self.sample_ids) != sig.batch:
                raise InputMismatchError(f"{len(self.sample_ids)} sample ids for a batch of {sig.batch}")
            return [hashlib.blake2b(sig.digest + int(i).to_bytes(8, "little", signed=True), digest_size=16).digest()
                    for i in self.sample_ids]
        return fingerprints(sig.tensors(sig.batch_leaves), [sig.digest] + sig.shared_tensors())

    def _shared_key(self, sig) -> bytes:
        h = hashlib.blake2b(sig.digest, digest_size=16)
        for t in sig.shared_tensors():
            h.update(_describe(t))
        return h.digest()

    @staticmethod
    def _samples_of(plan, outputs):
        """The per-sample tensors among the prefix calls' outputs, in slot order."""
        out = []
        for key, i, kind, _ in plan.needed_slots():
            if kind == "sample":
                out.append(tree_flatten(outputs[key])[0][i])
        return out

    @staticmethod
    def _shared_of(plan, outputs):
        out = []
        for key, i, kind, _ in plan.needed_slots():
            if kind == "shared":
                out.append(tree_flatten(outputs[key])[0][i].detach().clone())
        return out

    def _store_outputs(self, plan, sig, outputs, keys, rows_keys=None):
        """Store the needed outputs of a real run (`outputs`: key -> output over the batch's rows `rows_keys`)."""
        keys = keys if keys is not None else self._keys(sig)
        lvl = self.store.level(plan.prefix, self.weights_version(plan.prefix))
        if plan.shared_count:
            lvl.shared.setdefault(self._shared_key(sig), self._shared_of(plan, outputs))
        older = [p for p in self.store.levels if p != plan.prefix]
        samples = [s.detach() for s in self._samples_of(plan, outputs)]
        self.stats["stored"] += self.store.put(lvl, rows_keys if rows_keys is not None else keys, samples,
                                               evictable=older)

    def _build(self, plan, sig, lvl, keys, hit_rows, fresh=None, miss_rows=None):
        """key -> output of every prefix call, from the store (rows `hit_rows`) and from `fresh` outputs of a
        prefix-only run (rows `miss_rows`)."""
        batch = sig.batch
        sig0 = lvl.index[keys[hit_rows[0]]][0] if hit_rows else None
        shapes = lvl.groups[sig0].sample_shapes if sig0 is not None else [
            tuple(s.shape[1:]) for s in self._samples_of(plan, fresh)]
        samples = [torch.empty((batch,) + tuple(shape), dtype=dtype, device=device)
                   for shape, (dtype, device) in zip(shapes, plan.sample_meta)]
        if hit_rows:
            self.store.get(lvl, [keys[r] for r in hit_rows], hit_rows, samples)
        if miss_rows:
            index = torch.tensor(miss_rows)
            for dst, src in zip(samples, self._samples_of(plan, fresh)):
                dst.index_copy_(0, index.to(dst.device), src.to(dst.dtype))
        shared = lvl.shared.get(self._shared_key(sig), ()) if plan.shared_count else ()
        served = {}
        for key in plan.calls:
            spec, recipes = plan.templates[key]
            leaves = []
            for recipe in recipes:
                kind = recipe[0]
                if kind == "sample":
                    leaves.append(samples[recipe[1]])
                elif kind == "shared":
                    leaves.append(shared[recipe[1]].clone())
                elif kind == "batch_size":
                    leaves.append(batch)
                elif kind == "const":
                    leaves.append(recipe[1])
                else:  # a stand-in nothing reads: right shape, dtype and device, no memory
                    _, dtype, device, shape, batch_first = recipe
                    full = (batch,) + shape if batch_first else shape
                    leaves.append(torch.empty((), dtype=dtype, device=device).expand(full))
            served[key] = tree_unflatten(leaves, spec)
        return served

    # -- serving ------------------------------------------------------------------------------------------
    def _serve(self, plan, sig, run, args, kwargs):
        top, _, _ = self._modules(plan.prefix)
        batch = sig.batch
        lvl = self.store.level(plan.prefix, self.weights_version(plan.prefix))
        keys = self._keys(sig)
        shared_ready = not plan.shared_count or self._shared_key(sig) in lvl.shared
        hit_rows = [r for r, key in enumerate(keys) if key in lvl.index] if shared_ready else []
        hit_set = set(hit_rows)
        miss_rows = [r for r in range(batch) if r not in hit_set]
        self.stats["lookups"] += batch
        self.stats["hits"] += len(hit_rows)
        self.stats["batches"] += 1
        self._window[0] += batch
        self._window[1] += len(hit_rows)
        if not hit_rows:
            out = self._serve_from_shallower(plan, sig, run, args, kwargs, keys)
            if out is None:
                with Interception(top) as ic:
                    out = run(args, kwargs)
                self._store_outputs(plan, sig, ic.outputs, keys)
                self.stats["computed"] += batch
            served = None
        else:
            fresh = None
            if miss_rows:
                index = torch.tensor(miss_rows)
                fresh = self._prefix_run(plan.calls, top, args, kwargs, select=sig.select(args, kwargs, index))
                self._store_outputs(plan, sig, fresh, keys, rows_keys=[keys[r] for r in miss_rows])
                self.stats["computed"] += len(miss_rows)
            else:
                self.stats["fully_served_batches"] += 1
            served = self._build(plan, sig, lvl, keys, hit_rows, fresh, miss_rows)
            out, _ = self._run_served(top, served, run, args, kwargs)
        if self.config.verify and served is not None:
            self._verify(plan, top, served, args, kwargs)
        self._check_hit_rate()
        return out

    @staticmethod
    def _run_served(top, served, run, args, kwargs, real=()):
        try:
            with Interception(top, serve=served, real=real) as ic:
                out = run(args, kwargs)
        except UnexpectedCall as exc:
            raise CacheError(
                f"the model called {exc.args[0][0]} (call {exc.args[0][1]}) where the activation cache had seen "
                "other calls for the same arguments (control flow that depends on values). Call optimize() "
                "without cache=, or freeze a prefix without such code.") from None
        return out, ic

    def _serve_from_shallower(self, plan, sig, run, args, kwargs, keys):
        """When every row is cached for a shallower prefix: serve it, run only the newly frozen units, and
        store this prefix's outputs. Returns None when no shallower prefix has them all."""
        shallower = self._shallower_cover(plan.prefix, sig, keys)
        if shallower is None:
            return None
        other, lvl = shallower
        served = self._build(other, sig, lvl, keys, list(range(sig.batch)))
        top, _, _ = self._modules(plan.prefix)
        shallow_top, _, _ = self._modules(other.prefix)
        newly = [path for path in top if path not in shallow_top]
        out, ic = self._run_served(top, served, run, args, kwargs, real=newly)
        self._store_outputs(plan, sig, ic.outputs, keys)
        self.stats["reused_from_shallower"] += sig.batch
        return out

    def _verify(self, plan, top, served, args, kwargs):
        expected = self._prefix_run(plan.calls, top, args, kwargs)
        tolerant = self.config.storage_dtype is not None
        for key, i, _, _ in plan.needed_slots():
            e = tree_flatten(expected[key])[0][i]
            got = tree_flatten(served[key])[0][i]
            ok = (torch.allclose(e, got.to(e.dtype), rtol=1e-2, atol=1e-2) if tolerant
                  else agree(got, e, plan.noise))
            if not ok:
                raise CacheError(f"the activation cache served a value of {key[0]} that differs from recomputing it")
        self.stats["verified_batches"] += 1

    def _check_hit_rate(self):
        lookups, hits = self._window
        size = self.config.dataset_size
        full = any(lvl.full for lvl in self.store.levels.values())
        due = (full and lookups >= 1024) or (size is not None and self.stats["lookups"] >= 2 * size
                                               and lookups >= size)
        if not due:
            return
        self._window = [0, 0]
        if hits / lookups < self.config.min_hit_rate:
            self.enabled = False
            why = "the store is full" if full else f"after {self.stats['lookups']} lookups"
            self.off_reason = (f"hit rate {100 * hits / lookups:.1f}% over the last {lookups} samples is below "
                               f"{100 * self.config.min_hit_rate:.0f}% ({why}); inputs rarely repeat (random "
                               "augmentation?)")
            self.store.close()

    # -- filling ahead of time -----------------------------------------------------------------------------
    def warm(self, batches, training: bool, progress: bool = True) -> int:
        """Fill the cache for the current prefix from batches (each a tensor, a tuple of positional arguments, or
        a dict of keyword arguments), running only the frozen prefix. Returns the number of samples looked at."""
        from tqdm.auto import tqdm

        prefix = self.prefix
        if not prefix:
            raise ConfigError("warm_cache needs a frozen prefix")
        top, _, _ = self._modules(prefix)
        seen = 0
        total = len(batches) if hasattr(batches, "__len__") else None
        for batch in tqdm(batches, total=total, desc="filling activation cache", unit="batch", disable=not progress):
            args, kwargs = ((), batch) if isinstance(batch, dict) else ((batch,), {}) if isinstance(
                batch, torch.Tensor) else (tuple(batch), {})
            sig = Signature.of(args, kwargs, training)
            if sig.unsupported or not sig.batch:
                continue
            plan = self.plans.get((prefix, sig.digest))
            if plan is None:
                self._dry_probe(prefix, sig, args, kwargs)
                seen += sig.batch
                continue
            if not plan.cacheable:
                raise ConfigError(f"the current prefix is not cached: {plan.reason}")
            outputs = self._prefix_run(plan.calls, top, args, kwargs)
            self._store_outputs(plan, sig, outputs, None)
            seen += sig.batch
        return seen

    def _dry_probe(self, prefix, sig, args, kwargs):
        """The analysis run of `warm`: the whole model without autograd, leaving no trace (RNG forked, buffers
        restored, hooks suspended)."""
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        with torch.no_grad(), _forked_rng(), torch_private.forward_hooks_suspended(self.model.modules()):
            try:
                self._probe(prefix, sig, lambda a, k: self.model(*a, **k), args, kwargs)
            finally:
                for b, saved in buffers:
                    if not torch.equal(b, saved):  # (copying unchanged ones would bump their version counters)
                        b.copy_(saved)

    # -- report ------------------------------------------------------------------------------------------
    def report(self, prefix=None) -> dict:
        prefix = self.prefix if prefix is None else tuple(prefix)
        plan = self.last_plan if self.last_plan is not None and self.last_plan.prefix == prefix else None
        s = dict(self.stats)
        verdicts = [p for (pfx, _), p in self.plans.items() if pfx == prefix]
        return {
            "enabled": self.enabled,
            "decision": (self.off_reason if not self.enabled else
                         "no frozen prefix" if not prefix else
                         "not analysed yet" if plan is None else
                         ("on: " if plan.cacheable else "off: ") + plan.reason),
            "signatures": len(verdicts),
            "cacheable_signatures": sum(p.cacheable for p in verdicts),
            "served_calls": sorted({key[0] for p in verdicts if p.cacheable for key, _, _, _ in p.needed_slots()}),
            "steps_aside": dict(self.steps_aside),
            "hit_rate": s["hits"] / s["lookups"] if s["lookups"] else 0.0,
            "entries": self.store.entries(),
            "bytes_in_memory": self.store.memory_used,
            "bytes_on_disk": self.store.disk_used,
            "spill_files": self.store.spill_files,
            "levels": [list(p) for p in self.store.levels],
            **s,
        }
