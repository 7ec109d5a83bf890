"""Optimizer steps drive the policy: any torch optimizer that updates the model's parameters, whenever it was
made (before or after `optimize()`, a second one for a later phase, or the one inside a wrapper such as
accelerate's `AcceleratedOptimizer`).

torch calls global optimizer step hooks (`torch.optim.optimizer.register_optimizer_step_pre_hook` / `_post_hook`,
public API) around every optimizer's step; frzcompile registers one pair per FrozenModule, through weak
references, so a FrozenModule that is garbage-collected unregisters itself. An optimizer "holds" the model
when one of its parameter groups contains one of the model's parameters. One training step is counted per
iteration: the first step of such an optimizer after a forward of the FrozenModule counts, a second optimizer
stepping right after it (split parameter groups; two models' optimizers after one forward) does not, and the
same optimizer stepping again counts again (a loop that calls the model some other way). A step after a forward
of its own counts: a GAN whose two players are one model, each stepping after its own forward, counts two steps
per iteration (as Lightning's `global_step` does under manual optimization), so its `total_steps` is twice
the iterations. No rule can tell those players from two optimizers taking turns by iteration. All of them get the optimizer
surgery (no gradient or state for frozen parameters).
"""
from __future__ import annotations

import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook


def unwrap_optimizer(opt):
    """The torch optimizer inside a wrapper (accelerate's AcceleratedOptimizer keeps it in `.optimizer`)."""
    for _ in range(4):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        opt = inner
    return opt


class StepDriver:
    """Calls `before_step(opt)` and `after_step(opt)` around each step of an optimizer holding the model, and
    `counted()` after each counted step (see the module docstring)."""

    def __init__(self, parameters, before_step, after_step, counted, optimizers=()):
        self._param_ids = {id(p) for p in parameters}
        self._before, self._after, self._counted = before_step, after_step, counted
        self._holds = weakref.WeakKeyDictionary()   # optimizer -> (number of parameters, holds ours)
        self._known = weakref.WeakSet()              # every optimizer seen holding our parameters
        self._stepped = set()                         # ids of optimizers that stepped since the last forward
        self._applied = set()                         # ids of optimizers that stepped since the last call
        self._user_stepped = False                    # fm.step() since the last call (another optimizer)
        self._last_step = weakref.WeakKeyDictionary() # optimizer -> steps_seen when it last stepped
        for opt in optimizers:
            self._known.add(unwrap_optimizer(opt))
        me = weakref.ref(self)

        # (a compiled optimizer step runs them eagerly: a few graph breaks, not one per line of bookkeeping)
        def pre(opt, args, kwargs):
            if torch.compiler.is_compiling():
                return torch.compiler.disable(pre)(opt, args, kwargs)  # (not at import: it imports Dynamo)
            driver = me()
            if driver is not None:
                driver._pre(opt)

        def post(opt, args, kwargs):
            if torch.compiler.is_compiling():
                return torch.compiler.disable(post)(opt, args, kwargs)
            driver = me()
            if driver is not None:
                driver._post(opt)

        handles = (register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post))
        self._finalizer = weakref.finalize(self, lambda: [h.remove() for h in handles])
        self.steps_seen = 0

    def close(self) -> None:
        """Stop seeing optimizer steps (also done when the driver is garbage collected)."""
        self._finalizer()

    @property
    def optimizers(self) -> list:
        """The optimizers holding the model's parameters seen so far (for optimizer surgery)."""
        return list(self._known)

    def optimizers_by_recency(self) -> list:
        """The optimizers seen so far, the one that stepped last at the end (never-stepped ones first)."""
        return sorted(self._known, key=lambda o: self._last_step.get(o, -1))

    def update_parameters(self, parameters) -> None:
        self._param_ids = {id(p) for p in parameters}
        self._holds = weakref.WeakKeyDictionary()

    def _holds_ours(self, opt) -> bool:
        """Whether `opt` holds the model's parameters now. Looked at again when its number of parameters or the
        first of each group changes: torch.optim.swap_in_optimizer_params_and_state swaps clones in for a dry-run
        (or traced) step, which is not a training step of the model."""
        groups = opt.param_groups
        count = sum(len(g["params"]) for g in groups)
        firsts = [g["params"][0] if g["params"] else None for g in groups]
        memo = self._holds.get(opt)
        if memo is None or memo[0] != count or len(memo[1]) != len(firsts) or \
                any(a is not b for a, b in zip(memo[1], firsts)):
            holds = any(id(p) in self._param_ids for g in groups for p in g["params"])
            memo = self._holds[opt] = (count, firsts, holds)
        return memo[2]

    def _pre(self, opt) -> None:
        if self._holds_ours(opt):
            self._known.add(opt)
            self._before(opt)

    def saw_forward(self) -> None:
        """The FrozenModule ran a training forward: the next optimizer step starts a new iteration."""
        self._stepped.clear()

    def saw_call(self) -> None:
        """The FrozenModule ran a call with grad enabled (in train or eval mode): a backward may follow, whose
        gradients no step has applied yet."""
        self._applied.clear()
        self._user_stepped = False

    def user_stepped(self) -> None:
        """`fm.step()`: the user's own optimizer has applied every gradient there is."""
        self._user_stepped = True

    def applied_ids(self) -> set:
        """Ids of the parameters whose gradients an optimizer step has applied since the last call with grad
        enabled (what a freeze now may drop: no step is left to apply them)."""
        if self._user_stepped:
            return set(self._param_ids)
        return {id(p) for opt in self._known if id(opt) in self._applied for g in opt.param_groups for p in g["params"]}

    def _post(self, opt) -> None:
        if not self._holds_ours(opt):
            return
        self._last_step[opt] = self.steps_seen
        self._applied.add(id(opt))
        self._after(opt)
        if self._stepped and id(opt) not in self._stepped:
            self._stepped.add(id(opt))  # another optimizer of the same iteration
            return
        self._stepped = {id(opt)}
        self.steps_seen += 1
        self._counted()
