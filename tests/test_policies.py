"""Policies decide on controlled inputs: ramps for Linear, synthetic gradient histories for AutoFreeze."""
import copy
import warnings

import pytest
import torch

import frzcompile
from frzcompile.policies import AutoFreeze, Linear, make_policy
from frzcompile.safety import Safeguard


class FakeView:
    """A TrainingView stand-in whose gradient norms the test scripts."""

    def __init__(self, units, norms):
        self.units = units
        self.frozen = ()
        self.step = 0
        self.total_steps = None
        self._norms = norms  # step -> {unit: norm}

    @property
    def freezable(self):
        return self.units[:-1]  # every unit has parameters: all but the last may freeze

    def grad_norms(self, units):  # (as TrainingView: 0-d tensors, read by the policy once per interval)
        return {u: torch.tensor(self._norms(self.step)[u]) for u in units}

    def parameters(self, unit):
        return [torch.nn.Parameter(torch.zeros(1))]  # (every unit trains: none was frozen by hand)


def _run(policy, view, steps):
    decisions = []
    for _ in range(steps):
        view.step += 1
        d = policy.decide(view)
        if d is not None:
            view.frozen = tuple(u for u in view.units if u in d)
            decisions.append((view.step, view.frozen))
    return decisions


def test_autofreeze_freezes_settled_front_units_only():
    units = ["a", "b", "c", "d", "head"]
    # a and b settle (norm constant); c keeps changing; d settles but comes after c, so stays (prefix only)
    def norms(step):
        moving = 1.0 + step
        return {"a": 1.0, "b": 2.0, "c": moving, "d": 3.0, "head": moving * 2}

    view = FakeView(units, norms)
    decisions = _run(AutoFreeze(interval=4, percentile=60), view, 12)
    assert decisions, "expected a freeze decision"
    assert decisions[0] == (8, ("a", "b"))  # the first interval only sets the reference
    assert "d" not in view.frozen and "head" not in view.frozen


def test_autofreeze_never_freezes_the_last_unit():
    units = ["a", "b"]
    view = FakeView(units, lambda step: {"a": 1.0, "b": 1.0})
    _run(AutoFreeze(interval=2, percentile=100), view, 20)
    assert view.frozen == ("a",)


def test_autofreeze_keeps_training_while_everything_moves():
    units = ["a", "b", "c"]
    view = FakeView(units, lambda step: {"a": 2.0 ** step, "b": 1.0, "c": 1.0})
    assert _run(AutoFreeze(interval=3, percentile=50), view, 30) == []


def test_linear_ramp_targets():
    p = Linear(total_steps=100, freeze_start=0.5, freeze_level=1.0)
    counts = [p.target_count(s, 5) for s in (0, 49, 50, 60, 70, 80, 90, 100)]
    assert counts == [0, 0, 0, 1, 2, 3, 4, 4]  # the last unit always trains
    half = Linear(total_steps=100, freeze_start=0.0, freeze_level=0.5)
    assert half.target_count(100, 10) == 5


@pytest.mark.parametrize("bad", [
    lambda: Linear(freeze_start=1.0), lambda: Linear(freeze_level=2), lambda: AutoFreeze(interval=0),
    lambda: AutoFreeze(percentile=101), lambda: make_policy("smartfreeze"), lambda: make_policy(3),
])
def test_bad_policy_options_raise(bad):
    with pytest.raises(frzcompile.PolicyError):
        bad()


def test_linear_without_length_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    with pytest.raises(frzcompile.PolicyError, match="total_steps"):
        frzcompile.optimize(model, (torch.randn(2, 3),), policy="linear")
    with pytest.raises(frzcompile.ConfigError, match=r"optimize: total_steps must be an integer in \(0, inf\) or None, got -5"):
        frzcompile.optimize(model, (torch.randn(2, 3),), policy="linear", total_steps=-5)


@pytest.mark.parametrize("policy", ["linear", "autofreeze",
                                    frzcompile.SmartFRZ(interval=1, threshold=1e-6, votes=1, safeguard=None,
                                                        max_cost=None)])
