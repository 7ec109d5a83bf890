"""Freezing policies: who decides which units are frozen, and when.

A policy is asked after every optimizer step (or `fm.step()`) through `decide(view)`, and returns the full set
of units that should be frozen from now on, or None to leave the plan as it is. It reads training through the
`TrainingView` the runtime hands it (step, units, per-unit parameters, gradient norms, weight samples), so a
policy pays only for the statistics it asks for. `state_dict`/`load_state_dict` make it resumable.

Shipped here: `SmartFRZ` (the default: an attention model over weight-snapshot windows, trained offline),
`Manual`, `Linear` (Composer LayerFreezing / FreezeOut-style ramp) and `AutoFreeze` (gradient-norm change rate,
prefix only). A policy never freezes the last unit that trains, nor any unit after it (`view.freezable`).
"""
from __future__ import annotations

import inspect
import math
import statistics
import time
import zlib

import torch

from .errors import PolicyError, check_policy_number
from .predictor import WINDOW, load_default, sample_indices, window_features
from .safety import Safeguard
from .torch_private import host_floats



class TrainingView:
    """What a policy may look at. Created by the runtime; cheap unless a statistic is asked for."""

    def __init__(self, fm):
        self._fm = fm
        self._slices: dict = {}  # unit -> (indices, parameter sizes, the indices cut per parameter)

    @property
    def step(self) -> int:
        return self._fm.step_count

    @property
    def total_steps(self):
        return self._fm.total_steps

    @property
    def units(self) -> list:
        return self._fm.units

    @property
    def frozen(self) -> tuple:
        return self._fm.frozen

    @property
    def pinned(self) -> tuple:
        """The frozen units the user froze (`fm.freeze`): no policy thaws them."""
        return tuple(u for u in self._fm.units if u in self._fm._plan.pinned)

    @property
    def freezable(self) -> list:
        """The units a policy may freeze, in order: those with a unit downstream that trains (a plan must leave
        something to train on every path to the outputs: a multi-task model's heads each end one, even when the
        model sums their losses: downstream is read in `UnitGraph.feeds`, what modules read), before the
        last unit that trains. A unit trains when it holds a parameter that requires grad, or would when a policy
        thawed it: a tied head that only reads the embedding's weight trains nothing, nor does a head whose
        weights the user froze (PEFT freezes a language model's head: its adapters and prompt encoder train;
        `fm.freeze`)."""
        graph, plan = self._fm.unit_graph, self._fm._plan
        names, frozen, pinned, feeds_into = graph.names, plan.frozen, plan.pinned, graph.feeds

        trains = {u: u not in pinned and any(plan.trainable_by_default(p) if u in frozen else p.requires_grad
                                             for p in graph.units[u].params) for u in names}
        feeds = {}  # unit -> whether a unit downstream of it trains (names are in topological order)
        for u in reversed(names):
            feeds[u] = any(trains[d] or feeds[d] for d in feeds_into.successors(u))
        last = max((i for i, u in enumerate(names) if trains[u]), default=0)
        return [u for u in names[:last] if feeds[u]]

    def parameters(self, unit: str) -> list:
        return list(self._fm.unit_graph.units[unit].params)

    def losses(self):
        """The training loss, one value per step so far (None where none was seen; a LossHistory, read as a list,
        that keeps the first and the last few thousand steps): see frzcompile.runtime.loss."""
        return self._fm.losses()

    def learning_rates(self, units) -> dict:
        """unit -> the learning rate its parameters train at now: per parameter, its param group's in the optimizer
        holding it that stepped last (a first phase's optimizer, still referenced, gives way to the one training
        now), the largest over the unit's parameters (None when no optimizer holding one has a numeric `lr`:
        Adafactor's default is None)."""
        by_param: dict = {}
        for opt in self._fm._driver.optimizers_by_recency():
            for g in opt.param_groups:
                rate = g.get("lr")
                if isinstance(rate, (int, float, torch.Tensor)) and not isinstance(rate, bool):
                    rate = float(rate)  # (once per group: a tensor rate on a GPU is read once)
                    for p in g["params"]:
                        by_param[id(p)] = rate
        out = {}
        for u in units:
            rates = [by_param[id(p)] for p in self.parameters(u) if id(p) in by_param]
            out[u] = max(rates) if rates else None
        return out

    def grad_norm(self, unit: str) -> float:
        """L2 norm of the unit's current gradients (0.0 when it has none)."""
        return float(self.grad_norms([unit])[unit])

    def grad_norms(self, units) -> dict:
        """unit -> the L2 norm of its current gradients as a 0-d tensor on their device (0 when it has none):
        `grad_norm` without reading the value, so a policy summing them every step waits for no GPU."""
        out = {}
        for u in units:
            grads = [p.grad.coalesce().values() if p.grad.is_sparse else p.grad  # nn.Embedding(sparse=True)
                     for p in self.parameters(u) if p.grad is not None]
            out[u] = torch.nn.utils.get_total_norm(grads, norm_type=2.0) if grads else torch.zeros(())
        return out

    def numel(self, unit: str) -> int:
        return sum(p.numel() for p in self.parameters(unit))

    def trained_indices(self, unit: str, k: int, seed: int):
        """`k` sorted indices into the unit's flattened parameters (as `weight_samples` takes them), drawn among
        the weights that train: in an nn.Embedding's table, the rows the current gradient touches (the tokens in
        use; most rows of a large vocabulary hardly ever move and look converged from the start), every weight of
        the other parameters. None when the unit holds no embedding table with a gradient now."""
        tables = {id(m.weight) for m in self._fm.unit_graph.units[unit].modules if isinstance(m, torch.nn.Embedding)}
        params = self.parameters(unit)
        if not any(id(p) in tables and p.grad is not None for p in params):
            return None
        pool, start = [], 0
        for p in params:
            if id(p) in tables and p.grad is not None:
                grad = p.grad.to_dense() if p.grad.is_sparse else p.grad
                pool.append(start + torch.nonzero(grad.reshape(-1)).reshape(-1).cpu())
            else:
                pool.append(torch.arange(start, start + p.numel()))
            start += p.numel()
        pool = torch.cat(pool)
        if len(pool) > k:
            pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:k]]
        return pool.sort().values

    def weight_samples(self, indices: dict) -> dict:
        """unit -> its parameters, flattened and concatenated, at fixed sorted `indices[unit]` (for snapshot-based
        policies such as SmartFRZ), as float32 CPU tensors. Gathers on the parameters' devices without copying the
        weights, then copies to the host once per device for all units (on a GPU: one synchronisation a call)."""
        gathered = []  # (unit, values on their parameter's device)
        with torch.no_grad():
            for unit, idx in indices.items():
                params = self.parameters(unit)
                if not params:
                    continue
                for p, sel in zip(params, self._cut(unit, idx, params)):
                    if len(sel):
                        gathered.append((unit, p.detach().reshape(-1).index_select(0, sel)))
        by_device: dict = {}
        for i, (_, values) in enumerate(gathered):
            by_device.setdefault(values.device, []).append(i)
        on_host = [None] * len(gathered)
        for positions in by_device.values():
            flat = torch.cat([gathered[i][1].float() for i in positions]).cpu()
            for i, part in zip(positions, flat.split([gathered[i][1].numel() for i in positions])):
                on_host[i] = part
        out: dict = {unit: [] for unit in indices}
        for (unit, _), part in zip(gathered, on_host):
            out[unit].append(part)
        return {unit: torch.cat(parts) if parts else torch.zeros(0) for unit, parts in out.items()}

    def _cut(self, unit: str, idx, params) -> list:
        """The sorted indices `idx` into the unit's flattened parameters, cut into indices into each parameter, on
        its device (kept while the indices and the parameters' sizes and devices stay: a policy samples the same
        weights every decision, and a copy to a GPU waits for the work queued there, per parameter)."""
        sizes = tuple((p.numel(), p.device) for p in params)
        kept = self._slices.get(unit)
        if kept is None or kept[0] is not idx or kept[1] != sizes:
            bounds = torch.tensor([n for n, _ in sizes]).cumsum(0)[:-1]
            cuts = torch.searchsorted(idx, bounds)
            starts = [0, *bounds.tolist()]
            kept = self._slices[unit] = (idx, sizes, [(sel - start).to(p.device) for sel, start, p in
                                                      zip(idx.tensor_split(cuts), starts, params)])
        return kept[2]


