"""Rules no freezing decision may break, whatever a predictor says (SmartFRZ applies them to every decision).

A predictor that sees only weight snapshots cannot tell convergence from a plateau before learning: both look
like weights that stopped moving. These rules read the training loss instead (`TrainingView.losses()`: the loss
the model returns, one given to `fm.observe_loss`, or else a proxy measured from the gradient reaching the
model's output, see frzcompile.runtime.loss), averaged over `window` steps:

  1. Learning has started and has slowed: no freeze until the recent loss is at least `min_drop` (relative)
     below the loss of the first `window` steps, nor while it fell by more than `max_fall` (relative) from the
     window before, nor while its mean over the last `span` steps is lower than over the `span` before by more
     than `settled` of its whole drop since the start, nor while it is more than `relative` below itself
     `lookback` steps before (mean over `span` steps; every fall beyond the noise of the per-step losses). A
     network still learning would lose what its frozen units had not learned yet. Measured against the whole
     drop, a slow tail after a steep fall looks settled (Adam at a small rate, label smoothing, rare classes,
     regression: 13% per 100 steps was 1% of the drop, and freezes there cost 1-6 points in probes); measured
     against itself it does not (10% in 300 steps, judged from 150 steps back with the allowance scaled). And
     these tests must have held for the last `steady` steps (checked every `window // 2` steps): a loss that
     pauses on a plateau in the middle of
     learning passes them for a few decisions before it falls again (a GRU on SST-2 froze its embedding in
     such a pause and lost 3 points). `min_drop` is half the start: a deep ReLU MLP at PyTorch's default init
     sits for hundreds of steps on a plateau at about half its starting loss once it has learned the class
     prior (a saddle), and freezes there cost 9-65 points, the first layer alone 4-21 (probes on digits).
     Once the loss has fit its data (its mean over `span` steps at most `fitted` of its start and at most
     `fitted_loss`), the two tests against itself (`max_fall`, `relative`) no longer apply, the others do: near zero
     a loss keeps halving as the fit sharpens (MiniLM fine-tuned on 1,024 TREC questions for 20 epochs: 0.011 to
     0.006, 40% per 20 steps at times, with its test accuracy flat from epoch 6), which those tests read as
     learning to the end. The absolute cap keeps it to losses on the scale of a cross-entropy or a mean squared
     error of standardized targets: a regression on raw targets learns their mean first and sits at 1% of its
     start while still learning.
  2. One unit at a time: a decision freezes at most one unit (the policy enforces it), and at least `min_gap`
     steps pass between two freezes.
  3. Watch and roll back: `watch` steps after a freeze, if the loss is more than `tolerance` (relative) and
     beyond the noise above where it was just before the freeze, the unit is thawed again and held back for `backoff` steps (as Egeria
     checks a frozen layer's plasticity against a reference).
  4. A learning-rate decay thaws: when a frozen unit's learning rate (TrainingView.learning_rates) falls to
     `lr_drop` of itself or less between two decisions (a step decay, ReduceLROnPlateau), and to `lr_drop` of the
     rate it froze at, it is thawed (the rules above then decide afresh); a rate of 0 never counts, nor a unit the
     user froze (`forget`). A loss that stopped improving at a high rate has not converged: the lower rate starts
     a finer phase, and a network frozen just before a MultiStepLR decay, its head alone training through that
     phase, lost about a point on three seeds (a probe on Fashion-MNIST); the same units frozen after the decay
     lost 0.3. A fall counts only when it is sudden: between the two decisions before it the rate had fallen by
     less than STEADY_FALL (a rate that held, then dropped). A smooth schedule (cosine, linear to 0) halves its rate
     between two decisions only in its last steps, where it had already fallen by a third or more the decision
     before: a thaw there (the last ~20 steps of a 640-step cosine on MiniLM) costs the frozen units' backward
     and empties the activation cache for steps that train at nearly no rate. A unit frozen at the last decision
     has no earlier rate: any fall to `lr_drop` counts.
Every decision, hold-back and rollback is logged (`events`) for `explain`.
"""
from __future__ import annotations

import itertools
import math
import operator
from collections import deque
from collections.abc import Sequence

from .errors import PolicyError, check_policy_number

MAX_EVENTS = 200  # the newest events kept (they travel in the freeze state)


STEADY_FALL = 0.2  # rule 4: a fall to lr_drop counts when the rate had fallen by less than this the decision before