def test_policies_leave_the_last_unit_that_trains_alone(policy):
    """PEFT freezes a language model's head (its adapters, or its prompt encoder, train): every policy froze every
    unit before that head, the units that were training among them, and the next call failed with PlanError
    ("leaves nothing to train") mid-run. The last unit a policy may not freeze is the last one that trains."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    model[6].requires_grad_(False)  # the head, frozen by the user; layers 0, 2 and 4 train
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    fm = frzcompile.optimize(model, (torch.randn(4, 8),), optimizer=opt, policy=policy, total_steps=40)
    assert fm._view.freezable == ["0", "2"]
    x = torch.randn(16, 8)
    for _ in range(40):
        fm(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert "4" not in fm.frozen and model[4].weight.requires_grad
    if policy != "autofreeze":  # (AutoFreeze needs its gradient norms to fall: not on this loss)
        assert fm.frozen == ("0", "2")
    # the head frozen with fm.freeze instead (pinned: no policy thaws it) counts alike
    model[6].requires_grad_(True)
    fm.release()
    fm = frzcompile.optimize(model, (torch.randn(4, 8),), optimizer=opt, policy="linear", total_steps=40)
    fm.freeze("6")
    assert fm._view.freezable == ["0", "2"]


def test_autofreeze_state_round_trip():
    p = AutoFreeze(interval=5)
    view = FakeView(["a", "b"], lambda s: {"a": 1.0 + s, "b": 2.0})
    _run(p, view, 7)
    q = AutoFreeze(interval=5)
    q.load_state_dict(p.state_dict())
    assert q.state_dict() == p.state_dict()


def test_policy_reads_real_gradient_norms():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    fm = frzcompile.optimize(model, (torch.randn(3, 4),))
    fm(torch.randn(3, 4)).sum().backward()
    expected = torch.cat([p.grad.flatten() for p in model[0].parameters()]).norm().item()
    assert fm._view.grad_norm("0") == pytest.approx(expected, rel=1e-6)
    # weight samples of several units in one call, indices across the weight/bias boundary (16 weights, 4 biases)
    indices = {"0": torch.tensor([0, 5, 15, 16, 19]), "2": torch.tensor([3, 7, 8, 9])}
    samples = fm._view.weight_samples(indices)
    for unit, idx in indices.items():
        flat = torch.cat([p.detach().flatten() for p in model.get_submodule(unit).parameters()])
        assert torch.equal(samples[unit], flat[idx]) and samples[unit].device.type == "cpu"
    assert fm._view.weight_samples({"0": torch.tensor([], dtype=torch.long)})["0"].numel() == 0
    # the same index tensors again (their cuts per parameter are kept): after the weights moved, and after unit
    # "2" was replaced by a layer whose weight and bias split the flat indices elsewhere
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[2] = torch.nn.Linear(4, 3)  # 12 weights: indices 8 and 9 are in its weight now, not its bias
    fm(torch.randn(3, 4))  # (a call: the runtime rebinds the swapped unit)
    samples = fm._view.weight_samples(indices)
    for unit, idx in indices.items():
        flat = torch.cat([p.detach().flatten() for p in model.get_submodule(unit).parameters()])
        assert torch.equal(samples[unit], flat[idx])


def test_gradient_norms_of_a_sparse_embedding_are_read_and_autofreeze_trains_with_sparse_adam():
    """nn.Embedding(sparse=True) + SparseAdam: the view's gradient norm read a sparse gradient with a dense-only
    op, and AutoFreeze crashed inside the first optimizer step."""
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8, sparse=True), nn.Flatten(), nn.Linear(32, 16), nn.ReLU(),
                          nn.Linear(16, 2))
    ids = torch.randint(0, 50, (16, 4))
    ids[0, :2] = 7  # a repeated row: the sparse gradient holds it twice until coalesced
    y = torch.randint(0, 2, (16,))
    sparse = torch.optim.SparseAdam(list(model[0].parameters()), lr=1e-2)
    dense = torch.optim.Adam([p for m in list(model)[1:] for p in m.parameters()], lr=1e-2)
    fm = frzcompile.optimize(model, (ids,), optimizer=sparse, policy=AutoFreeze(interval=2))
    for _ in range(6):
        nn.functional.cross_entropy(fm(ids), y).backward()
        if "0" in fm.frozen:
            break
        assert model[0].weight.grad.is_sparse
        expected = float(model[0].weight.grad.to_dense().norm())
        assert fm._view.grad_norm("0") == pytest.approx(expected, rel=1e-5) and expected > 0
        sparse.step()
        dense.step()
        sparse.zero_grad()
        dense.zero_grad()
    assert fm.step_count >= 2


def test_a_policy_object_decides_for_one_frozen_module():
    """One Linear given to two optimize() calls read the second run's total_steps (the first froze nothing), and an
    AutoFreeze mixed both runs' gradient norms: refused while the first FrozenModule is alive and not released."""
    x = torch.randn(4, 8)
    policy = frzcompile.policies.Linear()
    fm = frzcompile.optimize(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)), (x,), policy=policy,
                             total_steps=100)
    with pytest.raises(frzcompile.PolicyError, match="already decides for another FrozenModule"):
        frzcompile.optimize(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)), (x,), policy=policy,
                            total_steps=10_000)
    fm.release()
    frzcompile.optimize(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)), (x,), policy=policy,
                        total_steps=10_000)


