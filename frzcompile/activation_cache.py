"""The activation cache: serve the frozen prefix's frontier tensors from the store instead of computing them.

Per frozen prefix the cache first checks, once, on the example batch, that caching is *sound* (every frontier
tensor is batch-first and each sample's output depends only on that sample: subsets and permutations of the
batch give the same rows, repeated runs give the same values) and that it *pays* (fingerprinting and copying a
batch costs less than computing the prefix, both timed here). Then, per batch: fingerprint each sample's input,
serve hits from the store, compute misses (from the deepest cached shallower prefix when there is one: only the
newly frozen units run), store them, and hand the batch on. It turns itself off, and says why, when the hit rate
stays low.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass, field

import torch
from torch import fx

from .activation_store import ActivationStore, CacheConfig, _describe, fingerprints


class _Stop(Exception):
    pass


def region_example_args(gm: fx.GraphModule, region: torch.nn.Module, args, kwargs):
    """The arguments `region` receives when `gm` runs on (args, kwargs); nothing after the region runs."""
    captured = {}

    def grab(module, inputs):
        captured["args"] = inputs
        raise _Stop

    handle = region.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            gm(*args, **kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "args" not in captured:
        raise RuntimeError("the frozen region did not run on the example inputs")
    return captured["args"]


def _as_list(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _same(a, b, exact=False) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        return torch.equal(a, b) if exact or not a.is_floating_point() else torch.allclose(a, b, rtol=1e-4,
                                                                                         atol=1e-5)
    return type(a) is type(b) and a == b


@dataclass
class LevelPlan:
    """What the cache knows about one frozen prefix."""

    prefix: tuple
    cacheable: bool
    reason: str                           # why not, or how it pays
    input_names: tuple = ()               # region arguments (node names of the main graph)
    output_names: tuple = ()              # region outputs (frontier node names)
    batch_args: tuple = ()                # positions of per-sample arguments
    output_kinds: tuple = ()              # per output: "sample" (batch-first tensor), "shared" (batch-independent
                                          # tensor), "batch_size", or ("const", value)
    output_dtypes: tuple = ()
    compute_ms: float = 0.0
    serve_ms: float = 0.0
    deltas: dict = field(default_factory=dict)  # shallower prefix -> GraphModule computing this frontier from it


class ActivationCache:
    def __init__(self, config: CacheConfig, weights_version):
        self.config = config
        self.store = ActivationStore(config)
        self.weights_version = weights_version    # callable: prefix -> hashable version of its weights
        self.plans: dict = {}                     # prefix -> LevelPlan
        self.enabled = True
        self.off_reason = ""
        self.sample_ids = None
        self.stats = dict(lookups=0, hits=0, reused_from_shallower=0, computed=0, stored=0, batches=0,
                          fully_served_batches=0, verified_batches=0)
        self._window = [0, 0]                     # lookups, hits since the last hit-rate check

    # -- plan changes ----------------------------------------------------------------------------------
    def on_plan_change(self, frozen) -> None:
        """Unfreezing a unit invalidates every level that contains it (its weights will change). The analysis
        of a prefix (`plans`) depends on the graph only, and stays."""
        frozen = set(frozen)
        self.store.drop(lambda prefix: not set(prefix) <= frozen)

    def clear(self) -> None:
        self.store.drop(lambda prefix: True)
        self.plans.clear()

    @contextlib.contextmanager
    def using_sample_ids(self, ids):
        if self.config.key != "sample_id":
            raise ValueError("sample ids are only used with CacheConfig(key='sample_id', deterministic_inputs=True)")
        self.sample_ids = torch.as_tensor(ids).reshape(-1).tolist()
        try:
            yield
        finally:
            self.sample_ids = None

    # -- analysis (once per prefix) -------------------------------------------------------------------------
    def prepare(self, prefix, region, region_graph, example_args, input_names, output_names, node_unit):
        """The analysis of `prefix`, made once; `example_args()` gives the region's arguments on the example."""
        prefix = tuple(prefix)
        if prefix in self.plans:
            return self.plans[prefix]
        plan = self._analyze(prefix, region, list(example_args()), tuple(input_names), tuple(output_names))
        if plan.cacheable:
            for shallower, other in self.plans.items():
                if other.cacheable and set(shallower) < set(prefix) and set(other.input_names) <= set(input_names):
                    delta = _build_delta(region_graph, other.output_names, shallower, node_unit)
                    if delta is not None:
                        plan.deltas[shallower] = delta
        self.plans[prefix] = plan
        return plan

    def _analyze(self, prefix, region, args, input_names, output_names) -> LevelPlan:
        def no(reason):
            return LevelPlan(prefix, False, reason, input_names, output_names)

        tensors = [a for a in args if isinstance(a, torch.Tensor) and a.dim() > 0]
        if not tensors:
            return no("the frozen prefix reads no batched tensor")
        batch = tensors[0].shape[0]
        if batch < 2:
            return no("the example batch has one sample: per-sample independence cannot be checked")
        batch_args = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.dim() > 0
                           and a.shape[0] == batch)
        k = batch // 2
        perm = torch.arange(batch - 1, -1, -1)

        def run(select):
            call = [a[select] if i in batch_args else a for i, a in enumerate(args)]
            return _as_list(region(*call))

        full = run(slice(None))
        again = run(slice(None))
        if not all(_same(a, b, exact=True) for a, b in zip(full, again)):
            return no("the frozen prefix is not deterministic (two runs on the same batch differ)")
        half, flipped = run(slice(0, k)), run(perm)
        kinds, dtypes = [], []
        for name, f, h, p in zip(output_names, full, half, flipped):
            if isinstance(f, torch.Tensor) and _same(f, h, exact=True) and _same(f, p, exact=True):
                kinds.append("shared")  # the same whatever the batch holds (e.g. a causal mask)
                dtypes.append(f.dtype)
            elif isinstance(f, torch.Tensor):
                if f.dim() == 0 or f.shape[0] != batch or h.shape[0] != k:
                    return no(f"frontier tensor {name} is not batch-first (shape {tuple(f.shape)})")
                if not _same(f[:k], h) or not _same(f[perm], p):
                    return no(f"frontier tensor {name} mixes samples across the batch (a sample's output "
                              "depends on the others, e.g. BatchNorm on batch statistics)")
                kinds.append("sample")
                dtypes.append(f.dtype)
            elif isinstance(f, int) and f == batch and h == k:
                kinds.append("batch_size")
                dtypes.append(None)
            elif _same(f, h) and _same(f, p):
                kinds.append(("const", f))
                dtypes.append(None)
            else:
                return no(f"frontier value {name} ({type(f).__name__}) depends on the batch in an unknown way")
        plan = LevelPlan(prefix, True, "", input_names, output_names, batch_args, tuple(kinds), tuple(dtypes))
        plan.compute_ms, plan.serve_ms = self._time(region, args, full, plan)
        if self.config.check_cost and plan.serve_ms >= plan.compute_ms:
            plan.cacheable = False
            plan.reason = (f"does not pay: serving a batch from the cache takes {plan.serve_ms:.2f} ms, computing "
                           f"the frozen prefix {plan.compute_ms:.2f} ms")
        else:
            plan.reason = f"pays: {plan.compute_ms:.2f} ms to compute vs {plan.serve_ms:.2f} ms to serve a batch"
        return plan

    def _time(self, region, args, outputs, plan):
        """Best of three: the prefix on the batch, and fingerprinting plus a store round trip of its outputs."""
        scratch = ActivationStore(CacheConfig(memory_bytes=1 << 40, storage_dtype=self.config.storage_dtype,
                                              device=self.config.device))
        samples = [o for o, kind in zip(outputs, plan.output_kinds) if kind == "sample"]
        compute, serve = [], []
        for i in range(3):
            start = time.perf_counter()
            region(*args)
            compute.append(time.perf_counter() - start)
            start = time.perf_counter()
            keys = self._keys(plan, args)
            lvl = scratch.level(("scratch", i), 0)
            scratch.put(lvl, keys, samples)
            dest = [torch.empty_like(o) for o in samples]
            scratch.get(lvl, keys, range(len(keys)), dest)
            serve.append(time.perf_counter() - start)
        scratch.close()
        return 1000 * min(compute), 1000 * min(serve)

    # -- serving ---------------------------------------------------------------------------------------
    def _keys(self, plan, args):
        if self.config.key == "sample_id":
            if self.sample_ids is None:
                raise ValueError("CacheConfig(key='sample_id'): call the model inside `with fm.sample_ids(ids):`")
            return [int(i).to_bytes(8, "little", signed=True) for i in self.sample_ids]
        batch = [args[i] for i in plan.batch_args]
        shared = [a for i, a in enumerate(args) if i not in plan.batch_args]
        return fingerprints(batch, shared)

    def _shared_key(self, plan, args) -> bytes:
        """Identifies what batch-independent outputs depend on: per-sample shapes and the batch-wide inputs."""
        h = hashlib.blake2b(digest_size=16)
        for i, a in enumerate(args):
            h.update(f"{a.dtype}{tuple(a.shape[1:])}".encode() if i in plan.batch_args else _describe(a))
        return h.digest()

    @staticmethod
    def _split(plan, out):
        samples = [o for o, kind in zip(out, plan.output_kinds) if kind == "sample"]
        shared = [o for o, kind in zip(out, plan.output_kinds) if kind == "shared"]
        return samples, shared

    @staticmethod
    def _join(plan, samples, shared, batch_size):
        """The region's outputs from per-sample tensors, batch-independent tensors and the batch size."""
        samples, shared = iter(samples), iter(shared)
        return [next(samples) if kind == "sample" else next(shared) if kind == "shared" else
                batch_size if kind == "batch_size" else kind[1] for kind in plan.output_kinds]

    def serve(self, plan: LevelPlan, region, args):
        batch_size = args[plan.batch_args[0]].shape[0]
        if any(args[i].shape[0] != batch_size for i in plan.batch_args):
            return region(*args)  # a call shaped unlike the example: compute, do not cache
        lvl = self.store.level(plan.prefix, self.weights_version(plan.prefix))
        keys = self._keys(plan, args)
        if len(keys) != batch_size:
            raise ValueError(f"{len(keys)} sample ids for a batch of {batch_size}")
        shared_key = self._shared_key(plan, args)
        hit_rows = [r for r, k in enumerate(keys) if k in lvl.index]
        if "shared" in plan.output_kinds and shared_key not in lvl.shared:
            hit_rows = []  # batch-independent outputs for these shapes were never stored: compute all
        hit_set = set(hit_rows)
        miss_rows = [r for r in range(batch_size) if r not in hit_set]
        self.stats["lookups"] += batch_size
        self.stats["hits"] += len(hit_rows)
        self.stats["batches"] += 1
        self._window[0] += batch_size
        self._window[1] += len(hit_rows)
        computed = self._compute(plan, region, args, keys, shared_key, miss_rows, lvl) if miss_rows else None
        if not hit_rows:
            result = computed
        else:
            self.stats["fully_served_batches"] += not miss_rows
            samples = self._empty_samples(plan, lvl, keys[hit_rows[0]], batch_size, args)
            self.store.get(lvl, [keys[r] for r in hit_rows], hit_rows, samples)
            if miss_rows:
                index = torch.tensor(miss_rows)
                for dst, src in zip(samples, self._split(plan, computed)[0]):
                    dst.index_copy_(0, index.to(dst.device), src.to(dst.dtype))
            result = self._join(plan, samples, lvl.shared.get(shared_key, ()), batch_size)
        if self.config.verify:
            self._verify(region, args, result)
        self._check_hit_rate()
        return result[0] if len(result) == 1 and len(plan.output_names) == 1 else tuple(result)

    def _compute(self, plan, region, args, keys, shared_key, rows, lvl):
        """Outputs for the samples at `rows` (all of them when every row missed), stored as they come."""
        everything = len(rows) == args[plan.batch_args[0]].shape[0]
        index = torch.tensor(rows)
        sub = list(args) if everything else [
            a.index_select(0, index.to(a.device)) if i in plan.batch_args else a for i, a in enumerate(args)]
        sub_keys = [keys[r] for r in rows]
        out = self._from_shallower(plan, sub, sub_keys)
        if out is None:
            out = _as_list(region(*sub))
            self.stats["computed"] += len(rows)
        samples, shared = self._split(plan, out)
        if shared and shared_key not in lvl.shared:
            lvl.shared[shared_key] = shared
        older = [p for p in self.store.levels if p != plan.prefix]
        self.stats["stored"] += self.store.put(lvl, sub_keys, samples, evictable=older)
        return out

    def _from_shallower(self, plan, sub_args, sub_keys):
        """Run only the newly frozen units, on frontier tensors cached for a shallower prefix."""
        for shallower in sorted(plan.deltas, key=len, reverse=True):
            other = self.plans.get(shallower)
            lvl = self.store.levels.get(shallower)
            if other is None or lvl is None or lvl.weights_version != self.weights_version(shallower):
                continue
            by_name = dict(zip(plan.input_names, sub_args))
            other_args = [by_name[n] for n in other.input_names]
            same_inputs = self.config.key == "sample_id" or other.input_names == plan.input_names
            keys = sub_keys if same_inputs else self._keys(other, other_args)  # hash each input once
            shared = lvl.shared.get(self._shared_key(other, other_args), ())
            if not keys or not all(k in lvl.index for k in keys) or len(shared) != other.output_kinds.count("shared"):
                continue
            samples = self._empty_samples(other, lvl, keys[0], len(keys), other_args)
            self.store.get(lvl, keys, range(len(keys)), samples)
            with torch.no_grad():
                out = _as_list(plan.deltas[shallower](*sub_args, *self._join(other, samples, shared, len(keys))))
            self.stats["reused_from_shallower"] += len(keys)
            return out
        return None

    def _empty_samples(self, plan, lvl, key, n, args):
        sig, _ = lvl.index[key]
        group = lvl.groups[sig]
        device = args[plan.batch_args[0]].device
        dtypes = [d for d, kind in zip(plan.output_dtypes, plan.output_kinds) if kind == "sample"]
        return [torch.empty((n,) + s, dtype=d, device=device) for s, d in zip(group.sample_shapes, dtypes)]

    def _verify(self, region, args, result):
        expected = _as_list(region(*args))
        tolerant = self.config.storage_dtype is not None
        for e, got in zip(expected, result):
            if isinstance(e, torch.Tensor) and not (
                torch.allclose(e, got, rtol=1e-2, atol=1e-2) if tolerant else _same(e, got)
            ):
                raise RuntimeError("activation cache served a value that differs from recomputing it")
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

    # -- report ------------------------------------------------------------------------------------------
    def report(self, prefix) -> dict:
        plan = self.plans.get(tuple(prefix))
        s = dict(self.stats)
        return {
            "enabled": self.enabled,
            "decision": (self.off_reason if not self.enabled else
                         "no frozen prefix" if not prefix else
                         "not analysed yet" if plan is None else
                         ("on: " if plan.cacheable else "off: ") + plan.reason),
            "hit_rate": s["hits"] / s["lookups"] if s["lookups"] else 0.0,
            "entries": self.store.entries(),
            "bytes_in_memory": self.store.memory_used,
            "bytes_on_disk": self.store.disk_used,
            "spill_files": self.store.spill_files,
            "levels": [list(p) for p in self.store.levels],
            **s,
        }


def _build_delta(region_graph: fx.GraphModule, shallow_outputs, shallow_prefix, node_unit):
    """From the region of a deeper prefix, the graph that starts at the shallower prefix's frontier: its
    frontier nodes become placeholders (after the region's own) and the shallower units' nodes are removed."""
    from .capture import clone_graph_module

    gm = clone_graph_module(region_graph)
    graph = gm.graph
    by_name = {n.name: n for n in graph.nodes}
    shallow = set(shallow_prefix)
    if any(name not in by_name for name in shallow_outputs):
        return None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    new = []
    for name in shallow_outputs:  # after the region's own placeholders, in order: the call appends them
        anchor = new[-1][1] if new else (placeholders[-1] if placeholders else None)
        with graph.inserting_after(anchor) if anchor is not None else graph.inserting_before(None):
            new.append((name, graph.placeholder(f"cached_{name}")))
    for name, ph in new:
        by_name[name].replace_all_uses_with(ph)
    for node in reversed(list(graph.nodes)):
        if node.op not in ("placeholder", "output") and node_unit.get(node.name) in shallow:
            if node.users:
                return None
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm
