"""The activation cache: serve the frozen prefix's outputs from the store instead of computing them, inside the
model's own forward.

Per frozen prefix and per call signature (the structure of the arguments, per-sample shapes and dtypes, non-tensor
arguments, train/eval, autocast, and the plain attributes of the prefix's modules and of the modules around it,
which may switch its code paths), the first call runs the model for real under a dataflow probe (dataflow.py),
which finds the prefix outputs the rest of the model reads and what would make serving unfaithful. The prefix is
then run alone (intercept.py: the run stops after the prefix's last call) on the same batch again, on its first and
second halves and reversed (two of those runs timed): each stored output must be either the same whatever the batch
holds ("shared", e.g. an attention mask of these shapes) or batch-first with each sample's rows depending on that
sample alone ("sample"), within the measured numerical noise (numerics.py), and a batch stored once and served once
must cost less than computing it twice (computing, serving and storing are timed: `pays_back`; on CPU the check is
made again with times measured inside the run: `_judge_live`). Then, per call: fingerprint each sample's inputs;
serve hits from the store by intercepting the prefix's calls (their forwards do not run); compute misses with a
prefix-only run on the missing rows (or, when all or most miss or that would cost more than computing the batch
whole, `partial_pays`, within the real call) and store them; when the prefix has just deepened, serve a shallower
prefix's entries (for a batch it holds at least half of, its other rows computed and stored at its level, when that
pays) and run only the newly frozen units, and store the deeper prefix's outputs (at once by default, or once it
has held for `CacheConfig.store_deeper_after` epochs).

Entries are tied to the state the prefix reads (its units' parameters and buffers, and any other parameter or
buffer the probe saw read before the prefix ends): replaced, changed in place, moved or cast, they are dropped.

The cache steps aside, for that call, whenever serving could differ from running: no frozen prefix, inference
mode, an input that requires grad, forward hooks on any module that is not inside a trainable unit (the prefix,
its parents, the code between units) or global module hooks, a prefix module whose forward someone else
replaced. It turns itself off, and says why, when the hit rate stays low. Every internal run (analysis,
prefix-only) runs without autograd, with the random number generators forked and the user's forward hooks
suspended, and stops before any trainable unit, so the user's run sees nothing of it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import statistics
import time
from dataclasses import dataclass, field

import torch

from .. import torch_private
from ..capture import traceless
from ..errors import CacheError, ConfigError, InputMismatchError
from ..numerics import agree, floor, relative_difference
from ..runtime.services import FORWARD_MARK, Service
from ..torch_private import tree_flatten, tree_unflatten
from .batch_dims import OTHER_OPERATIONS, OpRecorder, batch_mixing
from .dataflow import DataflowProbe
from .intercept import Interception, Stop, UnexpectedCall
from .key import SCALARS, PythonState, Signature, content_digest, layout
from .plan import LIVE_BATCHES, CallPlan, partial_pays, pays_back
from .store import ActivationStore, CacheConfig, fingerprints

MAX_SIGNATURES = 64  # distinct call signatures analysed per prefix before the cache stops analysing new ones
MIN_ANALYSED_BATCH = 4  # a refusal from a smaller batch (single-sample halves) is not kept: _not_analysable
# a batch of one is never served: code may take another path for it (`.squeeze()`, `if x.shape[0] == 1`), which
# the analysis of larger batches and their halves does not see, and it has no halves to analyse
ONE_SAMPLE = "a batch of one sample (single samples may take other code paths, which no analysis of a larger batch sees)"
MIN_LIVE_STORED = 3  # stored batches the check needs once LIVE_BATCHES were served (a small data set has few)
MAX_STATE_CHANGES = 16  # re-analyses of one signature after the Python state changed, before giving up on it
MIN_EPOCH_BATCH = 32  # the first batch of this many or more that a level holds whole tells the epoch (_learn_epoch)
OTHER_OPERATIONS_TRIES = 3  # batches of one signature analysed before "other operations on half" is final
MIN_PARTIAL_COVER = 0.5  # a level serves a batch in part (its own, or a deeper prefix's) when it holds this share
# modules whose forward takes a fused fast path unless a TorchFunctionMode (the dataflow probe) is active: what the
# probe's call computes differs from later calls in the last bits, so it is not stored
FAST_PATH_MODULES = (torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer)


def _buffer_slots(modules: dict) -> dict:
    """(module path, buffer name) -> the tensor in that slot, for these modules."""
    return {(path, name): b for path, m in modules.items() for name, b in m._buffers.items()}


def _sync(tensors):
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            torch.cuda.synchronize(t.device)
            return


def _alloc(shape, dtype, device, order) -> torch.Tensor:
    """An empty tensor of `shape` laid out in memory in dimension order `order`."""
    physical = torch.empty([shape[d] for d in order], dtype=dtype, device=device)
    inverse = [order.index(d) for d in range(len(order))]
    return physical.permute(inverse)


@dataclass
class PrefixModules:
    """The modules that matter for serving one frozen prefix."""

    top: dict          # path -> module of each prefix unit (their calls are intercepted)
    guarded: dict      # path -> every module but those inside trainable units: hooks on them must see each call
    others: dict       # path -> module of the other units (prefix-only runs stop before them)
    state: PythonState  # the Python state of the guarded modules
    token: tuple = ()  # the guarded modules, parameters and buffers, by identity (on_structure_change)
    generators: list = field(default_factory=list)  # the model's own random number generators, when this was built
    gone: tuple = ()   # the prefix units' paths that no longer name a module (deleted after optimize())


class ActivationCache(Service):
    """The activation cache of one FrozenModule (see the module docstring)."""

    name = "cache"

    def __init__(self, config: CacheConfig, model: torch.nn.Module, unit_graph, plan, recorded: bool = False,
                 self_compiling=()):
        self.config = config
        self.model = model
        self.unit_graph = unit_graph
        self.recorded = recorded                  # captured by recording one call: ruled out (_ruled_out)
        self.self_compiling = tuple(self_compiling)  # torch.cond and the like in the captured graph: ruled out
        self.plan = plan                          # the FreezePlan: state_version, state_tensors
        self._digests: dict = {}                  # (prefix, extra count) -> content digest, for this call only
        self.store = ActivationStore(config)
        self.prefix: tuple = ()
        self.plans: dict = {}                     # (prefix, signature digest) -> CallPlan
        self.extra_state: dict = {}               # prefix -> (owner, kind, name) of the parameters and buffers
                                                  # its calls read (_watch)
        self.enabled = True
        self.off_reason = ""
        self.sample_ids = None
        self.last_plan: CallPlan | None = None
        self.steps_aside: dict = {}               # reason -> calls the cache stepped aside for
        self.state_changes: dict = {}             # (prefix, signature digest) -> re-analyses for a new state
        self._small_refused: set = set()          # (prefix, signature digest) refused on a batch of 2 or 3
        self._other_operations: dict = {}         # (prefix, signature digest) -> batches refused for OTHER_OPERATIONS
        self.stats = dict(lookups=0, hits=0, reused_from_shallower=0, computed=0, stored=0, batches=0,
                          fully_served_batches=0, verified_batches=0, analysed_signatures=0, not_stored_young=0,
                          partly_held_computed=0)
        self.epoch_samples = config.dataset_size  # samples per epoch: given, or learned (_learn_epoch)
        self._seen = 0                            # samples of the calls probed or served
        self._prefix_since = 0                    # _seen when the current prefix began
        self._deepened = False                    # whether the current prefix deepened a frozen one (_young)
        self._window = [0, 0]                     # lookups, hits since the last hit-rate check
        self._full_at = None                      # lookups when the store first became full
        self._modules_cache: dict = {}

    # -- hook points ------------------------------------------------------------------------------------
    def on_plan(self, change, analysis) -> None:
        """Unfreezing a unit invalidates every level that contains it (its weights will change)."""
        if tuple(change.prefix) != self.prefix:
            self._prefix_since = self._seen
            self._deepened = bool(self.prefix) and set(self.prefix) < set(change.prefix)
        self.prefix = tuple(change.prefix)
        frozen = set(change.frozen)
        self.store.drop(lambda prefix: not set(prefix) <= frozen)

    def on_structure_change(self) -> None:
        """Entries stay when every module a cached prefix guards, and its parameters and buffers, are the same
        objects (torch.func.functional_call swapping the trainable units' weights in and out); else all go."""
        cached = dict(self._modules_cache)
        self._modules_cache.clear()
        if any(self._modules(prefix).token != mods.token for prefix, mods in cached.items()):
            self.clear()

    def on_tensors_moved(self) -> None:
        self.clear()  # cached tensors belong to the old device or dtype

    def clear(self) -> None:
        self.store.drop(lambda prefix: True)
        self.last_plan = None
        self.plans.clear()
        self._small_refused.clear()
        self._other_operations.clear()
        self.state_changes.clear()
        self.extra_state.clear()
        self._modules_cache.clear()

    def close(self) -> None:
        self.store.close()

    @contextlib.contextmanager
    def using_sample_ids(self, ids):
        if self.config.key != "sample_id":
            raise ConfigError("sample ids are only used with CacheConfig(key='sample_id', deterministic_inputs=True)")
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError):
            ids = None
        if ids is None or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ConfigError("fm.sample_ids(ids) takes integer ids (a list of ints or an integer tensor), one per "
                              "sample of the batch")
        self.sample_ids = ids.reshape(-1).tolist()
        try:
            yield
        finally:
            self.sample_ids = None

    def call(self, run, args, kwargs):
        start = time.perf_counter()
        self._digests.clear()  # weights may have changed since the last call (through .data, too)
        prefix = self.prefix
        flat = tree_flatten((tuple(args), dict(kwargs)))
        why = self._off_for_every_call(prefix)
        sig = plan = None
        if not why:
            sig = Signature.of(args, kwargs, self.model.training, flat)
            plan = self.plans.get((prefix, sig.digest))
            if plan is not None and not plan.cacheable:  # final for this signature: nothing more to read
                self.last_plan = plan
                return run(args, kwargs)
            why = sig.unsupported or ("an empty batch" if sig.batch == 0 else ONE_SAMPLE if sig.batch == 1 else
                                      "" if sig.batch else "no batched tensor argument") or \
                self._step_aside(prefix, flat[0])
        if not why:
            sig = sig.with_state(self._modules(prefix).state.digest())
            if plan is None and sum(p == prefix for p, _ in self.plans) >= MAX_SIGNATURES:
                why = f"more than {MAX_SIGNATURES} call signatures for this prefix"
        if why:
            plan = None
        if plan is not None and plan.cacheable and plan.placement != self._placement(prefix):
            plan = None  # the model was cast or moved (`model.to(torch.float64)` on the user's own variable)
        if plan is not None and plan.state != sig.state and plan.cacheable:
            changes = self.state_changes.get((prefix, sig.digest), 0) + 1
            self.state_changes[(prefix, sig.digest)] = changes
            if changes <= MAX_STATE_CHANGES:
                plan = None  # an attribute or mode around the prefix changed: analyse again
            else:
                plan.cacheable = False
                plan.reason = (f"the Python state of the frozen prefix's modules (or the modules around it) changed "
                               f"more than {MAX_STATE_CHANGES} times")
        if not why and plan is None:
            why = self._not_analysable(prefix, sig)
        if why:
            self.steps_aside[why] = self.steps_aside.get(why, 0) + 1
            return run(args, kwargs)
        if plan is None:
            return self._probe(prefix, sig, run, args, kwargs)
        self.last_plan = plan
        if not plan.cacheable:
            return run(args, kwargs)
        return self._serve(plan, sig.for_plan(plan), run, args, kwargs, start)

    def _not_analysable(self, prefix, sig) -> str:
        """Why this batch cannot be analysed, or ''. The analysis compares the batch with its halves and with its
        reverse:
        - a batch of 2 or 3 has single-sample halves, where some models (Llama) take other code paths; such a
          batch is analysed, but a refusal from it is not kept, and the next batch of MIN_ANALYSED_BATCH or more
          is analysed again (the smaller ones step aside until then). A batch of one always steps aside
          (ONE_SAMPLE);
        - a batch whose samples are mostly the same (zeros, one sample repeated: a sanity call) agrees with its
          halves and its reverse whatever the prefix does across the batch (a convolution along it was cached
          and served 0.36 off): it steps aside, and a batch of distinct samples is analysed."""
        if sig.batch < MIN_ANALYSED_BATCH and (prefix, sig.digest) in self._small_refused:
            return (f"refused once on a batch of fewer than {MIN_ANALYSED_BATCH} samples, whose halves are single "
                    f"samples (where some models take other code paths): the next batch of {MIN_ANALYSED_BATCH} or "
                    "more is analysed again")
        distinct = len(set(sig.row_digests()))
        if distinct < max(2, (sig.batch + 1) // 2):
            return (f"a batch of {sig.batch} samples of which {distinct} differ (zeros, or one sample repeated) "
                    "cannot show whether the frozen prefix mixes samples: the next batch of distinct samples is "
                    "analysed")
        return ""

    # -- when to step aside -------------------------------------------------------------------------------
    def _modules(self, prefix) -> PrefixModules:
        cached = self._modules_cache.get(prefix)
        if cached is None:
            units, named = self.unit_graph.units, dict(self.model.named_modules(remove_duplicate=False))
            top = {path: named[path] for u in prefix for path in self.unit_graph.paths(u) if path in named}
            gone = tuple(path for u in prefix for path in self.unit_graph.paths(u) if path not in named)
            trainable = {id(m) for u in units if u not in prefix for m in units[u].modules}
            guarded = {path: m for path, m in self.model.named_modules() if id(m) not in trainable}
            others = {path: named[path] for u in units if u not in prefix for path in self.unit_graph.paths(u)
                      if path in named}  # (a deleted unit's path is skipped: the runtime warns about it)
            token = tuple((path, id(m), tuple(id(t) for _, t in m.named_parameters(recurse=False)),
                           tuple(id(t) for _, t in m.named_buffers(recurse=False))) for path, m in guarded.items())
            cached = self._modules_cache[prefix] = PrefixModules(top, guarded, others,
                                                                 PythonState(guarded.values(),
                                                                             self.config.watch_data), token,
                                                                 torch_private.module_generators(self.model), gone)
        return cached

    def _off_for_every_call(self, prefix) -> str:
        """Why the cache runs this call uncached whatever its arguments, or ''."""
        if not self.enabled:
            return "the cache is off"
        if not prefix:
            return "no frozen prefix"
        if torch.is_inference_mode_enabled():
            return "inference mode"
        if torch.compiler.is_compiling():
            return "inside torch.compile"
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            return "inside torch.jit.trace or torch.export (a served batch would be recorded as a constant)"
        if torch_private.inside_func_transform():
            return "inside a torch.func transform (vmap, grad...)"
        if torch_private.forward_ad_active():
            return "inside forward-mode AD (torch.autograd.forward_ad.dual_level): a served batch carries no tangent"
        return ""

    def _step_aside(self, prefix, leaves) -> str:
        """Why the cache must run this call uncached (`leaves`: the call's flattened arguments), or ''."""
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in leaves):
            return "an input requires grad"
        units = self.unit_graph.units
        if any(p.requires_grad for u in prefix for p in units[u].params):
            return "a parameter of the frozen prefix requires grad again (set by hand): its gradient is computed"
        mods = self._modules(prefix)
        if mods.gone:
            return (f"the frozen prefix's module {mods.gone[0]} was deleted after optimize(): call optimize() again on "
                    "the changed model")
        if torch_private.global_module_hooks():
            return "global module hooks (torch.nn.modules.module.register_module_forward_hook...) must see every call"
        hooked = next((path for path, m in mods.guarded.items() if torch_private.has_call_hooks(m)), None)
        if hooked is not None:
            sources = torch_private.call_hook_sources(mods.guarded[hooked])
            if sources == {torch_private.INPUT_REQUIRE_GRADS_HOOK}:
                return (f"a hook on {hooked} from transformers' enable_input_require_grads() (gradient_checkpointing_"
                        "enable() and PEFT install it) makes the embeddings' output require grad; with use_reentrant="
                        "False checkpointing (the default), call model.disable_input_require_grads()")
            if {source for source, _ in sources} == {"transformers.utils.output_capturing"}:
                return (f"hooks that transformers installs on {hooked or 'the model itself'} to collect hidden states, "
                        "attentions or router logits must see every call (installed at the first call that asks for "
                        "them, and kept; some heads always ask: Segformer, UperNet, Wav2Vec2 classification, a "
                        "mixture of experts with output_router_logits), so the cache cannot serve this model")
            if {source for source, _ in sources} == {"torch.nn.utils.prune"}:
                return (f"torch.nn.utils.prune's hook on {hooked} recomputes the pruned weight at every call: once "
                        "its unit is frozen, prune.remove(module, name) makes the pruning permanent (or use a mask "
                        "parametrization, which the cache serves)")
            return (f"hooks on {hooked or 'the model itself'} (in the frozen prefix, its parents or the code between "
                    "units) must see every call")
        for m in mods.top.values():
            own = m.__dict__.get("forward")
            if own is not None and not getattr(own, FORWARD_MARK, False):
                return "a frozen module's forward was replaced by other code"
        return ""

    def _ruled_out(self, prefix) -> str:
        """Why the cache cannot serve this prefix whatever the call, found before any analysis, or ''.
        - The model was captured by recording one call (capture_method="record"): its forward has Python
          control flow no tracer could follow, and may branch on tensor values (`.item()`, `.tolist()`, `if x:`,
          `torch.equal`, some of which leave no trace in the graph); a branch on a batch-wide value would make what
          a sample's prefix computes depend on the other samples of its batch.
        - An nn.TransformerEncoder around it runs on nested tensors: in eval with a padding mask its fast path
          gives zeros at padded positions; under the analysis' probe (a TorchFunctionMode) that path is off and
          they carry values, so the analysed call would return other outputs and gradients than eager's.
        - The forward calls torch.cond (or while_loop, scan, map, flex_attention): called eagerly, it compiles
          its body with Dynamo, which would trace the analysis' probe too (and fail: the probe reads version
          counters)."""
        if self.self_compiling:
            op = self.self_compiling[0]
            name = f"torch.{op.removesuffix('_impl')}" if op in ("cond", "while_loop", "scan", "map_impl") else op
            return (f"the forward calls {name}, which compiles its body with Dynamo even when called eagerly, and "
                    "the cache's analysis (a TorchFunctionMode reading every operation) cannot run through that")
        if self.recorded:
            return ("the model was captured by recording one call (capture_method='record'): its forward may branch "
                    "on tensor values (.item(), .tolist(), if x:, pack_padded_sequence's lengths), and a branch on a "
                    "batch-wide value would make each sample's activations depend on its batch")
        for path, m in self._modules(prefix).guarded.items():  # (the prefix's units among them)
            if torch_private.runs_nested_tensors(m):
                return (f"{path or 'the model'} is an nn.TransformerEncoder that runs on nested tensors in eval "
                        "(padded positions come out as zeros), which the cache's analysis cannot reproduce: build "
                        "it with enable_nested_tensor=False, or call torch.backends.mha.set_fastpath_enabled(False) "
                        "before training, to cache it")
        return ""

    # -- internal runs ----------------------------------------------------------------------------------
    def _prefix_run(self, prefix, calls, args, kwargs, select=None, keep=False, record=None, copied=None):
        """Run the model only as far as the prefix's last call (`calls[-1]`), on all rows or on (args, kwargs)
        `select`; returns (key -> output of the prefix's calls, whether the run got to the last call). Nothing
        of it is visible to the user's run. `record`: an OpRecorder to run it under; `copied`: a list to which
        the seconds spent copying `keep`'s outputs are appended."""
        mods = self._modules(prefix)
        call_args, call_kwargs = select if select is not None else (args, kwargs)
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            # (the prefix's plan was analysed to draw no random numbers: forking is a precaution, with the
            # generators known when the prefix's modules were looked up; the analysis looks them up afresh)
            stack.enter_context(torch_private.forked_rng(mods.generators))
            stack.enter_context(torch_private.forward_hooks_suspended(self.model.modules()))
            ic = stack.enter_context(Interception(mods.top, keep=keep, stop_after=calls[-1], others=mods.others))
            if record is not None:
                stack.enter_context(record)
            try:
                self.model(*call_args, **call_kwargs)
            except Stop:
                pass
        if copied is not None:
            copied.append(ic.copy_seconds)
        complete = ic.stopped and all(key in ic.outputs for key in calls)
        return ic.outputs, complete

    # -- analysis (once per prefix and signature) -------------------------------------------------------------
    def _probe(self, prefix, sig, run, args, kwargs, warming=False):
        """The first call of a signature: run it for real under the dataflow probe (serving a shallower prefix's
        entries when they cover the batch), analyse, and store its outputs when the verdict is to cache (not yet
        for a young deeper prefix, `_young`, unless `warming`: `warm` fills the cache on purpose; never when the
        prefix holds a module with a fused fast path, FAST_PATH_MODULES, which the probe turns off)."""
        ruled_out = self._ruled_out(prefix)
        if ruled_out:  # refused before any run under the probe (whose outputs could differ from eager's)
            self.last_plan = self.plans[(prefix, sig.digest)] = CallPlan(prefix, False, ruled_out)
            return run(args, kwargs)
        if not warming:
            self._seen += sig.batch
        mods = self._modules(prefix)
        top = mods.top
        state = list(self.model.parameters()) + list(self.model.buffers())
        probe = DataflowProbe(state, torch_private.module_generators(self.model))  # (afresh: a forward may set a
        # new one on a module, `self.rng = np.random.default_rng(seed)`)
        probe.watch_arguments({i: t for i, t in enumerate(sig.leaves)
                               if isinstance(t, torch.Tensor) and i not in sig.batch_leaves})
        shallower = self._shallower_cover(prefix, sig)
        served, real = None, ()
        if shallower is not None:
            other, lvl, other_sig, other_keys, _ = shallower
            served = self._build(other, other_sig, lvl, other_keys, list(range(sig.batch)))
            shallow_top = self._modules(other.prefix).top
            real = [path for path in top if path not in shallow_top]
        before = mods.state.named()
        slots = _buffer_slots(mods.guarded)
        digest = content_digest([b for b in slots.values() if b is not None])
        versions = {key: torch_private.tensor_version(b) for key, b in slots.items() if b is not None}
        inputs = [(i, t, torch_private.tensor_version(t)) for i, t in enumerate(sig.leaves)
                  if isinstance(t, torch.Tensor)]
        try:
            with Interception(top, watch=probe, others=mods.others, serve=served, real=real, keep=True) as ic:
                probe.interception = ic
                with probe:
                    out = run(args, kwargs)
            result = probe.result(out)
        finally:
            probe.close()
        edited = [i for i, t, version in inputs if torch_private.tensor_version(t) != version]
        if edited:  # (checked first: the analysis' own runs of the prefix would change the caller's tensor again)
            result.problems.insert(0, f"the forward changes its input in place (argument {edited[0]} of the call, "
                                      "x /= 2 or x.sub_(...)): what the frozen prefix reads is not the call's input")
        after = mods.state.named()
        changed = sorted({key[1] for key, token in after.items() if before.get(key, token) != token
                          or key not in before})
        if changed:
            result.problems.append(f"the forward sets attributes ({', '.join(changed)}) of the frozen prefix or "
                                   "the modules around it, which serving (or the cache's own runs) would not do alike")
        now = _buffer_slots(mods.guarded)
        replaced = sorted(".".join(filter(None, key)) for key in set(slots) | set(now)
                          if slots.get(key) is not now.get(key))
        if replaced:  # (`self.count = self.count + 1`, a carried state: a new tensor in the slot each call)
            result.problems.append(f"the forward replaces buffers ({', '.join(replaced[:3])}) of the frozen prefix or "
                                   "the modules around it at each call, which serving would not do")
        elif not result.problems and content_digest([b for b in now.values() if b is not None]) != digest:
            counted = sorted(".".join(filter(None, key)) for key, version in versions.items()
                             if torch_private.tensor_version(now[key]) != version)
            if counted:  # (a counter, or a running statistic of the outputs, updated in the forward)
                result.problems.append(f"the forward changes buffers ({', '.join(counted[:3])}) of the frozen prefix "
                                       "or the modules around it in place at each call (a counter or a running "
                                       "statistic), and entries are tied to their values: none would be served")
            else:
                result.problems.append("the forward changes buffers of the frozen prefix or the modules around it in "
                                       "place without torch's version counters seeing it (fused observer and "
                                       "fake-quantize ops of quantization-aware training), which serving would not do")
        plan = self._analyse(prefix, sig, ic, result, args, kwargs)
        if shallower is not None:  # its served calls ran nothing the probe could see read an argument
            plan.unread &= shallower[0].unread
        plan.state = sig.state
        self.stats["analysed_signatures"] += 1
        self.last_plan = plan
        if not plan.cacheable and sig.batch < MIN_ANALYSED_BATCH:  # see _not_analysable
            self._small_refused.add((prefix, sig.digest))
            self.plans.pop((prefix, sig.digest), None)
            plan.reason += (f" (found on a batch of {sig.batch}; the next batch of {MIN_ANALYSED_BATCH} or more is "
                            "analysed again)")
            return out
        self._small_refused.discard((prefix, sig.digest))
        if not plan.cacheable and OTHER_OPERATIONS in plan.reason:
            # what the half ran may depend on what it holds (padding only in the second half): not final on one
            tries = self._other_operations.get((prefix, sig.digest), 0) + 1
            self._other_operations[(prefix, sig.digest)] = tries
            if tries < OTHER_OPERATIONS_TRIES:
                plan.reason += f" (found on {tries} batch{'es' if tries > 1 else ''}; the next is analysed again)"
                return out
            plan.reason += f" (found on {tries} batches of this signature)"
        self._other_operations.pop((prefix, sig.digest), None)
        self.plans[(prefix, sig.digest)] = plan
        if plan.cacheable:
            self._watch(prefix, result.state)
            plan.placement = self._placement(prefix)
            self.stats["reused_from_shallower" if shallower is not None else "computed"] += sig.batch
            if (shallower is not None or self._deepened) and not warming and self._young(sig.batch):
                self.stats["not_stored_young"] += sig.batch
            elif any(isinstance(m, FAST_PATH_MODULES) for top_module in top.values() for m in top_module.modules()):
                pass  # under the probe (a TorchFunctionMode) their fused fast path steps aside: other last bits
            else:
                keyed = sig.for_plan(plan)
                self._store_outputs(plan, keyed, ic.outputs, self._keys(keyed))
        return out

    def _analyse(self, prefix, sig, ic, result, args, kwargs) -> CallPlan:
        def no(reason):
            return CallPlan(prefix, False, reason)

        calls = tuple(k for kind, k in ic.order if kind == "prefix")
        if calls:  # (first: what a trainable unit between them does shows as other problems, a BatchNorm's update)
            last = max(i for i, (kind, _) in enumerate(ic.order) if kind == "prefix")
            if any(kind == "other" for kind, _ in ic.order[:last]):
                return no("a trainable unit runs before the frozen prefix's last call (the frozen part called twice, "
                          "on two views or crops, with trainable code in between; or an ensemble with only a later "
                          "member frozen)")
        if result.problems:
            return no(result.problems[0])
        training = [t for t in result.state if t.requires_grad]
        if training:  # (`F.linear(h, self.blocks[3].fc.weight)` between frozen units: a step changes it)
            names = {id(p): name for name, p in self.model.named_parameters(remove_duplicate=False)}
            return no(f"code before the frozen prefix's last call reads {names.get(id(training[0]), 'a parameter')}, "
                      "which trains: entries tied to it would be dropped at every optimizer step")
        if result.random_between:  # whether a run of the prefix shows it or not (a random flip may not happen)
            return no("the model's forward draws random numbers before or between the frozen prefix's units (a "
                      "random augmentation, a dropout in the parent's forward): what the prefix computes is not a "
                      "function of the model's inputs alone, which key the cache")
        if not calls:
            return no("the frozen prefix's modules are not called by the forward")
        batch, k = sig.batch, sig.batch // 2
        first = ic.outputs
        perm = torch.arange(batch - 1, -1, -1)
        # the outputs are copied as each call returns, as the probe's were: code between the prefix's units may
        # change one in place (torchvision ResNet's root ReLU(inplace=True) after bn1) before the run ends
        copied = []
        try:
            # the time of computing the prefix: the better of the run on the whole batch again (the first
            # prefix-only run of a new prefix was timed up to 20x slower than later ones) and of the run on the
            # second half, warm by then, scaled to the batch (timing three extra whole runs cost 40% more of
            # the analysis, which the in-run check, _judge_live, makes again with times from the run anyway)
            _sync(tree_flatten((args, kwargs))[0])  # (on a GPU: the real call's work is not this run's)
            start = time.perf_counter()
            again, ok = self._prefix_run(prefix, calls, args, kwargs, keep=True, copied=copied)
            _sync(tree_flatten(again)[0])
            compute_ms = 1000 * (time.perf_counter() - start - copied[-1])
            runs = [again]
            # the operations of the reversed batch and of its first half, for the graph check below
            recorders = {0: OpRecorder(), 2: OpRecorder()}
            for j, rows in enumerate((slice(0, k), slice(k, batch), perm)):
                if j == 1:
                    _sync(tree_flatten(runs[-1])[0])  # (the first half's work is not the second's)
                start = time.perf_counter()
                out, done = self._prefix_run(prefix, calls, args, kwargs, select=sig.select(args, kwargs, rows),
                                             keep=True, record=recorders.get(j), copied=copied)
                if j == 1:
                    _sync(tree_flatten(out)[0])
                    seconds = time.perf_counter() - start - copied[-1]
                    compute_ms = min(compute_ms, 1000 * seconds * batch / (batch - k))
                runs.append(out)
                ok = ok and done
        except Exception as exc:  # noqa: BLE001 -- a prefix that cannot run on part of a batch is not cached
            return no(f"the frozen prefix cannot run on part of the batch ({type(exc).__name__}: {exc})"[:300])
        if not ok:
            return no("the frozen prefix makes other calls on part of the batch (data-dependent control flow)")
        try:
            mixing = batch_mixing(recorders[2].ops, recorders[0].ops)
        except Exception as exc:  # noqa: BLE001 -- an operation the check cannot read: do not cache
            mixing = f"(the operation check could not read an operation: {type(exc).__name__}: {exc})"[:300]
        if mixing and mixing != OTHER_OPERATIONS:  # (other operations: refused below unless the outputs show
            return no(f"the frozen prefix mixes samples across the batch: {mixing}")  # mixing first: final)
        noise = 0.0  # of the prefix run twice on the same batch: the tolerance of every comparison below
        for key, i in result.needed:
            a, b = tree_flatten(again[key])[0][i], tree_flatten(first[key])[0][i]
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                difference = relative_difference(a, b)
                if difference > floor(a.dtype, a.device):
                    return no(f"the frozen prefix is not deterministic: two runs of {key[0]} on the same batch differ "
                              f"by {difference:.2g} (relative), beyond {a.dtype}'s noise")
                noise = max(noise, difference)
        templates, sample_meta, shared_count, keep = {}, [], 0, {}
        sizes = (batch, k, batch - k, batch)
        for key in calls:
            leaves, spec = tree_flatten(first[key])
            other = [tree_flatten(o[key])[0] for o in runs]
            if any(len(o) != len(leaves) for o in other):
                return no(f"the output of {key[0]} changes structure with the batch")
            recipes = []
            for i, f in enumerate(leaves):
                versions = [f] + [o[i] for o in other]  # full, again, first half, second half, reversed
                if isinstance(f, torch.Tensor) and (f.is_quantized or f.is_nested or f.layout != torch.strided):
                    kind = "quantized" if f.is_quantized else "nested" if f.is_nested else str(f.layout)
                    return no(f"an output of {key[0]} is a {kind} tensor (torch.ao.quantization.convert makes "
                              "quantized ones), which the cache's store cannot hold")
                if isinstance(f, torch.Tensor):
                    same_shape = all(v.shape == f.shape for v in versions)
                    batch_first = f.dim() > 0 and all(v.dim() > 0 and v.shape[0] == n
                                                      for v, n in zip(versions[:1] + versions[2:], sizes))
                    if (key, i) in result.standins:
                        if batch_first:
                            recipes.append(("standin", f.dtype, f.device, tuple(f.shape[1:]), True))
                        elif same_shape:
                            recipes.append(("standin", f.dtype, f.device, tuple(f.shape), False))
                        else:
                            return no(f"an output of {key[0]} has a shape that follows the batch in an unknown way")
                    elif same_shape and all(agree(v, f, noise) for v in versions[2:]):
                        recipes.append(("shared", shared_count))
                        shared_count += 1
                        keep.setdefault(key, set()).add(i)
                    elif batch_first:
                        _, _, h1, h2, p = versions
                        if not (agree(f[:k], h1, noise) and agree(f[k:], h2, noise) and agree(f[perm], p, noise)):
                            return no(f"an output of {key[0]} mixes samples across the batch (a sample's output "
                                      "depends on the others, e.g. BatchNorm on batch statistics; or the batch is "
                                      "not the first dimension of the inputs)")
                        recipes.append(("sample", len(sample_meta)))
                        sample_meta.append((f.dtype, f.device, layout(f)))
                        keep.setdefault(key, set()).add(i)
                    else:
                        return no(f"an output of {key[0]} (shape {tuple(f.shape)}) depends on the whole batch")
                elif isinstance(f, int) and not isinstance(f, bool) and all(v == n for v, n in zip(
                        versions[:1] + versions[2:], sizes)):
                    recipes.append(("batch_size",))
                elif isinstance(f, SCALARS) and all(v == f for v in versions):
                    recipes.append(("const", f))
                else:
                    return no(f"an output of {key[0]} ({type(f).__name__}) depends on the batch in an unknown way")
            templates[key] = (spec, recipes)
        if mixing:  # the halves' outputs agree with the batch's rows: may be content-dependent code (retried)
            return no(f"the frozen prefix mixes samples across the batch: {mixing}")
        plan = CallPlan(prefix, True, "", calls, templates, sample_meta, shared_count, keep, compute_ms=compute_ms,
                        noise=noise, batch=batch, unread=frozenset(result.unread_args))
        plan.serve_ms, plan.store_ms = self._serve_cost(plan, sig, first)
        costs = (f"{plan.compute_ms:.2f} ms to compute the frozen prefix, {plan.serve_ms:.2f} ms to serve a batch, "
                 f"{plan.store_ms:.2f} ms to store one")
        if not self.config.check_cost:
            plan.reason = f"cost not checked (check_cost=False): {costs}"
        elif not pays_back(plan.compute_ms, plan.serve_ms, plan.store_ms):
            plan.cacheable = False
            plan.reason = (f"does not pay: {costs} (a batch computed, stored and served once must cost less than "
                           "computing it twice: compute + 2 x serve + store < 2 x compute)")
        else:
            plan.reason = f"pays: {costs}"
        return plan

    def _serve_cost(self, plan, sig, outputs, rounds: int = 3) -> tuple:
        """(serve, store) milliseconds, each the best of `rounds`: serving is the signature's Python state,
        fingerprinting the batch, the content digest and fetching its per-sample outputs from a store; storing is
        copying the outputs as a real call returns them, then putting them into a fresh level of a store (the
        lookups it also needs are serving's). One scratch level at a time, so it holds one copy of the batch."""
        scratch = ActivationStore(CacheConfig(memory_bytes=1 << 40, storage_dtype=self.config.storage_dtype,
                                              device=self.config.device), chunk_slots=max(sig.batch, 1))
        samples = self._samples_of(plan, outputs)
        keys = self._keys(sig)
        store = float("inf")
        for r in range(rounds):
            scratch.drop(lambda prefix: True)
            lvl = scratch.level(("scratch", r), 0)
            start = time.perf_counter()
            scratch.put(lvl, keys, [s.detach().clone() for s in samples])
            _sync(samples)
            store = min(store, time.perf_counter() - start)
        serve = float("inf")
        state = self._modules(plan.prefix).state
        for _ in range(rounds):
            fresh = dataclasses.replace(sig, _rows=None, _shared=None)  # (fingerprinting the batch is serving's)
            start = time.perf_counter()
            state.digest()
            self._digests.clear()
            self._version(plan.prefix)
            keys = self._keys(fresh)
            dest = [torch.empty_like(o) for o in samples]
            scratch.get(lvl, keys, range(len(keys)), dest)
            _sync(dest)
            serve = min(serve, time.perf_counter() - start)
        scratch.close()
        return 1000 * serve, 1000 * store

    def measure(self, args, kwargs, rounds: int = 5) -> dict:
        """Median milliseconds over `rounds` on this batch, for the current prefix (after a call of this signature
        has been analysed): computing the frozen prefix alone, and serving it from a store (the Python state,
        the input fingerprints, the content digest, fetching the per-sample outputs). For benchmarks."""
        self._digests.clear()
        prefix = self.prefix
        flat = tree_flatten((tuple(args), dict(kwargs)))
        sig = Signature.of(args, kwargs, self.model.training, flat).with_state(self._modules(prefix).state.digest())
        plan = self.plans.get((prefix, sig.digest))
        if plan is None or not plan.cacheable:
            raise CacheError("measure() needs a call of this signature that the cache analysed and serves: "
                             + (plan.reason if plan is not None else "none was made yet"))
        compute, outputs = [], None
        for _ in range(rounds):
            start = time.perf_counter()
            outputs, _ = self._prefix_run(prefix, plan.calls, args, kwargs, keep=True)
            _sync(tree_flatten(outputs)[0])
            compute.append(1000 * (time.perf_counter() - start))
        costs = [self._serve_cost(plan, sig, outputs, rounds=1) for _ in range(rounds)]
        return {"compute_ms": statistics.median(compute), "serve_ms": statistics.median(c[0] for c in costs),
                "store_ms": statistics.median(c[1] for c in costs), "batch": sig.batch}

    # -- keys and entries -----------------------------------------------------------------------------------
    def _watch(self, prefix, tensors) -> None:
        """Add the parameters and buffers among `tensors` (read by the prefix's calls) to what `prefix`'s entries
        are tied to, by owner and name, so that reassigning one (`model.mu = torch.ones(3)`) is seen too."""
        refs = self.extra_state.setdefault(prefix, [])
        wanted = {id(t) for t in tensors}
        known = {(id(owner), kind, name) for owner, kind, name in refs}
        for owner in self.model.modules():
            for kind in ("_parameters", "_buffers"):
                for name, t in getattr(owner, kind).items():
                    if t is not None and id(t) in wanted and (id(owner), kind, name) not in known:
                        wanted.discard(id(t))  # a tensor held twice (tied) is watched under its first name
                        known.add((id(owner), kind, name))
                        refs.append((owner, kind, name))

    def _extra(self, prefix) -> tuple:
        """(the watched tensors outside the prefix's units as their owners hold them now, the names no longer
        held)."""
        tensors, gone = [], []
        for owner, kind, name in self.extra_state.get(prefix, ()):
            held = getattr(owner, kind)
            t = held[name] if name in held else None  # (a ScriptModule's dicts have no .get)
            if t is None:
                gone.append(name)
            else:
                tensors.append(t)
        return tensors, tuple(gone)

    def _version(self, prefix):
        """What the prefix's entries are tied to: its tensors' identities, versions, dtypes, devices and storage
        (and, with `watch_data`, their content digest). Computed once per call (`_digests` is cleared by each)."""
        extra, gone = self._extra(prefix)
        key = (prefix, len(extra), gone)  # the analysis may add tensors the prefix reads during a call
        version = self._digests.get(key)
        if version is None:
            version = (self.plan.state_version(prefix, extra), gone)
            if self.config.watch_data:
                version = version, content_digest(self.plan.state_tensors(prefix, extra))
            self._digests[key] = version
        return version

    def _placement(self, prefix) -> tuple:
        """The dtype, device and strides of each tensor the prefix reads (a plan is made for them: the layout of
        what it stores follows `model.to(memory_format=torch.channels_last)`)."""
        version = self._version(prefix)
        per_tensor = (version[0] if self.config.watch_data else version)[0]
        return tuple((v[2], v[3], v[5]) for v in per_tensor)

    def _keys(self, sig) -> list:
        if self.config.key == "sample_id":
            if self.sample_ids is None:
                raise ConfigError("CacheConfig(key='sample_id'): call the model inside `with fm.sample_ids(ids):`")
            if len(self.sample_ids) != sig.batch:
                raise InputMismatchError(f"{len(self.sample_ids)} sample ids for a batch of {sig.batch}")
            return [hashlib.blake2b(sig.shared_digest() + int(i).to_bytes(8, "little", signed=True),
                                    digest_size=16).digest() for i in self.sample_ids]
        return fingerprints((), [sig.shared_digest()], rows=sig.row_digests())

    @staticmethod
    def _samples_of(plan, outputs):
        """The per-sample tensors among the prefix calls' outputs, in slot order."""
        return [tree_flatten(outputs[key])[0][i] for key, i, kind, _ in plan.stored() if kind == "sample"]

    @staticmethod
    def _shared_of(plan, outputs):
        return [tree_flatten(outputs[key])[0][i].detach().clone() for key, i, kind, _ in plan.stored()
                if kind == "shared"]

    def _store_outputs(self, plan, sig, outputs, keys, rows_keys=None):
        """Store the stored outputs of a run (`outputs`: key -> output, as copied when each call returned) under
        `rows_keys` (default: every row's key)."""
        lvl = self.store.level(plan.prefix, self._version(plan.prefix))
        if plan.shared_count:
            lvl.shared.setdefault(sig.shared_digest(), self._shared_of(plan, outputs))
        samples = [s.detach() for s in self._samples_of(plan, outputs)]
        self.stats["stored"] += self.store.put(lvl, rows_keys if rows_keys is not None else keys, samples)

    def _build(self, plan, sig, lvl, keys, hit_rows, fresh=None, miss_rows=None):
        """key -> output of every prefix call, from the store (rows `hit_rows`) and from `fresh` outputs of a
        prefix-only run (rows `miss_rows`)."""
        batch = sig.batch
        group_sig = lvl.index[keys[hit_rows[0]]][0] if hit_rows else None
        shapes = lvl.groups[group_sig].sample_shapes if group_sig is not None else [
            tuple(s.shape[1:]) for s in self._samples_of(plan, fresh)]
        samples = [_alloc((batch,) + tuple(shape), dtype, device, order)
                   for shape, (dtype, device, order) in zip(shapes, plan.sample_meta)]
        if hit_rows:
            self.store.get(lvl, [keys[r] for r in hit_rows], hit_rows, samples)
        if miss_rows:
            index = torch.tensor(miss_rows)
            for dst, src in zip(samples, self._samples_of(plan, fresh)):
                dst.index_copy_(0, index.to(dst.device), src.to(dst.dtype))
        shared = lvl.shared.get(sig.shared_digest(), ()) if plan.shared_count else ()
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
                else:  # only fed to other (served) prefix calls: the right shape, dtype and device, no memory;
                    # NaN, so that a read nothing should make shows in the result
                    _, dtype, device, shape, batch_first = recipe
                    fill = float("nan") if dtype.is_floating_point or dtype.is_complex else 0
                    leaves.append(torch.full((), fill, dtype=dtype, device=device).expand(
                        (batch,) + shape if batch_first else shape))
            served[key] = tree_unflatten(leaves, spec)
        return served

    # -- serving ------------------------------------------------------------------------------------------
    def _serve(self, plan, sig, run, args, kwargs, start):
        """Serve one call (`start`: when the cache began on it, for the in-run cost check)."""
        top = self._modules(plan.prefix).top
        timed = self.config.check_cost and not plan.live.judged and not any(
            t.is_cuda for t in sig.tensors(sig.batch_leaves))
        batch = sig.batch
        lvl = self.store.level(plan.prefix, self._version(plan.prefix))
        keys = self._keys(sig)
        shared_ready = not plan.shared_count or sig.shared_digest() in lvl.shared
        hit_rows = [r for r, key in enumerate(keys) if key in lvl.index] if shared_ready else []
        hit_set = set(hit_rows)
        miss_rows = [r for r in range(batch) if r not in hit_set]
        self.stats["lookups"] += batch
        self._seen += batch
        self.stats["hits"] += len(hit_rows)
        self.stats["batches"] += 1
        self._window[0] += batch
        self._window[1] += len(hit_rows)
        served, fresh = None, None
        # a batch held in part is served in part (its missing rows run the prefix alone) when the store holds
        # at least MIN_PARTIAL_COVER of it and that pays; else it is computed whole, as a miss is, and timed for
        # the in-run check (just after a level starts, most batches hold a few rows stored in the same epoch).
        # One missing row is computed whole too: alone it would be a batch of one (ONE_SAMPLE)
        partial = (not (hit_rows and miss_rows and self.config.check_cost) or (
            len(hit_rows) >= MIN_PARTIAL_COVER * batch and partial_pays(plan, len(hit_rows), len(miss_rows)))
        ) and len(miss_rows) != 1
        if not partial:  # computed whole inside the real call (its missing rows stored), as a miss would be;
            self.stats["hits"] -= len(hit_rows)  # `hits` counts rows served, the window rows found (repeats)
            self.stats["partly_held_computed"] += batch
            hit_rows = []
        if hit_rows and miss_rows:
            index = torch.tensor(miss_rows)
            fresh, complete = self._prefix_run(plan.prefix, plan.calls, args, kwargs,
                                               select=sig.select(args, kwargs, index), keep=plan.keep)
            if not complete:  # the missing rows make other calls: run this batch for real
                self.stats["hits"] -= len(hit_rows)  # (the rows found stay in the window, as above)
                hit_rows, fresh = [], None
        if not hit_rows:
            out = self._serve_from_shallower(plan, sig, run, args, kwargs, keys, timed, partial)
            if out is None and self._deepened and self._young(batch):  # not stored yet, wherever it is computed
                self.stats["not_stored_young"] += batch
                out = run(args, kwargs)
            elif out is None:
                with Interception(top, keep=plan.keep) as ic:
                    out = run(args, kwargs)
                stored = time.perf_counter()
                self._store_outputs(plan, sig, ic.outputs, keys)
                self.stats["computed"] += batch
                if timed:
                    live = plan.live
                    live.compute_s += ic.call_seconds
                    live.store_s += ic.copy_seconds + time.perf_counter() - stored
                    live.stored += batch
                    live.stored_batches += 1
        else:
            if fresh is not None:
                self._store_outputs(plan, sig, fresh, keys, rows_keys=[keys[r] for r in miss_rows])
                self.stats["computed"] += len(miss_rows)
            else:
                self.stats["fully_served_batches"] += 1
                self._learn_epoch(lvl, batch)
            served = self._build(plan, sig, lvl, keys, hit_rows, fresh, miss_rows if fresh is not None else None)
            if timed and fresh is None:
                plan.live.serve_s += time.perf_counter() - start
                plan.live.served += batch
                plan.live.served_batches += 1
            out, _ = self._run_served(plan, served, run, args, kwargs)
        if self.config.verify and served is not None:
            self._verify(plan, served, args, kwargs)
        if timed:
            self._judge_live(plan)
        self._check_hit_rate()
        return out

    def _judge_live(self, plan) -> None:
        """The cost check again, with the times measured inside the run (the analysis' own timings favour
        caching: a hot scratch store, a prefix-only run with its own overhead): when LIVE_BATCHES batches were
        stored, with the analysis' serving time, and again at twice and four times as many... while fewer were
        served (in a ResNet run, storing averaged 6x the analysis' figure over 151 batches after passing the
        check at 16), and once as many were served whole, with all three times from the run (from as few as
        MIN_LIVE_STORED stored batches: a data set of fewer than LIVE_BATCHES batches stores no more). A plan that
        does not pay is turned off and, when no other call signature uses its level, the level's entries are
        freed."""
        live = plan.live
        if live.served_batches >= LIVE_BATCHES and live.stored_batches < MIN_LIVE_STORED:
            return
        if live.served_batches < LIVE_BATCHES:
            if live.stored_batches < LIVE_BATCHES:
                return
            # before anything is served: the prefix's and the store's times inside the run with the analysis'
            # serving time (which, if anything, is too low): a level the policy supersedes within an epoch
            # would never reach the full check, and a prefix timed alone can take 3x what it takes in the run
            if live.stored_batches < live.next_early:
                return
            live.next_early *= 2
            per_sample = plan.batch / live.stored
            compute, store, serve = 1000 * live.compute_s * per_sample, 1000 * live.store_s * per_sample, plan.serve_ms
            if pays_back(compute, serve, store):
                return
            measured = (f"{compute:.2f} ms to compute the frozen prefix and {store:.2f} ms to store a batch of "
                        f"{plan.batch} (means over the first {live.stored_batches} stored batches), and the "
                        f"analysis' {serve:.2f} ms to serve one; the analysis had timed the prefix alone at "
                        f"{plan.compute_ms:.2f} ms")
        else:
            live.judged = True
            compute, serve, store = live.per_batch_ms()
            if pays_back(compute, serve, store):
                return
            measured = (f"{compute:.2f} ms to compute the frozen prefix, {serve:.2f} ms to serve a batch, "
                        f"{store:.2f} ms to store one (means over {live.stored_batches} stored and "
                        f"{live.served_batches} served batches of {live.served / live.served_batches:.0f}; the "
                        f"analysis had measured {plan.compute_ms:.2f}, {plan.serve_ms:.2f} and {plan.store_ms:.2f})")
        live.judged = True
        plan.cacheable = False
        plan.reason = f"does not pay inside the run: {measured}"
        if not any(p.cacheable for (prefix, _), p in self.plans.items() if prefix == plan.prefix):
            self.store.drop(lambda prefix: prefix == plan.prefix)

    def _run_served(self, plan, served, run, args, kwargs, real=(), keep=False):
        top = self._modules(plan.prefix).top
        try:
            with Interception(top, serve=served, real=real, keep=keep) as ic:
                out = run(args, kwargs)
        except UnexpectedCall as exc:
            plan.cacheable = False
            plan.reason = (f"the model called {exc.args[0][0]} (call {exc.args[0][1]}) where the first calls with "
                           "these arguments did not (control flow that depends on values)")
            raise CacheError(f"the activation cache could not serve this call: {plan.reason}. It is off for such "
                             "calls from now on; this call cannot be completed (run it again).") from None
        return out, ic

    def _shallower_cover(self, prefix, sig, partial=False):
        """(CallPlan, level, its signature, its keys, the rows it holds) of the deepest shallower prefix whose
        entries cover every row of this batch; with `partial`, else of the one holding the most rows, if at least
        MIN_PARTIAL_COVER of them; or None."""
        best = None
        for shallower in sorted((p for p in self.store.levels if set(p) < set(prefix)), key=len, reverse=True):
            other = self.plans.get((shallower, sig.digest))
            lvl = self.store.levels.get(shallower)
            if other is None or not other.cacheable or lvl is None:
                continue
            other_sig = sig.with_state(self._modules(shallower).state.digest()).for_plan(other)
            if other.state != other_sig.state or lvl.weights_version != self._version(shallower):
                continue
            if other.shared_count and other_sig.shared_digest() not in lvl.shared:
                continue
            keys = self._keys(other_sig)
            held = [r for r, key in enumerate(keys) if key in lvl.index]
            if len(held) == len(keys):
                return other, lvl, other_sig, keys, held
            if partial and len(held) >= MIN_PARTIAL_COVER * len(keys) and len(keys) - len(held) != 1 and (
                    best is None or len(held) > len(best[4])):  # (one missing row alone: a batch of one)
                best = other, lvl, other_sig, keys, held
        return best

    def _serve_from_shallower(self, plan, sig, run, args, kwargs, keys, timed=False, partial=True):
        """When a shallower prefix's entries hold every row of this batch, or at least MIN_PARTIAL_COVER of them
        (the others are computed by a run of the shallower prefix alone, and stored at its level, which so fills
        in): serve them, run only the newly frozen units, and store this prefix's outputs (unless the prefix is
        young: `_young`). Returns None when no shallower prefix holds enough. `timed`: count a wholly held batch
        as stored for the in-run cost check, computing the prefix costing what the shallower one did in the run
        (when known) plus the newly frozen units' calls."""
        shallower = self._shallower_cover(plan.prefix, sig, partial=partial)
        if shallower is None:
            return None
        other, lvl, other_sig, other_keys, held = shallower
        if len(held) < sig.batch and self.config.check_cost and not partial_pays(other, len(held),
                                                                                 sig.batch - len(held)):
            self.stats["partly_held_computed"] += sig.batch
            return None
        fresh, missing = None, None
        if len(held) < sig.batch:
            kept = set(held)
            missing = [r for r in range(sig.batch) if r not in kept]
            fresh, complete = self._prefix_run(other.prefix, other.calls, args, kwargs, keep=other.keep,
                                               select=sig.select(args, kwargs, torch.tensor(missing)))
            if not complete:  # the missing rows make other calls
                return None
            self._store_outputs(other, other_sig, fresh, other_keys, rows_keys=[other_keys[r] for r in missing])
            self.stats["computed"] += len(missing)
            timed = False
        else:
            self._learn_epoch(lvl, sig.batch)
        self._window[1] += len(held)  # rows found (at a shallower level): inputs do repeat
        served = self._build(other, other_sig, lvl, other_keys, held, fresh, missing)
        top = self._modules(plan.prefix).top
        shallow_top = self._modules(other.prefix).top
        newly = [path for path in top if path not in shallow_top]
        young = self._young(sig.batch)
        out, ic = self._run_served(plan, served, run, args, kwargs, real=newly, keep=False if young else plan.keep)
        self.stats["reused_from_shallower"] += len(held)
        if young:
            self.stats["not_stored_young"] += sig.batch
            return out
        stored = time.perf_counter()
        self._store_outputs(plan, sig, ic.outputs, keys)
        below = other.live.compute_per_sample()
        if timed and below is not None:
            live = plan.live
            live.compute_s += below * sig.batch + ic.call_seconds
            live.store_s += ic.copy_seconds + time.perf_counter() - stored
            live.stored += sig.batch
            live.stored_batches += 1
        return out

    def _learn_epoch(self, lvl, batch: int) -> None:
        """Estimate the samples per epoch (unless `dataset_size` was given) from the first batch of
        MIN_EPOCH_BATCH or more of a training call (one with autograd on) that a level holds whole: its entry
        count then. With shuffled data a level must hold nearly every sample before a whole batch of 32 is in it
        (about 90% of them; 99% for 128), with a fixed order exactly one epoch; samples of other calls
        (evaluation) count too, as they do in `_seen`.
        Smaller batches are whole far earlier by chance and teach nothing, and so do evaluation batches (under
        `torch.no_grad()`): a test set read in order is whole at its second pass, whatever the training set's
        size (a ResNet run learned half its epoch that way). Autograd rather than train mode tells them apart:
        some fine-tuning keeps the model in eval mode (frozen BatchNorm statistics)."""
        if self.epoch_samples is None and batch >= MIN_EPOCH_BATCH and torch.is_grad_enabled():
            self.epoch_samples = len(lvl.index)

    def _young(self, batch: int) -> bool:
        """Whether the current prefix, which deepened a frozen one, has held for fewer than `store_deeper_after`
        epochs of samples before this batch (of `batch`, already counted in `_seen`): its outputs are not stored
        yet, whether a shallower prefix's entries serve it or it runs whole. Until the epoch is known, they are
        stored at once."""
        held = self._seen - batch - self._prefix_since
        return self.epoch_samples is not None and held < self.config.store_deeper_after * self.epoch_samples

    def _verify(self, plan, served, args, kwargs):
        expected, _ = self._prefix_run(plan.prefix, plan.calls, args, kwargs, keep=plan.keep)
        tolerant = self.config.storage_dtype is not None
        for key, i, _, _ in plan.stored():
            e = tree_flatten(expected[key])[0][i]
            got = tree_flatten(served[key])[0][i]
            ok = (torch.allclose(e, got.to(e.dtype), rtol=1e-2, atol=1e-2) if tolerant
                  else agree(got, e, plan.noise))
            if not ok:
                raise CacheError(f"the activation cache served a value of {key[0]} that differs from recomputing it")
        self.stats["verified_batches"] += 1

    def _check_hit_rate(self):
        """Turn the cache off when inputs rarely repeat. Judged only once samples had the chance to repeat: after
        two passes over `dataset_size` samples, or, once the store is full, after as many further lookups as it
        holds entries (a dataset larger than the memory budget keeps its cache while what is stored gets hits).
        `min_hit_rate=0` keeps it on whatever happens."""
        size = self.config.dataset_size
        full = any(lvl.full for lvl in self.store.levels.values())
        if full and self._full_at is None:
            self._full_at = self.stats["lookups"]
            self._window = [0, 0]  # the misses that filled the store say nothing about repeats
        lookups, hits = self._window
        since_full = self.stats["lookups"] - self._full_at if full else 0
        due = (full and since_full >= max(1024, self.store.entries())) or (
            size is not None and self.stats["lookups"] >= 2 * size and lookups >= size)
        if not due or not lookups:
            return
        self._window = [0, 0]
        if hits / lookups < self.config.min_hit_rate:
            self.enabled = False
            why = "the store is full" if full else f"after {self.stats['lookups']} lookups"
            self.off_reason = (f"hit rate {100 * hits / lookups:.1f}% over the last {lookups} samples is below "
                               f"{100 * self.config.min_hit_rate:.0f}% ({why}); inputs rarely repeat (random "
                               "augmentation?). CacheConfig(min_hit_rate=0) keeps it on")
            self.store.close()

    # -- filling ahead of time -----------------------------------------------------------------------------
    def warm(self, batches, training: bool, progress: bool = True) -> int:
        """Fill the cache for the current prefix from batches (each a tensor, a tuple of positional arguments, or
        a dict of keyword arguments), running only the frozen prefix (the whole model once per new signature,
        leaving no trace). Returns the number of samples looked at."""
        from tqdm.auto import tqdm

        prefix = self.prefix
        if not prefix:
            raise ConfigError("warm_cache needs a frozen prefix")
        ruled_out = self._ruled_out(prefix)
        if ruled_out:  # (each batch would run the whole model to store nothing)
            raise ConfigError(f"the current prefix cannot be cached: {ruled_out}")
        self._digests.clear()  # the weights may have changed since the last call
        seen = 0
        total = len(batches) if hasattr(batches, "__len__") else None
        for batch in tqdm(batches, total=total, desc="filling activation cache", unit="batch", disable=not progress):
            args, kwargs = ((), batch) if isinstance(batch, dict) else ((batch,), {}) if isinstance(
                batch, torch.Tensor) else (tuple(batch), {})
            flat = tree_flatten((tuple(args), dict(kwargs)))
            why = self._off_for_every_call(prefix) or self._step_aside(prefix, flat[0])
            sig = Signature.of(args, kwargs, training, flat).with_state(self._modules(prefix).state.digest())
            if why or sig.unsupported or sig.batch < 2:  # (a batch of one is never served: ONE_SAMPLE)
                continue
            plan = self.plans.get((prefix, sig.digest))
            if plan is None or plan.state != sig.state:
                if self._not_analysable(prefix, sig):
                    continue
                self._dry_probe(prefix, sig, args, kwargs)
                seen += sig.batch
                continue
            if not plan.cacheable:
                raise ConfigError(f"the current prefix is not cached: {plan.reason}")
            outputs, complete = self._prefix_run(prefix, plan.calls, args, kwargs, keep=plan.keep)
            if complete:
                keyed = sig.for_plan(plan)
                self._store_outputs(plan, keyed, outputs, self._keys(keyed))
            seen += sig.batch
        return seen

    def _dry_probe(self, prefix, sig, args, kwargs):
        """The analysis run of `warm`: the whole model without autograd, leaving no trace (RNG forked, buffers
        and parameters put back, hooks suspended)."""
        with traceless(self.model):
            self._probe(prefix, sig, lambda a, k: self.model(*a, **k), args, kwargs, warming=True)

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
            "served_calls": sorted({key[0] for p in verdicts if p.cacheable for key, _, _, _ in p.stored()}),
            "steps_aside": dict(self.steps_aside),
            "hit_rate": s["hits"] / s["lookups"] if s["lookups"] else 0.0,
            "entries": self.store.entries(),
            "bytes_in_memory": self.store.memory_used,
            "bytes_on_disk": self.store.disk_used,
            "spill_files": self.store.spill_files,
            "levels": [list(p) for p in self.store.levels],
            "epoch_samples": self.epoch_samples,
            "store_deeper_after": self.config.store_deeper_after,
            "plans": [self._plan_summary(p) for p in self.plans.values()],
            **s,
        }

    @staticmethod
    def _plan_summary(plan) -> dict:
        """One call signature's verdict and what the in-run check measured (for benchmarks' records)."""
        live = plan.live
        per_batch = (lambda seconds, n: round(1000 * seconds / n * plan.batch, 3) if n else None)
        return {"prefix_units": len(plan.prefix), "batch": plan.batch, "on": plan.cacheable, "reason": plan.reason,
                "stored_batches": live.stored_batches, "served_batches": live.served_batches,
                "in_run_ms": {"compute": per_batch(live.compute_s, live.stored),
                              "store": per_batch(live.store_s, live.stored),
                              "serve": per_batch(live.serve_s, live.served)}}