@pytest.mark.parametrize("make", [
    lambda: frzcompile.policies.Linear(total_steps=float("nan")), lambda: frzcompile.policies.Linear(total_steps="10"),
    lambda: frzcompile.policies.Linear(freeze_start="0.5"), lambda: frzcompile.policies.Linear(freeze_level=None),
    lambda: frzcompile.AutoFreeze(interval=2.7), lambda: frzcompile.AutoFreeze(interval="10"),
    lambda: frzcompile.AutoFreeze(interval=None), lambda: frzcompile.AutoFreeze(percentile="50"),
    lambda: frzcompile.SmartFRZ(interval="10"), lambda: frzcompile.SmartFRZ(votes=2.5),
    lambda: frzcompile.SmartFRZ(threshold="0.5"), lambda: frzcompile.SmartFRZ(min_weights=None),
    lambda: frzcompile.ALaST(budget="0.5"), lambda: frzcompile.ALaST(rate=float("nan")),
    lambda: frzcompile.ALaST(k=True), lambda: frzcompile.ALaST(k=2.5), lambda: frzcompile.ALaST(min_budget="0.3"),
    lambda: Safeguard(window=0), lambda: Safeguard(min_gap=2.5), lambda: Safeguard(span="100"),
    lambda: Safeguard(lr_drop=2.0), lambda: Safeguard(tolerance=-0.1)])
def test_policy_options_of_the_wrong_kind_are_refused_by_name(make):
    """NaN total_steps froze every unit after one step; strings and None failed with bare TypeErrors; 2.7 became 2
    and True became 1 (SmartFRZ's interval and votes, ALaST's k and the safety rules' settings did too, or failed
    later: a window of 0 divided by zero at the first decision)."""
    with pytest.raises(frzcompile.PolicyError, match="must be"):
        make()


def test_optimize_total_steps_of_the_wrong_kind_is_a_config_error():
    """optimize()'s own option, not a policy's: a ConfigError (True became 1)."""
    for bad in (True, 2.5, float("inf")):  # (inf: the linear ramp never began)
        with pytest.raises(frzcompile.ConfigError, match="optimize: total_steps must be an integer"):
            frzcompile.optimize(torch.nn.Sequential(torch.nn.Linear(8, 2)), (torch.randn(2, 8),), policy="linear",
                                total_steps=bad)


def test_policy_options_take_numpy_numbers():
    import numpy as np

    assert AutoFreeze(interval=np.int64(10), percentile=np.float32(50)).interval == 10
    assert Linear(total_steps=np.int64(100)).total_steps == 100 and repr(Linear(total_steps=100)).count("100.0") == 0
    with pytest.raises(frzcompile.PolicyError):
        AutoFreeze(interval=float("inf"))