LOSS_HEAD = 1000  # readings (known values) of the loss history kept from its start (the level rules measure from)
LOSS_TAIL = 4096  # and its last readings kept (the rules read back Safeguard.reach steps: 520 by default)


class LossHistory(Sequence):
    """One value per training step (None where none was seen), as a list reads, in bounded memory: the first
    LOSS_HEAD readings and the last LOSS_TAIL are kept with their steps, and every other step reads None (a run of
    a million steps keeps about 5,000 values, and so does its freeze state; a loop that gives the loss every 25
    steps keeps its last 100,000 steps' readings, as the rules need)."""

    def __init__(self, values=()):
        self._head: dict = {}    # step -> value of the first LOSS_HEAD readings
        self._recent: dict = {}  # step -> value of the last LOSS_TAIL readings, oldest first
        self._order: deque = deque()  # their steps, oldest first (a dict's first key is slow to find after many
        self._length = 0              # deletions at its front)
        for v in values:
            self.append(v)

    def __len__(self) -> int:
        return self._length

    def append(self, value) -> None:
        if value is not None:
            if len(self._head) < LOSS_HEAD:
                self._head[self._length] = value
            self._recent[self._length] = value
            self._order.append(self._length)
            if len(self._order) > LOSS_TAIL:
                del self._recent[self._order.popleft()]
        self._length += 1

    def _index(self, i) -> int:
        i = operator.index(i)  # (as a list: a 0-d integer tensor reads as its value, a float is refused)
        i = i + self._length if i < 0 else i
        if not 0 <= i < self._length:
            raise IndexError("loss history index out of range")
        return i

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._length))]
        i = self._index(i)
        value = self._recent.get(i)
        return self._head.get(i) if value is None else value

    def __setitem__(self, i: int, value) -> None:
        """Replace a kept reading (a device tensor by its float, once read)."""
        i = self._index(i)
        if value is None or not (i in self._head or i in self._recent):
            raise ValueError(f"step {i} holds no kept reading to replace (None, or dropped)")
        for kept in (self._head, self._recent):
            if i in kept:
                kept[i] = value

    def __eq__(self, other):
        if isinstance(other, (list, tuple, LossHistory)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"LossHistory({list(self)!r})" if self._length <= 20 else f"LossHistory(<{self._length} steps>)"

    def kept(self, start: int, end: int, from_end: bool = False):
        """The steps in [start, end) with a kept reading, ascending (descending `from_end`), as an iterator: a walk
        for known values skips the steps between, as a walk of the whole list would skip their Nones."""
        stop = min(end, self._order[0] if self._order else self._length)  # (older readings: the head alone)
        if from_end:
            recent = itertools.dropwhile(lambda s: s >= end, reversed(self._order))
            head = itertools.dropwhile(lambda s: s >= stop, reversed(self._head)) if start < stop else ()
            return itertools.takewhile(lambda s: s >= start, itertools.chain(recent, head))
        head = itertools.takewhile(lambda s: s < stop, itertools.dropwhile(lambda s: s < start, self._head)) \
            if start < stop else ()
        recent = itertools.takewhile(lambda s: s < end, itertools.dropwhile(lambda s: s < start, self._order))
        return itertools.chain(head, recent)

    def known(self, count: int, end: int, from_end: bool = False) -> list:
        """The values of the first (or last) `count` kept readings of the steps before `end`, in step order: a
        policy's rules read a few hundred every decision, and a walk of `kept` indexing each cost a millisecond."""
        stop = min(end, self._order[0] if self._order else self._length)  # (older readings: the head alone)
        out = []
        if count <= 0:
            return out
        if from_end:
            for step in reversed(self._order):
                if step < end:
                    out.append(self._recent[step])
                    if len(out) == count:
                        return out[::-1]
            for step in reversed(self._head) if len(out) < count else ():
                if step < stop:
                    out.append(self._head[step])
                    if len(out) == count:
                        break
            return out[::-1]
        for step, value in self._head.items():
            if step >= stop or len(out) == count:
                break
            out.append(value)
        for step in self._order if len(out) < count else ():
            if step >= end:
                break
            out.append(self._recent[step])
            if len(out) == count:
                break
        return out

    def state_dict(self) -> dict:
        return {"length": self._length, "head": list(self._head.items()), "recent": list(self._recent.items())}

    @classmethod
    def from_state(cls, state) -> "LossHistory":
        """From `state_dict()`, or a plain list of values (a freeze state saved before the history was bounded)."""
        if not isinstance(state, dict):
            return cls(state)
        history = cls()
        history._length = int(state["length"])
        history._head = {int(s): v for s, v in state["head"]}
        history._recent = {int(s): v for s, v in state["recent"][-LOSS_TAIL:]}
        history._order = deque(history._recent)
        return history


def _known(losses, count: int, from_end: bool, end: int | None = None) -> list:
    """The first (or last) `count` known values of `losses[:end]`, in order, without walking (or copying) the
    whole history."""
    end = len(losses) if end is None else end
    if isinstance(losses, LossHistory):
        return losses.known(count, end, from_end)
    out = []
    for i in range(end - 1, -1, -1) if from_end else range(end):
        if losses[i] is not None:
            out.append(losses[i])
            if len(out) == count:
                break
    return out[::-1] if from_end else out


def _kind(why: str) -> str:
    """A hold-back reason without its numbers ("... fewer than 60 steps (10 steps ago: ...)" is one kind)."""
    return why.split(":")[0].split(" (")[0]


def _mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else float("nan")


def _error(values) -> float:
    """Standard error of the mean of `values` (per-step losses are noisy: a difference of two window means
    counts only when it is larger than twice the noise of that difference)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if len(values) < 2:
        return float("inf")
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))


def _beyond_noise(a, b) -> bool:
    """Whether the means of windows a and b differ by more than twice the standard error of their difference."""
    return abs(_mean(a) - _mean(b)) > 2.0 * math.hypot(_error(a), _error(b))


class Safeguard:
    def __init__(self, min_gap: int = 30, min_drop: float = 0.5, max_fall: float = 0.03, window: int = 20,
                 watch: int = 40, tolerance: float = 0.05, backoff: int = 200, settled: float = 0.05,
                 span: int = 100, steady: int = 60, relative: float = 0.1, lookback: int = 300,
                 lr_drop: float = 0.5, fitted: float = 0.01, fitted_loss: float = 0.05):
        def steps(name, value, low=0):
            return check_policy_number("Safeguard", name, value, low, integer=True)

        def share(name, value, high=None):
            return float(check_policy_number("Safeguard", name, value, 0.0, high))

        self.min_gap, self.window, self.watch, self.backoff = steps("min_gap", min_gap), \
            steps("window", window, 1), steps("watch", watch), steps("backoff", backoff)
        self.span, self.steady, self.lookback = steps("span", span, 1), steps("steady", steady), \
            steps("lookback", lookback, 1)
        self.min_drop, self.max_fall, self.settled = share("min_drop", min_drop), share("max_fall", max_fall), \
            share("settled", settled)
        self.relative, self.tolerance = share("relative", relative), share("tolerance", tolerance)
        self.fitted, self.fitted_loss = share("fitted", fitted, 1.0), share("fitted_loss", fitted_loss)
        self.lr_drop = share("lr_drop", lr_drop, 1.0)
        if self.reach > LOSS_TAIL:
            raise PolicyError(f"Safeguard: these settings read the loss {self.reach} steps back (max(2 * span, "
                              f"lookback + span) + steady + window + watch), and the loss history keeps the last "
                              f"{LOSS_TAIL} readings: lower lookback, span, steady, window or watch")
        self.reset()

    @property
    def reach(self) -> int:
        """How many steps back from the newest the rules read the loss."""
        return max(2 * self.span, self.lookback + self.span) + self.steady + self.window + self.watch

    def reset(self) -> None:
        """Forget the run (a policy bound to a new one)."""
        self.last_freeze = None        # step of the last freeze
        self.watching: list = []       # [unit, step frozen, loss before] of freezes still being watched
        self.held: dict = {}           # unit -> step until which it may not freeze again
        self.events: list = []         # (step, text), newest last
        self.blocked = ""              # why the last candidate was held back ('' if none was)
        self._logged = ""              # the last hold-back reason logged (each kind once in a row)
        self.frozen_at_lr: dict = {}   # unit -> its learning rate when it froze (rule 4)
        self.last_lr: dict = {}        # frozen unit -> its learning rate at the last review
        self.prior_lr: dict = {}       # and at the review before (rule 4: a sudden fall, or a smooth schedule's)
        self._verdicts: dict = {}      # end -> learning_started's verdict on the losses before it
        self._verdicts_of = None       # (the loss list, the rules' settings) those verdicts are on

    def __repr__(self):
        return (f"Safeguard(min_gap={self.min_gap}, min_drop={self.min_drop}, max_fall={self.max_fall}, "
                f"window={self.window}, watch={self.watch}, tolerance={self.tolerance}, backoff={self.backoff}, "
                f"settled={self.settled}, span={self.span}, steady={self.steady}, relative={self.relative}, "
                f"lookback={self.lookback}, lr_drop={self.lr_drop}, fitted={self.fitted}, "
                f"fitted_loss={self.fitted_loss})")

    # -- the loss, from the view -------------------------------------------------------------------------
    def _level(self, losses, end=None) -> float:
        end = len(losses) if end is None else end
        return _mean(losses[max(0, end - self.window):end])

    def learning_started(self, losses, end: int | None = None) -> tuple[bool, str]:
        """Rule 1 on the losses of the steps before `end` (all of them by default)."""
        first = _known(losses, self.window, from_end=False, end=end)
        known = _known(losses, 2 * self.window, from_end=True, end=end)
        if len(first) < self.window or len(known) < 2 * self.window:
            return False, (f"not enough loss readings yet ({len(known)} of {2 * self.window}); with a loop that "
                           "returns no loss and whose output gets no gradient, call fm.observe_loss(loss)")
        start, now = _mean(first), _mean(known[-self.window:])
        need = start - abs(start) * self.min_drop  # (abs: a loss may be negative, an NLL or ELBO)
        if not now <= need:
            return False, (f"learning has not started: loss {now:.4g} against {start:.4g} at the start (needs "
                           f"<= {need:.4g}, {100 * self.min_drop:.0f}% lower)")
        far = _known(losses, max(2 * self.span, self.lookback + self.span), from_end=True, end=end)  # (one walk)
        # a loss whose mean over the last `span` steps lost all but `fitted` of its start has fit its data: its
        # falls against itself (a loss near zero keeps halving as the fit sharpens) no longer say it is learning;
        # its falls against its whole drop still do
        fitted = self._fit(start, _mean(far[-self.span:]))
        previous, recent = known[-2 * self.window:-self.window], known[-self.window:]
        before = _mean(previous)
        if not fitted and now < before - abs(before) * self.max_fall and _beyond_noise(previous, recent):
            return False, (f"the loss is still falling fast: {now:.4g} against {before:.4g} {self.window} steps "
                           f"before (-{100 * (1 - now / before):.0f}%, more than {100 * self.max_fall:.0f}%)")
        longer = far[-2 * self.span:]
        if len(longer) < 2 * self.span:
            return False, (f"not enough loss readings to tell whether learning has slowed ({len(longer)} of "
                           f"{2 * self.span})")
        earlier, later = longer[:self.span], longer[self.span:]
        fall, whole = _mean(earlier) - _mean(later), start - _mean(later)
        if fall > self.settled * whole and _beyond_noise(earlier, later):
            return False, (f"the loss is still improving: its mean over the last {self.span} steps is {fall:.4g} "
                           f"below the {self.span} before, {100 * fall / whole:.0f}% of its whole drop since the "
                           f"start (more than {100 * self.settled:.0f}%)")
        # against itself `lookback` steps before (or as far back as the readings go, at least half of it, with
        # the allowance scaled: `relative` per `lookback` steps is the rate a settled loss stays under)
        if fitted:
            return True, ""
        far = far[-(self.lookback + self.span):]
        back = min(self.lookback, len(far) - self.span)
        if back < self.lookback // 2:
            return False, (f"not enough loss readings to tell whether learning has slowed ({len(far)} of "
                           f"{self.lookback // 2 + self.span})")
        then, recent = far[-(back + self.span):][:self.span], far[-self.span:]
        fall, allowed = _mean(then) - _mean(recent), self.relative * back / self.lookback
        if fall > allowed * abs(_mean(then)) and _beyond_noise(then, recent):
            return False, (f"the loss is still improving: its mean over the last {self.span} steps is "
                           f"{100 * fall / abs(_mean(then)):.1f}% below its mean {back} steps before (more than "
                           f"{100 * allowed:.1f}%)")
        return True, ""

    def _fit(self, start: float, recent: float) -> bool:
        """Whether a loss whose `span`-step mean is `recent` has fit its data (rule 1's `fitted`)."""
        return 0 <= recent <= min(start * self.fitted, self.fitted_loss)

    def learning_slowed_steadily(self, losses) -> tuple[bool, str]:
        """`learning_started` now and on the loss history as it was every `window // 2` steps back to
        `steady` steps ago."""
        ok, why = self._started_before(losses, len(losses))
        stride = max(self.window // 2, 1)
        for back in range(stride, self.steady + 1, stride) if ok else ():
            ok, then = self._started_before(losses, len(losses) - back)
            if not ok:
                return False, (f"the loss rules have held for fewer than {self.steady} steps ({back} steps ago: "
                               f"{then})")
        return ok, why

    def _started_before(self, losses, end: int) -> tuple[bool, str]:
        """`learning_started(losses, end)`, remembered: the history only grows, so the verdicts on the steps
        before `end` that earlier decisions reached are still true (a decision every 10 steps looks back at 6
        such ends: on a sub-millisecond step the rules were most of the policy's cost). Forgotten when the
        history is another list (a loaded state) or a rule's setting changed."""
        rules = (self.window, self.min_drop, self.max_fall, self.settled, self.span, self.relative, self.lookback,
                 self.fitted, self.fitted_loss)
        if self._verdicts_of is None or self._verdicts_of[0] is not losses or self._verdicts_of[1] != rules:
            self._verdicts_of, self._verdicts = (losses, rules), {}
        verdict = self._verdicts.get(end)
        if verdict is None:
            verdict = self._verdicts[end] = self.learning_started(losses, end=end)
            for old in [e for e in self._verdicts if e < end - self.steady - 1]:
                del self._verdicts[old]
        return verdict

    # -- the rules -----------------------------------------------------------------------------------------
    def review(self, view, frozen: set):
        """Rules 3 and 4: the units to thaw now (a freeze after which the loss rose; a learning-rate decay since a
        unit froze), or an empty set."""
        losses, step = view.losses(), view.step
        thaw = self._after_decay(view, frozen)
        still = []
        for unit, at, before in self.watching:
            if unit not in frozen:
                continue
            if step - at < self.watch:
                still.append([unit, at, before])
                continue
            after = self._level(losses)
            around = losses[max(0, at - self.window):at], losses[max(0, len(losses) - self.window):]
            if math.isfinite(before) and math.isfinite(after) and after > before + abs(before) * self.tolerance \
                    and _beyond_noise(*around):
                thaw.add(unit)
                self.held[unit] = step + self.backoff
                self.events.append((step, f"rolled back {unit} (frozen at step {at}): loss {after:.4g} against "
                                          f"{before:.4g} before the freeze (+{100 * (after / before - 1):.1f}%); "
                                          f"held back until step {step + self.backoff}"))
            else:
                rise = after > before + abs(before) * self.tolerance
                self.events.append((step, f"kept {unit} frozen: loss {after:.4g} against {before:.4g} before "
                                          "the freeze" + (" (a rise within the per-step losses' noise)" if rise
                                                          else "")))
        self.watching = still
        return thaw

    def _after_decay(self, view, frozen: set) -> set:
        units = [u for u in view.units if u in frozen]
        rates = view.learning_rates(units) if hasattr(view, "learning_rates") else {}
        prior, last = self.prior_lr, self.last_lr
        self.prior_lr, self.last_lr = last, {u: r for u, r in rates.items() if r is not None}
        for unit in set(self.frozen_at_lr) - frozen:
            del self.frozen_at_lr[unit]
        # (a rate of 0 never counts, as the old rate or the new: a schedule ending at 0, StepLR(gamma=0), trains
        # nothing there, and a thaw would only cost the frozen units' backward again; a fall after a fall is a
        # smooth schedule's tail, not a decay)
        thaw = {u for u, rate in self.last_lr.items() if rate > 0 and last.get(u, 0) > 0
                and self.frozen_at_lr.get(u, 0) > 0 and rate <= last[u] * self.lr_drop
                and rate <= self.frozen_at_lr[u] * self.lr_drop
                and not last[u] < prior.get(u, 0) * (1 - STEADY_FALL)}
        if thaw:
            for unit in thaw:
                del self.frozen_at_lr[unit]
            names = ", ".join(u for u in units if u in thaw)
            first = next(u for u in units if u in thaw)
            self.events.append((view.step, f"thawed {names}: the learning rate fell from {last[first]:.3g} to "
                                           f"{self.last_lr[first]:.3g} (a decay: the finer phase it starts is one "
                                           "they have not trained in)"))
            self.watching = [w for w in self.watching if w[0] not in thaw]
        return thaw

    def forget(self, units) -> None:
        """Stop watching `units` (the user froze them by hand: no rollback or decay thaws them)."""
        units = set(units)
        self.watching = [w for w in self.watching if w[0] not in units]
        for unit in units:
            self.frozen_at_lr.pop(unit, None)
            self.last_lr.pop(unit, None)
            self.prior_lr.pop(unit, None)

    def closed(self, view, frozen: set) -> bool:
        """Rules 1 and 2 for any unit, before a policy spends time judging one: whether no freeze can be admitted
        now (the gap since the last freeze, the loss rules); the reason is kept as a hold-back."""
        return self._gap_or_loss_holds(view, frozen)

    def _gap_or_loss_holds(self, view, frozen: set) -> bool:
        """Rule 2's gap and rule 1, for `closed` and `admit` (a policy may override `closed`, not what admit reads)."""
        step = view.step
        if self.last_freeze is not None and step - self.last_freeze < self.min_gap:
            self._hold(frozen, step, f"{self.min_gap} steps between freezes (last at step {self.last_freeze})")
            return True
        ok, why = self.learning_slowed_steadily(view.losses())
        if not ok:
            self._hold(frozen, step, why)
        else:
            self.blocked = ""  # (what holds a unit back now is the predictor)
        return not ok

    def admit(self, view, frozen: set, proposed: set, reason: str) -> set:
        """Rules 1 and 2 on a proposed frozen set: the set allowed now (the old one when nothing new is)."""
        new = proposed - frozen
        if not new:
            return proposed
        step = view.step
        held = sorted(u for u in new if self.held.get(u, -1) > step)
        if held:
            return self._hold(frozen, step, f"{', '.join(held)} held back after a rollback (until step "
                                            f"{max(self.held[u] for u in held)})")
        if self._gap_or_loss_holds(view, frozen):
            return set(frozen)
        self.blocked = self._logged = ""
        self.last_freeze = step
        losses = view.losses()
        before = self._level(losses)
        start, recent = _mean(_known(losses, self.window, False)), _mean(_known(losses, self.span, True))
        if self._fit(start, recent):  # (explain says why the tests against the loss itself did not hold it back)
            reason += (f"; the loss has fit its data ({recent:.3g} over the last {self.span} steps, at most "
                       f"{100 * self.fitted:g}% of its start {start:.3g} and at most {self.fitted_loss:g}): judged "
                       "against its whole drop only")
        rates = view.learning_rates(sorted(new)) if hasattr(view, "learning_rates") else {}
        for unit in sorted(new):
            self.watching.append([unit, step, before])
            self.prior_lr.pop(unit, None)  # (its rate before now is not known: a fall at the next review counts)
            if rates.get(unit) is not None:
                self.frozen_at_lr[unit] = self.last_lr[unit] = rates[unit]
        self.events.append((step, f"froze {', '.join(u for u in view.units if u in new)}: {reason}; loss "
                                  f"{before:.4g}"))
        return proposed

    def _hold(self, frozen: set, step: int, why: str) -> set:
        if _kind(why) != _kind(self._logged):  # log a kind of reason once, not every decision
            self.events.append((step, f"held back: {why}"))
        self.blocked = self._logged = why
        del self.events[:-MAX_EVENTS]
        return set(frozen)

    def report(self, last: int = 6) -> list:
        lines = [f"({len(self.events) - last} earlier events in fm.policy.safeguard.events)"] \
            if len(self.events) > last else []
        lines += [f"step {s}: {text}" for s, text in self.events[-last:]]
        if self.blocked:
            lines.append(f"now held back: {self.blocked}")
        return lines

    def state_dict(self) -> dict:
        return {"last_freeze": self.last_freeze, "watching": [list(w) for w in self.watching],
                "held": dict(self.held), "events": list(self.events), "blocked": self.blocked,
                "logged": self._logged, "frozen_at_lr": dict(self.frozen_at_lr), "last_lr": dict(self.last_lr),
                "prior_lr": dict(self.prior_lr)}

    def load_state_dict(self, state: dict) -> None:
        self.last_freeze = state["last_freeze"]
        self.watching = [list(w) for w in state["watching"]]
        self.held = dict(state["held"])
        self.events = [tuple(e) for e in state["events"]]
        self.blocked = state["blocked"]
        self._logged = state.get("logged", "")  # (a resumed run logs each kind of hold-back once in a row, too)
        self.frozen_at_lr = dict(state.get("frozen_at_lr", {}))  # (saved since rule 4)
        last = state.get("last_lr")
        self.last_lr = dict(last) if isinstance(last, dict) else {}
        prior = state.get("prior_lr")  # (saved since rule 4 tells a sudden fall from a smooth schedule's)
        self.prior_lr = dict(prior) if isinstance(prior, dict) else {}