class Policy:
    """Base class. Subclasses override `decide`, and `state_dict`/`load_state_dict` if they keep state.
    `reads_loss`: whether `view.losses()` is collected for it (one reading per training step; False saves it);
    `reads_gradients`: whether it reads `view.grad_norms` (a hand-called fm.step() after zero_grad() warns)."""

    name = "policy"  # (a direct subclass without a name of its own is named after its class: __init_subclass__)
    reads_loss = True
    reads_gradients = False  # whether `decide` reads the step's gradients (fm.step() warns when it finds none)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" not in vars(cls) and cls.name == "policy":  # (a subclass of a shipped policy keeps its name:
            cls.name = cls.__name__                            # its freeze states load, integrations know it)

    def bind(self, view: TrainingView) -> None:
        """Called once by `optimize`, with the units known; validate options here."""

    def rebind(self, view: TrainingView) -> None:
        """Called when the model's structure changed (a submodule or parameter replaced): units keep their names,
        but their parameters may be new."""

    def decide(self, view: TrainingView):
        return None

    def on_user_freeze(self, units) -> None:
        """Units the user froze with `fm.freeze` (maybe ones the policy had frozen already): they are the user's
        now (the FrozenModule keeps them frozen whatever a plan says; a policy may forget them)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self):  # the constructor's options only
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        opts = ", ".join(f"{n}={getattr(self, n)!r}" for n in names if hasattr(self, n))
        return f"{type(self).__name__}({opts})"


class Manual(Policy):
    """Never changes the plan by itself: `fm.freeze(...)` / `fm.unfreeze(...)` do."""

    name = "manual"
    reads_loss = False


class Linear(Policy):
    """Freeze a growing prefix of units on a linear ramp (Composer LayerFreezing; FreezeOut's idea).

    From `freeze_start` (fraction of `total_steps`) to the end of training, the number of frozen units grows
    linearly up to `freeze_level` of all units (Composer's defaults: 0.5 and 1.0); the last unit always trains.
    """

    name = "linear"
    reads_loss = False

    def __init__(self, total_steps: int | None = None, freeze_start: float = 0.5, freeze_level: float = 1.0):
        self.total_steps = check_policy_number("linear", "total_steps", total_steps, 0, low_open=True, none=True)
        self.freeze_start = check_policy_number("linear", "freeze_start", freeze_start, 0.0, 1.0, high_open=True)
        self.freeze_level = check_policy_number("linear", "freeze_level", freeze_level, 0.0, 1.0)
        self._view = None

    def bind(self, view):
        self._view = view  # (the run's total_steps is read at each decision: an integration may correct it)
        total = self._total()
        if total is not None:
            check_policy_number("linear", "total_steps", total, 0, low_open=True)
        if not total:
            raise PolicyError(
                "linear needs the length of training: optimize(..., total_steps=N) or "
                "policy=frzcompile.policies.Linear(total_steps=N)"
            )

    def _total(self):
        return self.total_steps or (self._view.total_steps if self._view is not None else None)

    def __repr__(self):  # (total_steps as the run gives it, when it came from optimize() or a callback)
        total = self._total() if self._view is not None else None
        text = super().__repr__()
        return text.replace("total_steps=None", f"total_steps={total}") if total is not None else text

    def target_count(self, step: int, n_units: int) -> int:
        progress = step / self._total()
        if progress < self.freeze_start:
            return 0
        fraction = min(1.0, (progress - self.freeze_start) / (1.0 - self.freeze_start)) * self.freeze_level
        return min(int(math.floor(fraction * n_units + 1e-9)), n_units - 1)  # 1e-9: 0.6-0.5 is 0.0999...

    def decide(self, view):
        freezable = view.freezable
        k = self.target_count(view.step, len(freezable) + 1)
        return set(freezable[:k]) | set(view.frozen)


class AutoFreeze(Policy):
    """AutoFreeze (Liu et al. 2021): freeze the front units whose gradient norm has stopped changing.

    Every step the L2 gradient norm of each trainable unit is accumulated; every `interval` steps the change
    rate of its mean, |N_prev - N_now| / N_prev, is compared across trainable units, and units are frozen from
    the front of the network while their rate is at or below the `percentile`-th percentile (prefix only: a
    unit is frozen only if every unit before it already is). The last unit always trains.
    """

    name = "autofreeze"
    reads_loss = False
    reads_gradients = True

    def __init__(self, interval: int = 50, percentile: float = 50.0):
        self.interval = check_policy_number("autofreeze", "interval", interval, 1, integer=True)
        self.percentile = check_policy_number("autofreeze", "percentile", percentile, 0.0, 100.0)
        self._sums: dict = {}
        self._finite: dict = {}   # unit -> steps of this interval with a finite norm
        self._count = 0
        self._previous: dict = {}

    def decide(self, view):
        frozen = set(view.frozen)
        for u, norm in view.grad_norms([u for u in view.units if u not in frozen]).items():
            # (tensors: read once per interval, below); a non-finite norm (a step a fused optimizer counted while
            # its GradScaler skipped it) is left out of the mean
            finite = torch.isfinite(norm)
            self._sums[u] = self._sums.get(u, 0.0) + torch.where(finite, norm, 0.0)
            self._finite[u] = self._finite.get(u, 0) + finite  # (an int64 count: 0 + a bool tensor)
        self._count += 1
        if self._count < self.interval:
            return None
        counts = _floats(self._finite)
        means = {u: s / n for u, s in _floats(self._sums).items() if (n := counts.get(u, self._count)) > 0}
        self._sums, self._finite, self._count = {}, {}, 0
        previous, self._previous = self._previous, means
        rates = {u: abs(previous[u] - m) / previous[u] for u, m in means.items() if previous.get(u, 0.0) > 0}
        freezable = view.freezable  # (read once: it walks the units' flags and graph)
        candidates = [u for u in freezable if u in rates]
        if not candidates:
            return None
        threshold = float(torch.quantile(torch.tensor([rates[u] for u in candidates]), self.percentile / 100.0))
        # a unit the user froze by hand before optimize() (a frozen stem: no gradient, no rate) is passed over
        idle = {u for u in freezable if u not in frozen and not any(p.requires_grad for p in view.parameters(u))}
        new = set(frozen)
        for u in freezable:
            if u in frozen or u in idle:
                continue
            if u in rates and rates[u] <= threshold:
                new.add(u)
            else:
                break
        return new if new != frozen else None

    def state_dict(self):
        return {"sums": _floats(self._sums), "finite": _floats(self._finite), "count": self._count,
                "previous": dict(self._previous)}

    def load_state_dict(self, state):
        self._sums = dict(state["sums"])
        self._count = int(state["count"])
        self._finite = dict(state.get("finite") or {u: self._count for u in self._sums})
        self._previous = dict(state["previous"])


def _floats(values: dict) -> dict:
    """key -> float of numbers and 0-d tensors, read with one copy to the host per device."""
    keys = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    read = dict(zip(keys, host_floats([values[k] for k in keys])))
    return {k: read[k] if k in read else float(v) for k, v in values.items()}


LAZY_WINDOWS = 8  # SmartFRZ: a unit's windows kept waiting for the predictor while the safety rules hold back


TIMED_DECISIONS = 6  # SmartFRZ's first decisions, whose cost decides whether it steps aside (max_cost)


def _wait_for_devices(view) -> None:
    """Wait for the accelerators the units' parameters are on (none on CPU)."""
    accelerator = torch.accelerator.current_accelerator()  # (None on a machine without one)
    if accelerator is None:
        return
    for device in {p.device for u in view.units for p in view.parameters(u) if p.device.type == accelerator.type}:
        torch.accelerator.synchronize(device)


class SmartFRZ(Policy):
    """SmartFRZ (Li et al., ICLR 2023): an attention model over weight-snapshot windows decides per unit.

    Every `interval` steps a fixed random sample of each trainable unit's weights is recorded (in an embedding
    table, drawn among the rows in use when the window starts: TrainingView.trained_indices); once a unit has a
    full window, the predictor (frzcompile.predictor, trained offline on real runs and shipped) gives the
    probability that it has converged. A unit is frozen after `votes` consecutive decisions above `threshold`
    (hysteresis against noisy flips); with `prefix_only` (default) only the front of the network freezes, as
    the activation cache needs. Units with fewer than `min_weights` weights (too few to judge; the predictor was
    trained on units of at least 256) are not judged: they freeze together with the next unit that settles.
    The last unit always trains. With `prefix_only` and the safeguard's gap between freezes, only the front
    unit is judged at each decision (the unit behind it gathers its votes during the gap: the same decisions).
    A decision freezes at most one judged unit, and every decision passes the safety rules of `safeguard`
    (frzcompile.safety.Safeguard: learning has started and slowed, a gap between freezes, a rollback when the
    loss rises after a freeze); `safeguard=None` turns them off. The predictor is consulted only at decisions
    where those rules would let a freeze through (its windows of the decisions before wait to be judged then).

    `max_cost` (default 1%) bounds the policy's own cost: its decisions 2 to 6 are timed against the wall time
    between them (a GPU waited for first), and when the median takes more of the training time than that, SmartFRZ
    steps aside for the run at its 7th decision, long before it could freeze anything (its first judgement is at
    step WINDOW * interval): it freezes nothing and reads no loss from then on, as `policy="manual"` with nothing
    frozen. Steps of a few milliseconds (a small MLP on this CPU) are concerned. Timing is not repeatable: a run
    near the limit may step aside in one run and not in the next; `max_cost=None` never steps aside.
    """

    name = "smartfrz"

    def __init__(self, interval: int = 10, threshold: float = 0.5, votes: int = 3, prefix_only: bool = True,
                 min_weights: int = 256, predictor=None, safeguard="default", max_cost: float | None = 0.01):
        self.interval = check_policy_number("smartfrz", "interval", interval, 1, integer=True)
        self.max_cost = check_policy_number("smartfrz", "max_cost", max_cost, 0.0, low_open=True, none=True)
        self.votes = check_policy_number("smartfrz", "votes", votes, 1, integer=True)
        self.threshold = check_policy_number("smartfrz", "threshold", threshold, 0.0, 1.0, low_open=True,
                                             high_open=True)
        self.min_weights = check_policy_number("smartfrz", "min_weights", min_weights, 0, integer=True)
        if isinstance(safeguard, str) and safeguard == "default":
            safeguard = Safeguard(min_gap=self.interval * self.votes)
        if safeguard is not None and not isinstance(safeguard, Safeguard):
            raise PolicyError(f"smartfrz: safeguard must be a frzcompile.safety.Safeguard or None, not "
                              f"{type(safeguard).__name__}")
        self.safeguard = safeguard
        self.prefix_only = bool(prefix_only)
        self._window = WINDOW
        self._predictor = predictor
        self._indices: dict = {}
        self._snapshots: dict = {}
        self._votes: dict = {}       # judged unit -> consecutive decisions whose probability was above threshold
        self._unjudged: dict = {}    # judged unit -> its newest windows not yet given to the predictor
        self.last_probabilities: dict = {}
        self.clock = time.perf_counter  # (seconds: what max_cost is measured with)
        self._timed = 0              # decisions timed so far (max_cost)
        self._last = None            # (start, duration) of the last one timed in this process
        self._shares: list = []      # decisions 2 on: duration / wall time from its start to the next decision's
        self.cost = None             # the share of the training time its decisions took, once measured
        self.stepped_aside = None    # the step at which it stepped aside (cost above max_cost), or None

    def bind(self, view):
        if self._predictor is None:
            self._predictor = load_default()
        self._snapshots, self._votes, self._unjudged, self.last_probabilities = {}, {}, {}, {}  # a new run
        self._timed, self._last, self._shares, self.cost, self.stepped_aside = 0, None, [], None, None
        if self.safeguard is not None:
            self.safeguard.reset()
        self._indices = {u: sample_indices(view.numel(u), seed=zlib.crc32(u.encode())) for u in view.units}
        self._numel = {u: view.numel(u) for u in view.units}

    @property
    def reads_loss(self) -> bool:  # (the safety rules read it; the predictor alone does not)
        return self.safeguard is not None and self.stepped_aside is None

    def rebind(self, view):
        """A unit whose size changed (a new head) starts its snapshot window again."""
        for u in view.units:
            if view.numel(u) != self._numel.get(u):
                self._numel[u] = view.numel(u)
                self._indices[u] = sample_indices(view.numel(u), seed=zlib.crc32(u.encode()))
                self._snapshots.pop(u, None)
                self._votes.pop(u, None)
                self._unjudged.pop(u, None)

    def decide(self, view):
        if view.step % self.interval or self.stepped_aside is not None:
            return None
        if self.max_cost is None or self.cost is not None:
            return self._decide(view)
        _wait_for_devices(view)  # (a GPU still running queued steps: their time is not the decision's)
        start = self.clock()
        decision = self._decide(view)
        if self._last is not None and self._timed >= 2:  # (the first decision sets things up)
            self._shares.append(self._last[1] / (start - self._last[0]))
        self._last, self._timed = (start, self.clock() - start), self._timed + 1
        if len(self._shares) >= TIMED_DECISIONS - 1:
            self.cost = statistics.median(self._shares)
            # (a run resumed with units the policy froze keeps deciding: its rules may thaw them)
            if self.cost > self.max_cost and not set(view.frozen) - set(view.pinned):
                self.stepped_aside = view.step
                self._snapshots, self._votes, self._unjudged = {}, {}, {}
                return None
        return decision

    def _decide(self, view):
        frozen = set(view.frozen)
        if self.safeguard is not None:
            thaw = self.safeguard.review(view, frozen)
            if thaw:
                for u in thaw:
                    self._votes.pop(u, None)
                    self._unjudged.pop(u, None)
                first = min(view.units.index(u) for u in thaw)  # a prefix stays a prefix (units the user froze
                # stay: the FrozenModule keeps them, FreezePlan.pinned)
                return {u for u in frozen - thaw if not self.prefix_only or view.units.index(u) < first}
        # only units that may freeze and are large enough to judge are recorded; the rest never get a probability
        freezable = view.freezable  # (read once: it walks the units' flags and graph)
        candidates = [u for u in freezable if u not in frozen and self._numel[u] >= self.min_weights]
        for u in set(self._snapshots) - set(candidates):
            del self._snapshots[u]
        for u in candidates:
            if u not in self._snapshots:  # a new window: an embedding's rows in use, when it has any
                picked = view.trained_indices(u, len(self._indices[u]), seed=zlib.crc32(u.encode()))
                if picked is not None and len(picked):
                    self._indices[u] = picked
        for u, sample in view.weight_samples({u: self._indices[u] for u in candidates}).items():
            history = self._snapshots.setdefault(u, [])
            history.append(sample)
            del history[: -(self._window + self._lazy)]  # (the windows waiting to be judged, and one for the backlog)
        ready = [u for u in candidates if len(self._snapshots[u]) >= self._window]
        if self.prefix_only and self.safeguard is not None and \
                self.safeguard.min_gap >= self.interval * self.votes:
            # Only the front unit can freeze next. The one behind it, judged from the decision after that freeze
            # on, has its `votes` votes when the gap ends: the same decisions, for one predictor input, not all.
            ready = [u for u in ready if u == candidates[0]]
        # A unit's votes count along its run of consecutive decisions judging it (a unit not judged at a decision
        # starts again). The predictor is consulted only when a freeze could follow: while the safety rules hold
        # every freeze back (most of a run) a judged unit's newest windows wait in its history, and are judged at
        # once when the rules open: the same decisions. Only the newest `votes` windows can decide a freeze, so
        # older ones are dropped unjudged (their votes unknown: counted as none); with more votes than
        # LAZY_WINDOWS, the oldest waiting window is judged instead.
        for u in set(self._votes) - set(ready):
            del self._votes[u]
            self._unjudged.pop(u, None)
        for u in ready:
            self._votes.setdefault(u, 0)
            self._unjudged[u] = self._unjudged.get(u, 0) + 1
            if self._unjudged[u] > self._lazy and self.votes <= LAZY_WINDOWS:
                self._votes[u], self._unjudged[u] = 0, self._lazy
        backlog = {u: self._unjudged[u] - self._lazy for u in ready if self._unjudged[u] > self._lazy}
        if backlog:
            self._judge(backlog)
        if not ready or (self.safeguard is not None and self.safeguard.closed(view, frozen)):
            return None
        self._judge({u: self._unjudged[u] for u in ready})
        settled = {u for u in ready if self._votes[u] >= self.votes}
        new = set(frozen)
        if self.prefix_only:
            pending = []  # units too small to judge (a BatchNorm's 32 weights) freeze with the next one that settles
            for u in freezable:
                if u in frozen:
                    continue
                if self._numel[u] < self.min_weights:
                    pending.append(u)
                    continue
                if u not in settled:
                    break
                new.update(pending + [u])
                break  # one judged unit per decision
        else:
            new |= set([u for u in freezable if u in settled][:1])
        if new != frozen and self.safeguard is not None:
            judged = [u for u in view.units if u in new - frozen and u in self.last_probabilities]
            why = ", ".join(f"{u} p={self.last_probabilities[u]:.2f} x{self._votes[u]}" for u in judged)
            new = self.safeguard.admit(view, frozen, new, f"predictor says converged ({why})")
        return new if new != frozen else None

    @property
    def _lazy(self) -> int:
        """How many of a unit's newest windows may wait to be judged."""
        return min(self.votes, LAZY_WINDOWS)

    def _judge(self, count: dict) -> None:
        """The predictor on the oldest `count[u]` unjudged windows of each unit, oldest first (a window `back`
        decisions old ends `back` snapshots before the newest), counted into the unit's votes."""
        by_size: dict = {}  # windows of as many sampled weights are featurised as one batch
        for u, n in count.items():
            history, waiting = self._snapshots[u], self._unjudged[u]
            for back in range(waiting - 1, waiting - 1 - n, -1):
                window = history[len(history) - self._window - back:len(history) - back]
                by_size.setdefault(len(self._indices[u]), []).append(((u, back), torch.stack(window)))
        order = [key for group in by_size.values() for key, _ in group]
        with torch.inference_mode():  # (its outputs are read as floats at once; a fifth cheaper than no_grad)
            feats = [window_features(torch.stack([w for _, w in group])) for group in by_size.values()]
            logits = self._predictor(torch.cat([t for t, _ in feats]), torch.cat([s for _, s in feats]))
        probs = dict(zip(order, torch.sigmoid(logits).tolist()))
        for u, n in count.items():
            for back in range(self._unjudged[u] - 1, self._unjudged[u] - 1 - n, -1):
                self._votes[u] = self._votes[u] + 1 if probs[(u, back)] > self.threshold else 0
            self._unjudged[u] -= n
            if not self._unjudged[u]:
                self.last_probabilities[u] = probs[(u, 0)]
        self.last_probabilities = {u: p for u, p in self.last_probabilities.items() if u in self._votes}

    def on_user_freeze(self, units) -> None:
        if self.safeguard is not None:  # (no rollback or decay judges them)
            self.safeguard.forget(units)

    def report(self) -> list:
        """What explain shows: whether the predictor has judged yet, and the safety rules' last events."""
        if self.stepped_aside is not None:
            return [f"stepped aside for this run at step {self.stepped_aside}: its decisions took {self.cost:.1%} of "
                    f"the training time (more than max_cost={self.max_cost}), so it freezes nothing and reads no "
                    "loss from there on (SmartFRZ(max_cost=None) keeps it deciding whatever it costs)"]
        lines = []
        if self.cost is not None:
            lines.append(f"its decisions take {self.cost:.2%} of the training time (measured at its decisions 2-6; "
                         f"max_cost={self.max_cost})")
        have = max((len(h) for h in self._snapshots.values()), default=0)
        if not self.last_probabilities and have < self._window:
            lines.append(f"no unit judged yet: the predictor needs {self._window} weight snapshots, one every "
                         f"{self.interval} steps (first judgement at step {self._window * self.interval}); "
                         f"{have} so far")
        elif not self.last_probabilities:
            lines.append(f"no unit judged yet: the predictor has its {self._window} weight snapshots and is consulted "
                         "once the safety rules below allow a freeze")
        else:  # (when the rules let a freeze through and none came, this is why)
            judged = ", ".join(f"{u} p={p:.2f} ({self._votes.get(u, 0)} of {self.votes} votes)"
                               for u, p in self.last_probabilities.items())
            lines.append(f"predictor, last judged: {judged}; a unit freezes after {self.votes} decisions in a row "
                         f"above {self.threshold}")
        return lines + (self.safeguard.report() if self.safeguard is not None else [])

    def state_dict(self):
        return {"snapshots": {u: torch.stack(h) for u, h in self._snapshots.items() if h},
                "indices": {u: self._indices[u] for u, h in self._snapshots.items() if h},  # (trained_indices)
                "votes": dict(self._votes),
                "unjudged": dict(self._unjudged),
                "last_probabilities": {u: float(p) for u, p in self.last_probabilities.items()},  # (explain)
                "cost": self.cost, "stepped_aside": self.stepped_aside, "timed": self._timed,
                "shares": list(self._shares),
                "safeguard": self.safeguard.state_dict() if self.safeguard is not None else None}

    def load_state_dict(self, state):
        self._snapshots = {u: list(h.unbind(0)) for u, h in state["snapshots"].items()}
        self._indices.update(state.get("indices", {}))
        self._votes = dict(state["votes"])
        self._unjudged = dict(state.get("unjudged", {}))  # (saved since windows wait to be judged)
        self.last_probabilities = dict(state.get("last_probabilities", {}))
        # a run resumed before its cost was measured goes on measuring (the shares so far are kept; the clock's
        # values do not carry over, so the first decision after the resume starts a period)
        self.cost, self._timed, self._shares, self._last = \
            state.get("cost"), state.get("timed", 0), list(state.get("shares", [])), None
        aside = state.get("stepped_aside")
        # (stepped aside as saved, unless this policy's max_cost allows the cost measured: the user's option wins)
        allowed = self.max_cost is None or (self.cost is not None and self.cost <= self.max_cost)
        self.stepped_aside = aside if aside is not None and not allowed else None
        if aside is None and self.cost is not None and not allowed:  # (a tighter max_cost: measured again)
            self.cost, self._timed, self._shares = None, 0, []
        if self.safeguard is not None and state.get("safeguard") is not None:
            self.safeguard.load_state_dict(state["safeguard"])


MAX_LOG = 4_000  # ALaST's per-step history entries kept (when full, every other one is dropped: older steps thin out)
SKIPPED = ("carry", "forward", "auto")  # ALaST(skipped=...): what the tokens a layer skips do (or a share of steps)
IMAGE_FORWARD_SHARE = 0.3  # ALaST(skipped="auto") on image patches (benchmarks/RESULTS.md, seventeenth round)
IMAGE_TEMPERATURE = 4.0  # ALaST(temperature="auto") on image patches (benchmarks/RESULTS.md, ALaST section)


class ALaST(Policy):
    """ALaST-style adaptive layer budgets for transformer fine-tuning (after Devoto et al., "Adaptive Layer
    Selection for Efficient Vision Transformer Fine-Tuning", 2024). Every training step:
      - each transformer layer's importance is how much it moves the class token, delta_l = ||CLS_l - CLS_l-1||^2
        (batch mean; the class token is computed anyway);
      - budgets b_l in [min_budget, 1] move by `rate` toward targets proportional to the deltas, normalised across
        layers and scaled so the targets average to `budget` over the layers after the first (the paper's own
        update barely moves budgets at its step size; this normalisation and the one global knob are this
        project's departure, hence "ALaST-style");
      - a layer runs on the class token plus the ceil(b_l * (n - 1)) tokens the class token attended to most in
        the last layer that saw them (as the paper does), or, with a `temperature`, tokens drawn without
        replacement in proportion to attention ** (1 / temperature) from the policy's own generator; the others
        skip the layer unchanged (frzcompile.tokens). The first layer runs on every token (no class-token
        attention exists before it), so its budget stays 1;
      - with skipped="forward", the tokens a layer skips still run through it, among themselves and without
        gradient (nothing saved for backward; their gradient is the identity, as when carried): the next layer
        sees them as evaluation will, for one more forward over them (at budget 0.5 a sixth of full
        fine-tuning's compute, a third more than carrying them). A number in [0, 1] does so on that share of
        the steps, evenly spaced, and carries them on the others: the later layers still meet the moved tokens
        evaluation gives them, at a fraction of the cost. "auto" (default) forwards them on IMAGE_FORWARD_SHARE
        (30%) of the steps on image patches and carries them otherwise; "carry" always carries them, as the
        paper does;
      - with `k` below the number of layers, only `k` layers, drawn in proportion to their budgets from the
        policy's own generator (the user's random stream is untouched), get weight gradients for the step; the
        others are frozen for that step only and keep their optimizer state.
    Budgets start at `budget` (the first layer at 1), so the first step already saves its share of memory, and
    follow the deltas within about 1 / rate steps. In eval mode or without grad the model runs on every token.
    It never changes the freeze plan: `fm.freeze` still freezes units for good (they then leave the draw).

    budget: mean token budget over the layers after the first, in (0, 1]. k: layers trained per step (default:
    all of them). temperature: None keeps the top-ranked tokens; a number draws them in proportion to
    attention ** (1 / temperature) (higher is closer to uniform), so that tokens ranked low also train the layers
    they would always skip; "auto" (default) draws at IMAGE_TEMPERATURE when the tokens are image patches (the
    model embeds its input with an nn.Conv2d outside the layers, as ViT and DeiT do) and keeps the top-ranked
    tokens otherwise. Measured in benchmarks/bench_alast.py (RESULTS.md): on a ViT fine-tuned on MNIST,
    temperature 4 cut the loss to -0.40 points from -1.29 with the top tokens (five seeds), and on the same ViT
    fine-tuned on Fashion-MNIST, data it was not chosen on, to -0.60 from -1.23 (three seeds); temperature 2
    cost the pretrained MiniLM on SST-2 1.8 points (two seeds), so text keeps the top tokens. The other defaults
    (budget 0.5, every layer trained, min_budget 0.3) come from
    benchmarks/bench_alast.py (RESULTS.md): the paper's per-step layer freezing cost 1.4 points on the ViT there
    for 1.06x fewer FLOPs, while dropping tokens alone at budget 0.5 gave 1.6x memory within 0.5 points on the
    pretrained MiniLM (three seeds).
    layers: unit names of the transformer layers (default: the units whose modules repeat one class, e.g. every
    BertLayer). history: keep per-step budgets, tokens kept and layers trained (for explain and plots).
    """

    name = "alast"
    reads_loss = False

    def __init__(self, budget: float = 0.5, k: int | None = None, rate: float = 0.1, min_budget: float = 0.3,
                 layers=None, seed: int = 0, history: bool = True, temperature: float | str | None = "auto",
                 skipped: str | float = "auto"):
        self.budget = float(check_policy_number("alast", "budget", budget, 0.0, 1.0, low_open=True))
        self.rate = float(check_policy_number("alast", "rate", rate, 0.0, 1.0, low_open=True))
        if isinstance(min_budget, (int, float)) and min_budget == 0.3 and self.budget < 0.3:
            raise PolicyError(f"alast: min_budget must be in (0, budget], got {min_budget} (the default): pass a "
                              "lower min_budget= with a budget below 0.3")
        self.min_budget = float(check_policy_number("alast", "min_budget", min_budget, 0.0, self.budget, low_open=True))
        self.k = check_policy_number("alast", "k (layers trained per step)", k, 1, integer=True, none=True)
        try:
            if not (isinstance(temperature, str) and temperature == "auto"):
                check_policy_number("alast", "temperature", temperature, 0.0, low_open=True, none=True)
        except PolicyError:
            raise PolicyError(f"alast: temperature must be a positive number, None for the top-ranked tokens or "
                              f"'auto'; got {temperature!r}") from None
        if layers is not None and (isinstance(layers, str) or not all(isinstance(n, str) for n in layers)):
            raise PolicyError("alast: layers= takes a list of unit names, e.g. ['bert.encoder.layer.0', ...]")
        try:
            if not (isinstance(skipped, str) and skipped in SKIPPED):
                skipped = float(check_policy_number("alast", "skipped", skipped, 0.0, 1.0))
        except PolicyError:
            raise PolicyError(f"alast: skipped must be one of {', '.join(map(repr, SKIPPED))} or the share of "
                              f"steps on which the skipped tokens run through the layer, in [0, 1]; got "
                              f"{skipped!r}") from None
        self.skipped = skipped
        self.forward_share = 0.0  # steps whose skipped tokens run through the layer, resolved by `start`
        self._steps = 0           # steps observed (which of them forward follows from it)
        self.layers = None if layers is None else list(layers)
        self.seed = seed
        self.history = history
        self.temperature = temperature if temperature in (None, "auto") else float(temperature)
        self.drawn_at = None         # the temperature the draws use (None: top tokens), resolved by `start`
        self._image_patches = False
        self._generator = torch.Generator().manual_seed(seed)
        self._token_generators: dict = {}  # device -> generator of the token draws (made on first use)
        self.budgets: list = []      # per layer, in [min_budget, 1]
        self.trained: tuple = ()     # indices of the layers trained this iteration
        self.next = None             # the layers drawn at the last step, trained from the next training call on
        self.log: list = []          # (step, budgets, kept token fraction per layer, trained layers)

    def start(self, layers: list, image_patches: bool = False) -> None:
        """Called by the runtime once it knows the layers (their unit names, in order) and whether its tokens are
        image patches (for temperature="auto"); starts a fresh run."""
        self.drawn_at = (IMAGE_TEMPERATURE if image_patches else None) if self.temperature == "auto" \
            else self.temperature
        self._image_patches = image_patches
        self.forward_share = ({"forward": 1.0, "carry": 0.0, "auto": IMAGE_FORWARD_SHARE if image_patches else 0.0}
                              .get(self.skipped, self.skipped))
        self._steps = 0
        if self.k is not None and self.k > len(layers):
            raise PolicyError(f"alast: k={self.k} but the model has {len(layers)} layers")
        self.layers = list(layers)
        # from the first step at the global budget (the first layer at 1), so peak memory drops from the start
        self.budgets = [1.0] + [self.budget] * (len(layers) - 1)
        self.trained = tuple(range(len(layers)))  # before the first training call nothing is frozen (an
        self.log = []                             # optimizer made after optimize() sees every parameter)
        self._generator.manual_seed(self.seed)
        self._token_generators = {}
        self.next = self._draw(frozenset())       # the first iteration's layers

    @property
    def forwards_skipped(self) -> bool:
        """Whether the skipped tokens of this step run through the layers: on a share `forward_share` of the steps,
        evenly spaced (step n forwards when floor((n + 1) * share) > floor(n * share)), so a resumed run continues
        the same pattern."""
        share, n = self.forward_share, self._steps
        return share >= 1.0 or (share > 0.0 and math.floor((n + 1) * share + 1e-9) > math.floor(n * share + 1e-9))

    @property
    def layers_per_step(self) -> int:
        return self.k if self.k is not None else len(self.layers)

    def targets(self, deltas) -> list:
        """Budgets proportional to the normalised deltas, clamped to [min_budget, 1], averaging `budget`."""
        d = [max(float(x), 0.0) for x in deltas]  # (Python floats: a dozen per step, once per step)
        total = sum(d)
        if total <= 0 or self.budget >= 1.0:
            return [self.budget] * len(deltas)
        w = [x / total for x in d]

        def clamped(c):
            return [min(max(c * x, self.min_budget), 1.0) for x in w]

        lo, hi = 0.0, 1.0 / min(x for x in w if x > 0)  # at hi every layer with a delta reaches 1
        for _ in range(50):  # the mean of clamp(c * w) grows with c: bisect for mean == budget
            c = (lo + hi) / 2
            if sum(clamped(c)) / len(w) < self.budget:
                lo = c
            else:
                hi = c
        return clamped(hi)

    def observe(self, step: int, deltas, kept, trained, excluded=frozenset()) -> None:
        """End of a training step: the mean class-token change per layer (None where a layer did not run), the
        kept token fraction per layer and the layers that trained; budgets move, the next layers are drawn."""
        self._steps += 1
        seen = [d for d in deltas[1:] if d is not None]
        if seen:  # the first layer keeps budget 1: it runs on every token whatever its budget
            filled = [d if d is not None else min(seen) for d in deltas[1:]]
            t = [1.0] + self.targets(filled)
            self.budgets = [b + self.rate * (tb - b) for b, tb in zip(self.budgets, t)]
        if self.history:
            self.log.append((step, list(self.budgets), list(kept), list(trained)))
            if len(self.log) > MAX_LOG:  # a long run keeps every other step
                self.log = self.log[::2]
        self.next = self._draw(excluded)

    def redraw(self, excluded) -> tuple:
        """The draw waiting for the next training call, made again without `excluded` (the plan changed)."""
        return self._draw(excluded)

    def advance(self) -> tuple:
        """This iteration's layers: the last draw takes effect at the first training call after its step."""
        if self.next is not None:
            self.trained, self.next = self.next, None
        return self.trained

    def token_generator(self, device) -> torch.Generator:
        """The generator of the token draws on `device`: the policy's own, so the user's random stream (dropout,
        data order) is the same as without frzcompile."""
        key = str(torch.device(device))
        if key not in self._token_generators:
            self._token_generators[key] = torch.Generator(device=key).manual_seed(self.seed + 1)
        return self._token_generators[key]

    def _draw(self, excluded) -> tuple:
        """The layers that get weight gradients next step: k drawn without replacement in proportion to budgets
        (all of them when k covers every layer left)."""
        free = [i for i in range(len(self.layers)) if self.layers[i] not in excluded]
        k = min(self.layers_per_step, len(free))
        if k >= len(free):
            return tuple(free)
        weights = torch.tensor([self.budgets[i] for i in free], dtype=torch.float64)
        picked = torch.multinomial(weights, k, replacement=False, generator=self._generator)
        return tuple(sorted(free[i] for i in picked.tolist()))

    def report(self) -> list:
        if not self.layers:
            return []
        chosen = ("the top-ranked tokens kept" if self.drawn_at is None else
                  f"kept tokens drawn in proportion to attention^(1/{self.drawn_at:g})")
        if self.temperature == "auto":
            chosen += f" (temperature='auto': {'image patches' if self._image_patches else 'not image patches'})"
        share = self.forward_share
        skipped = ("the skipped tokens run through the layer without gradient" if share >= 1.0 else
                   "the skipped tokens carried to the next layer unchanged" if share <= 0.0 else
                   f"the skipped tokens run through the layer without gradient on {100 * share:.3g}% of steps "
                   "(evenly spaced), carried unchanged on the others")
        if self.skipped == "auto":
            skipped += f" (skipped='auto': {'image patches' if self._image_patches else 'not image patches'})"
        lines = [f"ALaST-style budgets (mean target {self.budget:g}, {self.layers_per_step} of {len(self.layers)} "
                 f"layers trained per step; {chosen}; {skipped}; the first layer runs on every token):"]
        recent = self.log[-50:]
        # budgets over time: at five evenly spaced logged steps
        marks = [self.log[round(j * (len(self.log) - 1) / 4)] for j in range(5)] if len(self.log) >= 5 else []
        if marks:
            lines.append("  budgets at steps " + ", ".join(str(r[0]) for r in marks) + ":")
        for i, name in enumerate(self.layers):
            kept = [r[2][i] for r in recent if r[2][i] is not None]
            trained = sum(i in r[3] for r in recent)
            over_time = " -> ".join(f"{r[1][i]:.2f}" for r in marks) or f"{self.budgets[i]:.2f}"
            lines.append(f"  {name}: budget {over_time}; over the "
                         f"last {len(recent)} steps tokens kept "
                         + (f"{100 * sum(kept) / len(kept):.0f}%" if kept else "n/a")
                         + f", trained in {trained}")
        return lines

    def state_dict(self):
        return {"budgets": list(self.budgets), "trained": list(self.trained),
                "next": None if self.next is None else list(self.next), "log": list(self.log), "steps": self._steps,
                "generator": self._generator.get_state(),
                "token_generators": {d: g.get_state() for d, g in self._token_generators.items()}}

    def load_state_dict(self, state):
        self.budgets = list(state["budgets"])
        self.trained = tuple(state["trained"])
        self.next = None if state.get("next") is None else tuple(state["next"])
        self.log = list(state["log"])
        self._steps = state.get("steps", self.log[-1][0] if self.log else 0)  # (saved before it was kept: steps
        # count from 1 in the log)
        self._generator.set_state(state["generator"])
        self._token_generators = {}
        for device, generator_state in state.get("token_generators", {}).items():
            self.token_generator(device).set_state(generator_state)


POLICIES = {p.name: p for p in (Manual, Linear, AutoFreeze, SmartFRZ, ALaST)}


def make_policy(policy) -> Policy:
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise PolicyError(f"unknown policy {policy!r}; choose one of {sorted(POLICIES)} or pass a Policy")
        return POLICIES[policy]()
    raise PolicyError(f"policy must be a name or a frzcompile.policies.Policy, not {type(policy).__name__}")