def test_autofreeze_passes_over_a_unit_frozen_by_hand_before_optimize():
    """A stem frozen by hand has no gradient norm, hence no change rate: AutoFreeze stopped at it and froze nothing."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    model[0].requires_grad_(False)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    fm = frzcompile.optimize(model, (x,), policy=frzcompile.AutoFreeze(interval=5, percentile=100))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(30):
        torch.nn.functional.cross_entropy(fm(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert "2" in fm.frozen and "0" not in fm.frozen and not model[0].weight.requires_grad


def test_unfreezing_a_unit_whose_parameters_were_frozen_before_says_they_stay_frozen():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    model[0].requires_grad_(False)  # as an earlier FrozenModule of this model leaves it
    fm = frzcompile.optimize(model, (torch.randn(2, 8),), policy="manual")
    fm.freeze("0")
    with pytest.warns(UserWarning, match="stay frozen"):
        fm.unfreeze("0")
    assert not model[0].weight.requires_grad and fm.frozen == ()


def test_a_custom_policy_reads_the_loss():
    """The README says the view gives a policy the losses: a Policy subclass got None at every step (the signal
    was collected only for policies with safety rules)."""
    class Watching(frzcompile.Policy):
        def decide(self, view):
            self.seen = view.losses()

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    policy = Watching()
    fm = frzcompile.optimize(model, (torch.randn(4, 4),), optimizer=opt, policy=policy)
    x, y = torch.randn(4, 4), torch.tensor([0, 1, 0, 1])
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(fm(x), y)
        loss.backward()
        fm.observe_loss(loss)
        opt.step()
        opt.zero_grad()
    assert len(policy.seen) == 3 and all(v is not None for v in policy.seen)
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    assert not frzcompile.optimize(other, (torch.randn(4, 4),), policy="linear",
                                   total_steps=4)._loss.enabled  # (the shipped policies that read none skip it)


def test_long_gradient_accumulation_gets_no_missing_step_warning():
    """128 micro-batches per optimizer step: "100 training calls and no optimizer step seen" was warned at every
    step, though each was counted (and its advice, fm.step() as well, would count them twice)."""
    from frzcompile.runtime.module import NO_STEP_WARNING_CALLS

    torch.manual_seed(0)
    x = torch.randn(4, 8)
    for given in (True, False):
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        fm = frzcompile.optimize(model, (x,), optimizer=opt if given else None, policy=Linear(total_steps=3))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for step in range(3):
                for _ in range(NO_STEP_WARNING_CALLS + 28):
                    fm(x).sum().backward()
                opt.step()
                opt.zero_grad()
        missing = [w for w in seen if issubclass(w.category, frzcompile.NoStepWarning)]
        assert fm.step_count == 3 and len(missing) == (0 if given else 1)  # (before the first step: unknowable)


def test_fm_step_after_zero_grad_warns_and_autofreeze_ignores_non_finite_norms():
    """A hand-written update with fm.step() after zero_grad(): AutoFreeze read zero gradients and never froze,
    silently. A step a fused optimizer counted while its GradScaler skipped it gave NaN norms, and AutoFreeze
    skipped its decisions."""
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    fm = frzcompile.optimize(model, (x,), policy=AutoFreeze(interval=5))
    fm(x).sum().backward()
    for p in model.parameters():
        p.grad = None
    with pytest.warns(frzcompile.NoStepWarning, match="before zero_grad"):
        fm.step()
    quiet = frzcompile.optimize(copy.deepcopy(model), (x,), policy=Linear(total_steps=10))  # (reads no gradient)
    with warnings.catch_warnings():
        warnings.simplefilter("error", frzcompile.NoStepWarning)
        quiet.step()
    policy = AutoFreeze(interval=2)
    view = FakeView(["a", "b"], lambda s: {"a": float("nan") if s == 1 else 1.0 + s, "b": 2.0})
    for _ in range(2):
        view.step += 1
        policy.decide(view)
    assert policy._previous == {"a": pytest.approx(3.0), "b": pytest.approx(2.0)}  # (a's NaN at step 1 left out)


def test_a_policy_is_named_after_its_class_and_linear_shows_the_runs_total_steps():
    """A Policy subclass without a name read "the policy policy" in fm.loss_source() and explain; Linear's total
    steps given to optimize() (or by a callback) showed as total_steps=None in explain and repr."""
    class EveryOther(frzcompile.Policy):
        reads_loss = False

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    fm = frzcompile.optimize(model, (torch.randn(2, 3),), policy=EveryOther())
    assert fm.policy.name == "EveryOther" and "the EveryOther policy" in fm.loss_source()
    fm.release()
    fm = frzcompile.optimize(model, (torch.randn(2, 3),), policy="linear", total_steps=40)
    assert "Linear(total_steps=40," in repr(fm.policy) and "total_steps=40" in str(frzcompile.explain(fm))
    assert repr(Linear()).startswith("Linear(total_steps=None,")

    class Later(Linear):  # a subclass of a shipped policy keeps its name (its saved freeze states load)
        pass

    assert Later.name == "linear"


def test_policies_leave_every_task_head_training():
    """A trunk with two task heads, one task per step: a policy froze the trunk and head_a (only the last unit,
    head_b, was kept), and the next task-a step failed in the user's backward ("element 0 of tensors does not
    require grad"). A unit with no unit downstream that trains (each head) is never frozen by a policy."""
    class TwoTasks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32))
            self.head_a, self.head_b = torch.nn.Linear(32, 5), torch.nn.Linear(32, 1)

        def forward(self, x, task=None):
            h = torch.relu(self.trunk(x))
            return (self.head_a(h), self.head_b(h)) if task is None else getattr(self, f"head_{task}")(h)

    torch.manual_seed(0)
    model, x = TwoTasks(), torch.randn(8, 12)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    fm = frzcompile.optimize(model, (x,), optimizer=opt, policy=Linear(20, freeze_start=0.3))
    assert fm.units == ["trunk", "head_a", "head_b"] and fm._view.freezable == ["trunk"]
    for step in range(20):
        task = "ab"[step % 2]
        fm(x, task=task).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert fm.frozen == ("trunk",)


