"""`frzcompile.explain(fm)`: what was captured, the units, the plan, what the passes decided, and what runs."""
from __future__ import annotations

import os

import torch

from . import backend, torch_private
from .errors import ConfigError
from .policies import AutoFreeze, Linear, SmartFRZ
from .runtime import FrozenModule
from .runtime.plan import MAX_CHANGES
from .runtime.analysis import OUTSIDE
from .runtime.loss import DESCRIPTIONS as LOSS_SOURCES


def _fmt_count(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


class CompileReport:
    """The graphs the torch.compile backend compiled for a model: passes, recompiles and why."""

    def __init__(self, model_name: str, records, eager_plans=()):
        records = list(records)
        self.model = model_name
        self.graphs = [{
            "compile_id": r.compile_id,
            "frozen_params": len(r.frozen),
            "region_nodes": r.region_nodes,
            "passes": list(r.passes),
            "inner": r.inner,
            "reason": backend.recompile_reason(r, records),
            "seconds": r.seconds,
        } for r in records]
        self.frames = len({g["compile_id"].split("/")[0] for g in self.graphs})
        self.recompiles = sum(g["compile_id"].split("/")[1] != "0" for g in self.graphs)
        self.eager_plans = len(eager_plans)

    def __str__(self) -> str:
        lines = [f"torch.compile backend frzcompile: {len(self.graphs)} graphs received for {self.model} "
                 f"({self.frames} frames, {self.recompiles} recompiles)"]
        for g in self.graphs:
            passes = ", ".join(f"{label} ({1000 * sec:.1f} ms)" for label, sec in g["passes"])
            lines.append(f"  graph {g['compile_id']}: {g['frozen_params']} frozen params, {g['region_nodes']} nodes "
                         f"in the no-grad frozen region; passes {passes}; then {g['inner']} "
                         f"({1000 * g['seconds']:.0f} ms in all)")
            lines.append(f"    why: {g['reason']}")
        if self.eager_plans:
            lines.append(f"  {self.eager_plans} plan(s) got no compiled graph (Dynamo's recompile limit) and ran "
                         "eagerly")
        return "\n".join(lines)

    __repr__ = __str__


class Explanation:
    """A report on a FrozenModule; `str()` renders it as a table, the attributes hold the same facts."""

    def __init__(self, fm: FrozenModule):
        self.model = type(fm.model).__name__
        self.capture_method = fm.capture_method
        self.capture_attempts = list(fm.analysis.captured.attempts)
        self.released = fm.released
        self.stale_graph = fm.analysis.stale
        self.policy = repr(fm.policy)
        self.policy_report = fm.policy.report() if hasattr(fm.policy, "report") else []
        self.loss_source = fm.loss_source()
        # what a policy may freeze (TrainingView.freezable), and the units it keeps training whatever it decides
        shipped = isinstance(fm.policy, (SmartFRZ, Linear, AutoFreeze))  # (they keep to it; a policy of yours may not)
        self.policy_may_freeze = list(fm._view.freezable) if shipped else None
        self.policy_keeps = [u for u in fm.units if self.policy_may_freeze is not None
                             and u not in self.policy_may_freeze and u not in fm.frozen]
        self.step = fm.step_count
        plan = fm.plan
        prefix = set(fm.frozen_prefix)
        flops = fm.unit_flops()
        total = sum(flops.values()) or 1
        sparsity = fm.sparsity
        self.sparse = sparsity.report() if sparsity is not None else None
        per_unit = sparsity.sparsity_per_unit() if sparsity is not None else {}
        self.rows = []
        for u in fm.units:
            unit = fm.unit_graph.units[u]
            # ("frozen by hand": no parameter requires grad, and none was switched off for this step by ALaST)
            status = "frozen-prefix" if u in prefix else "frozen" if u in fm.frozen else \
                "frozen by hand" if unit.params and not any(p.requires_grad or p in plan.switched_off
                                                            for p in unit.params) else "trainable"
            self.rows.append({
                "unit": u,
                "status": status,
                "since": plan.since.get(u),
                "params": unit.num_params,
                "flops": flops.get(u, 0),
                "flops_share": flops.get(u, 0) / total,
                "nodes": len(unit.nodes),
                "sparsity": per_unit[u][0] / per_unit[u][1] if u in per_unit else None,
            })
        self.outside_flops = flops.get(OUTSIDE, 0)
        self.frozen_flops_share = sum(r["flops_share"] for r in self.rows
                                      if r["status"] in ("frozen-prefix", "frozen"))
        self.flops_note = fm.analysis.flops_note
        ctx = fm.analysis.last
        self.passes = [(r.label, r.seconds) for r in ctx.records] if ctx else []
        self.pass_stats = dict(ctx.stats) if ctx else {}
        self.frontier = [n.name for n in fm.unit_graph.frontier(fm.frozen_prefix)]
        self.cache = fm.cache.report() if fm.cache is not None else None
        self.builds = fm.analysis.builds
        self.build_seconds = fm.analysis.seconds
        self.plan_changes = list(plan.changes)
        self.plan_change_count = plan.change_count
        frozen = plan.frozen_params()
        self.frozen_params = sum(p.numel() for p in frozen if not p.requires_grad)
        self.trained_by_hand = sum(p.numel() for p in frozen if p.requires_grad)  # requires_grad_(True) by hand
        self.eval_modules = sum(len(fm.unit_graph.units[u].modules) for u in fm.frozen)
        self.compiled = None
        if fm.compiled is not None:
            self.compiled = CompileReport(self.model, fm.compiled.log, fm.compiled.eager_plans)
        self.runs = self._runs(fm)
        self.merges = dict(fm.unit_graph.merges)
        # parameters outside every unit's modules join the unit that first reads them (DeBERTa's relative
        # position table, read before the first layer and passed to every layer)
        self.adopted = {}
        for u in fm.units:
            paths = fm.unit_graph.paths(u)
            names = [n for n in fm.unit_graph.units[u].param_names
                     if not any(n.startswith(p + ".") for p in paths)]
            if names:
                self.adopted[u] = names
        # units whose forward reads parameters another unit owns (a tied head reading the embedding's weight)
        owner = {id(p): u for u in fm.units for p in fm.unit_graph.units[u].params}
        self.shared_weights = {}
        for u in fm.units:
            for root in fm.unit_graph.units[u].roots:
                for name, p in root.named_parameters():
                    if owner.get(id(p), u) != u:
                        self.shared_weights.setdefault(u, set()).add(owner[id(p)])

    def _runs(self, fm) -> list:
        """What a call of the FrozenModule does, in words."""
        lines = []
        if self.compiled is not None:
            lines.append("torch.compile(backend='frzcompile') of the model, one compiled model per plan "
                         "(the freeze pass runs on each of Dynamo's graphs)")
        else:
            lines.append("the model's own forward (eager), with the plan applied to it")
        if fm.frozen:
            lines.append(f"{_fmt_count(self.frozen_params)} frozen parameters: requires_grad=False, no gradient, "
                         f"no optimizer state; {self.eval_modules} modules of frozen units held in eval mode")
            if self.trained_by_hand:
                lines.append(f"{_fmt_count(self.trained_by_hand)} parameters of frozen units train: you set "
                             "requires_grad_(True) on them by hand")
        if fm.frozen_prefix:
            lines.append(f"frozen prefix ({len(fm.frozen_prefix)} units) runs without autograd whenever no input "
                         "to it requires grad" + (" and none of its parameters does" if self.trained_by_hand else ""))
            units = fm.unit_graph.units
            if any(torch_private.INPUT_REQUIRE_GRADS_HOOK in torch_private.call_hook_sources(m)
                   for u in fm.frozen_prefix for m in units[u].modules):
                lines.append("  but transformers' enable_input_require_grads() (which gradient_checkpointing_enable() "
                             "calls) makes the embeddings' output require grad: the frozen prefix runs with autograd "
                             "and backward goes through it. With use_reentrant=False checkpointing (the default), "
                             "call model.disable_input_require_grads()")
        if self.sparse is not None:
            routes = self.sparse["block_sparse_routes"]
            lines.append(f"{self.sparse['gradient_masks']} weights with masked gradients (tensor hooks)"
                         + (f"; routed to the block-sparse kernel where it is faster: {', '.join(routes)}"
                            if routes else ""))
            for name, paths in self.sparse.get("block_sparse_paths", {}).items():
                lines += [f"  {name}: {p}" for p in paths] or [f"  {name}: not called yet"]
        budgets = fm.token_budgets
        if budgets is not None:
            report = budgets.report()
            lines.append(f"ALaST token selection at {len(report['layers']) - 1} layers (kept tokens gathered before "
                         "each, scattered back after; every token in eval mode or without grad); "
                         f"{fm.policy.layers_per_step} of {len(report['layers'])} layers trained per step")
            if report["compiled_graphs"] is not None:
                lines.append(f"each layer's forward compiled on its own: {report['compiled_graphs']} graphs so far "
                             "(the kept-token count is a dynamic dimension; the trained layers a runtime flag, so "
                             "the others' weight gradients are computed and dropped)")
        if self.cache is not None and self.cache["served_calls"] and self.cache["enabled"]:
            c = self.cache
            # (per call signature: the decision printed with the cache is the last call's, which may differ)
            lines.append(f"activation cache serves the outputs of {', '.join(c['served_calls'])} for calls of "
                         f"{c['cacheable_signatures']} of the {c['signatures']} call signatures seen (the decision "
                         "printed with the cache is the last call's)")
        return lines

    def __str__(self) -> str:
        lines = [f"frzcompile: {self.model} captured by {self.capture_method}"]
        if self.released:
            lines.append("RELEASED (fm.release()): this FrozenModule no longer acts on the model; what follows is "
                         "its state when released (frozen parameters stay frozen, eval mode is no longer held)")
        if self.stale_graph:
            lines.append(f"the model's structure changed since optimize() (a submodule or parameter replaced): the "
                         f"FLOPs and graphs describe it as {self.capture_method} captured it; optimize() it again "
                         "for new ones")
        for method, why in self.capture_attempts:
            lines.append(f"  (tried {method} first; it cannot capture this model, which is common and harmless: "
                         f"{why})")
        lines.append(f"policy {self.policy}, step {self.step}")
        if self.policy_report:
            proxy = self.loss_source == LOSS_SOURCES["output gradient"]
            lines.append(f"  loss signal: {self.loss_source}" + (
                "; the loss values the rules quote below are this proxy's, not your loss's" if proxy else ""))
        lines += [f"  {line}" for line in self.policy_report]
        if self.policy_keeps:
            one = len(self.policy_keeps) == 1
            lines.append(f"  never frozen by the policy: {', '.join(self.policy_keeps)} (no unit downstream of "
                         f"{'it' if one else 'them'} trains, or {'it comes' if one else 'they come'} after the last "
                         "unit that trains)")
        for merged, why in self.merges.items():
            lines.append(f"merged unit {merged}: {why}")
        for u, names in self.adopted.items():
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            lines.append(f"unit {u} also holds {shown} (outside every unit's modules; {u} reads "
                         f"{'them' if len(names) > 1 else 'it'} first): freezing {u} freezes "
                         f"{'them' if len(names) > 1 else 'it'} too")
        for u, owners in self.shared_weights.items():
            lines.append(f"unit {u} uses weights owned by {', '.join(sorted(owners))} (tied): they freeze with "
                         f"{'it' if len(owners) == 1 else 'them'}")
        header = ("#", "unit", "status", "since", "params", "fwd FLOPs", "share", "sparsity")
        table = [header]
        for i, r in enumerate(self.rows):
            table.append((
                str(i), r["unit"], r["status"], "" if r["since"] is None else str(r["since"]),
                _fmt_count(r["params"]), _fmt_count(r["flops"]), f"{100 * r['flops_share']:.1f}%",
                "" if r["sparsity"] is None else f"{100 * r['sparsity']:.1f}%",
            ))
        if self.sparse is None:
            table = [row[:-1] for row in table]
            header = header[:-1]
        widths = [max(len(row[c]) for row in table) for c in range(len(header))]
        for k, row in enumerate(table):
            lines.append("  ".join(cell.rjust(w) if c in (0, 4, 5, 6, 7) else cell.ljust(w)
                                   for c, (cell, w) in enumerate(zip(row, widths))).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        if self.outside_flops:
            lines.append(f"FLOPs outside every unit: {_fmt_count(self.outside_flops)}")
        lines.append(f"frozen share of forward FLOPs: {100 * self.frozen_flops_share:.1f}%" if not self.flops_note
                     else f"forward FLOPs {self.flops_note}")
        if self.frontier:
            lines.append(f"frontier (tensors leaving the frozen prefix): {', '.join(self.frontier)}")
        if self.passes:
            lines.append("passes of the current graph: " + ", ".join(
                f"{label} ({1000 * s:.1f} ms)" for label, s in self.passes))
            for name, stats in self.pass_stats.items():
                lines.append(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
        if self.sparse is not None:
            sp = self.sparse
            last = "" if sp["last_update_step"] is None else f", last at step {sp['last_update_step']}"
            lines.append(f"sparse training: {sp['source']} {sp['structure']} masks on {sp['targets']} weights, "
                         f"sparsity {100 * sp['sparsity']:.1f}% of them; {sp['mask_updates']} mask updates{last}")
            eb = sp["early_bird"]
            if eb is not None:
                distances = ", ".join(f"{d:.3f}" for d in eb["last_distances"]) or "none yet"
                lines.append(f"  early-bird: ticket found at step {eb['found_at']}, pruned to it" if eb["found"] else
                             f"  early-bird: searching ({eb['observations']} masks drawn, distances of the newest "
                             f"to the others: {distances})")
            sv = sp["sieve"]
            if sv is not None:
                lines.append(f"  sieving: {sv['active']} of {sv['num_samples']} samples active (keep ratio "
                             f"{sv['keep_ratio']:.2f}), {sv['refreshes']} refreshes swapped {sv['swapped']}, "
                             f"{sv['forgetting_events']} forgetting events")
        if self.cache is not None:
            c = self.cache
            lines.append(f"activation cache: {c['decision']} ({c['cacheable_signatures']} of {c['signatures']} call "
                         "signatures cacheable)")
            for why, calls in c["steps_aside"].items():
                lines.append(f"  stepped aside for {calls} calls: {why}")
            lines.append(f"  hit rate {100 * c['hit_rate']:.1f}% ({c['hits']}/{c['lookups']} samples), "
                         f"{c['entries']} entries, {_fmt_count(c['bytes_in_memory'])}B in memory, "
                         f"{_fmt_count(c['bytes_on_disk'])}B spilled to disk ({c['spill_files']} files), "
                         f"{c['reused_from_shallower']} samples computed from a shallower prefix's entries")
            if c["not_stored_young"]:
                lines.append(f"  {c['not_stored_young']} of those not stored for a deeper prefix younger than "
                             f"{c['store_deeper_after']:g} epoch(s) of {c['epoch_samples']} samples "
                             "(CacheConfig(store_deeper_after=0) stores at once)")
            if c["partly_held_computed"]:
                lines.append(f"  {c['partly_held_computed']} samples of batches held only in part computed whole "
                             "inside the run: cheaper than running the frozen prefix alone on their missing rows")
        else:
            lines.append("activation cache: off (optimize(..., cache=True) turns it on)")
        lines.append("what runs: " + "; ".join(self.runs))
        lines.append(f"analysis graphs built: {self.builds} ({1000 * self.build_seconds:.0f} ms in all); "
                     f"plan changes: {self.plan_change_count}")
        if self.plan_change_count > 5:
            lines.append(f"  (the last 5 of {self.plan_change_count}; fm.plan.changes keeps the newest {MAX_CHANGES:,})")
        for step, frozen, reason in self.plan_changes[-5:]:
            lines.append(f"  step {step}: {reason} -> frozen {list(frozen) or 'nothing'}")
        if self.compiled is not None:
            lines.append(str(self.compiled))
        folder = os.environ.get("FRZ_DEBUG")
        lines.append(f"graph dumps: written to {folder} at each plan's first analysis" if folder else
                     "graph dumps: set FRZ_DEBUG=<folder> to write every graph before and after each pass")
        return "\n".join(lines)

    __repr__ = __str__


def explain(fm):
    """An `Explanation` of a FrozenModule, or a `CompileReport` of a model compiled with
    `torch.compile(model, backend="frzcompile")`."""
    orig = getattr(fm, "_orig_mod", None)  # torch.compile's OptimizedModule
    if isinstance(orig, torch.nn.Module) and not isinstance(orig, FrozenModule):
        return CompileReport(type(orig).__name__, backend.graphs_for(orig))
    if isinstance(orig, FrozenModule):
        fm = orig
    if not isinstance(fm, FrozenModule):
        raise ConfigError(f"explain() takes the module frzcompile.optimize returned (or a model compiled with "
                        f"backend='frzcompile'), not {type(fm).__name__}")
    fm.graph_module()  # make sure the current plan's analysis exists, so its passes can be shown
    return Explanation(fm)