def test_heads_combined_inside_the_model_stay_heads():
    """Code summing two heads' losses inside the forward joined the later head's unit, so the earlier head looked
    upstream of it: a policy froze BertForPreTraining's masked-LM head (its labels given to optimize()), and CLIP's
    image tower to its projection. The head rule reads which unit's modules read what (`UnitGraph.feeds`): glue on
    the way to the outputs feeds no unit. Branches that glue combines before a module reads them still feed it."""
    class TwoLosses(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(6, 8), torch.nn.Linear(6, 8)  # two branches, summed into c
            self.c = torch.nn.Linear(8, 8)
            self.head_a, self.head_b = torch.nn.Linear(8, 3), torch.nn.Linear(8, 1)

        def forward(self, x, y=None, z=None):
            h = torch.relu(self.c(self.a(x) + self.b(x)))
            out_a, out_b = self.head_a(h), self.head_b(h)
            if y is None:
                return out_a, out_b
            return torch.nn.functional.cross_entropy(out_a, y) + (out_b.squeeze(1) - z).square().mean()

    torch.manual_seed(0)
    model, x, y, z = TwoLosses(), torch.randn(8, 6), torch.randint(0, 3, (8,)), torch.randn(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fm = frzcompile.optimize(model, (x, y, z), optimizer=opt, policy=Linear(8, freeze_start=0.0))
    graph = fm.unit_graph
    assert graph.dag.has_edge("head_a", "head_b") and not graph.feeds.has_edge("head_a", "head_b")  # (the sum)
    assert fm._view.freezable == ["a", "b", "c"]
    assert "never frozen by the policy: head_a, head_b (no unit downstream" in str(frzcompile.explain(fm))
    for _ in range(8):
        before = model.head_a.weight.detach().clone()
        fm(x, y, z).backward()
        opt.step()
        opt.zero_grad()
        assert not torch.equal(model.head_a.weight, before)  # (the head trains at every step)
    assert fm.frozen == ("a", "b", "c")

    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32)
    ids = torch.randint(0, 64, (2, 6))
    fm = frzcompile.optimize(transformers.BertForPreTraining(config), example_kwargs=dict(
        input_ids=ids, labels=ids, next_sentence_label=torch.zeros(2, dtype=torch.long)), policy="linear", total_steps=10)
    assert "cls.predictions" in fm.units and "cls.predictions" not in fm._view.freezable
    assert fm._view.freezable[-1] == "bert.pooler"


@pytest.mark.parametrize("method", ["symbolic_trace", "export"])
def test_units_see_data_written_in_place(method):
    """Branch outputs accumulated in place (`acc.add_(branch(h))`, `buf[:, :8] = a(x)`) and then read by a later
    unit: the trace records the read on the tensor's node from before the writes, so the unit graphs had no edge
    from the branches. They looked like heads, and a policy never froze them (half the units of a probe's model);
    explain called the reader part of the frozen prefix while the branches trained."""
    D = 8

    def block():
        return torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.ReLU(), torch.nn.Linear(D, D))

    class Branches(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.branches, self.mix = block(), torch.nn.ModuleList([block() for _ in range(2)]), block()
            self.a, self.b, self.c = block(), block(), torch.nn.Linear(2 * D, D)
            self.head = torch.nn.Linear(2 * D, 3)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            acc = torch.zeros_like(h)
            for branch in self.branches:
                acc.add_(branch(h))
            buf = torch.cat([torch.zeros_like(x), torch.zeros_like(x)], 1)
            buf.narrow(1, 0, D).copy_(self.a(x))  # (writes into views; export records `buf[:, :D] = ...` so)
            buf.narrow(1, D, D).add_(self.b(x))
            return self.head(torch.cat([self.mix(acc), self.c(buf)], 1))

    torch.manual_seed(0)
    model, x = Branches(), torch.randn(4, D)
    reference = copy.deepcopy(model)
    fm = frzcompile.optimize(model, (x,), policy="manual", capture_method=method)
    graph = fm.unit_graph
    for reader, writers in (("mix", ("branches.0", "branches.1")), ("c", ("a", "b"))):
        for w in writers:
            assert nx_has_path(graph.feeds, w, reader) and nx_has_path(graph.dag, w, reader), (method, w, reader)
    assert set(fm._view.freezable) == set(fm.units) - {"head"}
    fm.freeze("stem", "mix", "c")
    assert fm.frozen_prefix == ("stem",)  # (mix and c read branches that train)
    for name in ("stem", "mix", "c"):
        reference.get_submodule(name).requires_grad_(False)
    fm(x).square().sum().backward()
    reference(x).square().sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad))


@pytest.mark.parametrize("method", ["symbolic_trace", "export"])
def test_writes_into_a_buffer_and_into_separate_slices(method):
    """A buffer written in place and read later (symbolic_trace reads a buffer anew at each use: the write and the
    read were different nodes, and unit a fed nothing), and two writes into separate slices of one tensor (each
    replaces what it writes: the second does not read the first, so b does not depend on a)."""
    D = 8

    class Writes(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = torch.nn.Linear(D, D), torch.nn.Linear(D, D), torch.nn.Linear(D, D)
            self.d, self.head = torch.nn.Linear(2 * D, D), torch.nn.Linear(2 * D, 3)
            self.register_buffer("memory", torch.zeros(4, D))

        def forward(self, x):
            self.memory.copy_(self.a(x))
            h = self.c(self.memory + x)
            buf = torch.cat([torch.zeros_like(x), torch.zeros_like(x)], 1)
            buf.narrow(1, 0, D).copy_(self.b(x))
            buf.narrow(1, D, D).copy_(h)
            return self.head(torch.cat([h, self.d(buf)], 1))

    torch.manual_seed(0)
    fm = frzcompile.optimize(Writes(), (torch.randn(4, D),), policy="manual", capture_method=method)
    graph = fm.unit_graph
    assert graph.dag.has_edge("a", "c") and graph.feeds.has_edge("a", "c")
    assert graph.feeds.has_edge("b", "d") and graph.feeds.has_edge("c", "d")
    assert not nx_has_path(graph.dag, "b", "c") and not nx_has_path(graph.dag, "c", "b")
    fm.freeze("b")
    assert fm.frozen_prefix == ("b",)


def nx_has_path(dag, a, b) -> bool:
    import networkx as nx
    return nx.has_path(dag, a, b)
