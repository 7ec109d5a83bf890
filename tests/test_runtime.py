"""Runtime behaviour: modes, optimizer surgery, plan changes, checkpoint and resume."""
import copy
import warnings

import pytest
import torch
from torch import nn

import frzcompile
from frzcompile import zoo
from frzcompile.passes.freeze import REGION
from tests.conftest import train_losses


def _cnn():
    torch.manual_seed(0)
    return zoo.SmallCNN(width=8, dropout=0.2), torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))


def test_frozen_units_stay_in_eval_through_train():
    model, x, _ = _cnn()
    fm = frzcompile.optimize(model, (x,))
    fm.freeze("features.0")
    fm.train()
    model.train()  # the user may also call train() on the original model
    frozen_mods = list(model.features[0].modules())
    bn = model.features[0][1]
    before = (bn.running_mean.clone(), bn.num_batches_tracked.clone())
    fm(x)
    assert all(not m.training for m in frozen_mods)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.num_batches_tracked, before[1])
    assert model.features[1][1].num_batches_tracked.item() == 1  # a trainable BatchNorm still updates
    fm.unfreeze("features.0")
    assert all(m.training for m in frozen_mods)
    fm(x)
    assert bn.num_batches_tracked.item() == 1


def test_a_module_frozen_as_a_whole_takes_its_dropout_to_eval_and_back():
    """`fm.freeze("encoder")` freezes every unit under it; the dropout beside its blocks (no parameters, so in no
    unit) stayed in train mode, where `encoder.requires_grad_(False); encoder.eval()` by hand turns it off.
    Units named one by one (a policy's plan) put only their own modules in eval."""
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Linear(6, 16)
            self.drop = nn.Dropout(0.5)
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(2)])

        def forward(self, x):
            h = self.drop(self.tok(x))
            for b in self.blocks:
                h = b(h)
            return h

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = Encoder()
            self.drop = nn.Dropout(0.5)  # the root's: stays in train mode (the head trains)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.drop(self.encoder(x)))

    torch.manual_seed(0)
    model, x = Model(), torch.randn(8, 6)
    ref = copy.deepcopy(model)
    fm = frzcompile.optimize(model, (x,), policy="manual")
    fm.freeze("encoder")
    ref.encoder.requires_grad_(False)
    ref.encoder.eval()
    model.train()
    torch.manual_seed(1)
    out = fm(x)
    torch.manual_seed(1)
    torch.testing.assert_close(out, ref(x), rtol=0, atol=0)
    assert not model.encoder.drop.training and not model.encoder.training and model.drop.training
    state = fm.freeze_state_dict()
    fm.unfreeze("encoder.blocks.1")  # part of it thawed: the encoder is no longer frozen as a whole
    assert model.encoder.drop.training and model.encoder.training and model.encoder.blocks[1].training
    assert not model.encoder.tok.training and not model.encoder.blocks[0][0].training
    fm.freeze("encoder.blocks.1")  # its units by name, as a policy's plan names them: only their modules
    assert model.encoder.drop.training and not model.encoder.blocks[1][0].training
    fm.load_freeze_state_dict(state)  # the freeze state keeps what was frozen as a whole
    assert not model.encoder.drop.training


def test_freezing_every_unit_is_allowed_when_a_module_added_after_optimize_trains():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 4)
            self.extra = nn.ModuleList()  # a head the user appends later

        def forward(self, x):
            h = self.head(torch.relu(self.a(x)))
            for m in self.extra:
                h = m(h)
            return h

    torch.manual_seed(0)
    model, x = Net(), torch.randn(3, 4)
    fm = frzcompile.optimize(model, (x,), policy="manual")
    with pytest.raises(frzcompile.PlanError, match="leaves nothing to train"):
        fm.freeze(*fm.units)
    model.unused = nn.Linear(4, 4)  # (not read, but there at optimize(): it does not count)
    fm.release()
    fm = frzcompile.optimize(model, (x,), policy="manual")
    with pytest.raises(frzcompile.PlanError, match="leaves nothing to train"):
        fm.freeze(*fm.units)
    model.extra.append(nn.Linear(4, 2))
    fm.freeze(*fm.units)  # by hand: everything but the new head frozen, which trains
    fm(x).sum().backward()
    assert model.extra[0].weight.grad is not None and model.a.weight.grad is None


def test_a_teacher_frozen_by_hand_may_freeze_every_unit_and_is_served_from_the_cache():
    """A distillation teacher frozen the usual way (requires_grad_(False), then optimize() to cache its forward):
    no freeze leaves anything less to train, so none is refused ("leaves nothing to train" was, for every one),
    the cache serves the whole model exactly, and explain calls the units it has not frozen "frozen by hand"."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    teacher.requires_grad_(False)
    ref = copy.deepcopy(teacher)
    x = torch.randn(16, 16)
    fm = frzcompile.optimize(teacher, (x,), policy="manual",
                             cache=frzcompile.CacheConfig(check_cost=False, min_hit_rate=0))
    fm.freeze(fm.units[0])
    statuses = {r["unit"]: r["status"] for r in frzcompile.explain(fm).rows}
    assert statuses == {"0": "frozen-prefix", "2": "frozen by hand", "4": "frozen by hand"}
    fm.freeze(*fm.units)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(fm(x), ref(x), rtol=0, atol=0)
    assert fm.cache.stats["hits"] == fm.cache.stats["lookups"] > 0


def test_eval_mode_matches_eager_eval():
    model, x, _ = _cnn()
    fm = frzcompile.optimize(model, (x,))
    fm.freeze("features.0", "features.1")
    fm.eval()
    ref = copy.deepcopy(model).eval()
    torch.testing.assert_close(fm(x), ref(x))
    assert not model.training and not model.head.training  # fm.eval() is the model's eval()


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_frozen_parameters_never_move(opt_name):
    model, x, y = _cnn()
    params = list(model.parameters())
    opt = (torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1) if opt_name == "sgd"
           else torch.optim.AdamW(params, lr=0.01, weight_decay=0.1))
    fm = frzcompile.optimize(model, (x,), optimizer=opt)

    def train_step():
        nn.functional.cross_entropy(fm(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # zero-filled gradients must not sneak momentum or decay in

    for _ in range(3):
        train_step()
    frozen_params = list(model.features[0].parameters())
    assert all(p in opt.state for p in frozen_params)
    fm.freeze("features.0")
    assert all(p not in opt.state for p in frozen_params)  # optimizer state freed
    snapshot = [p.detach().clone() for p in frozen_params]
    trainable_before = model.head.weight.detach().clone()
    for _ in range(5):
        train_step()
    for p, s in zip(frozen_params, snapshot):
        assert torch.equal(p, s)
        assert p.grad is None
        assert p not in opt.state
    assert not torch.equal(model.head.weight, trainable_before)

    fm.unfreeze("features.0")
    assert all(p.requires_grad for p in frozen_params)
    train_step()
    assert any(not torch.equal(p, s) for p, s in zip(frozen_params, snapshot))
    assert all(p in opt.state for p in frozen_params)  # fresh state after unfreezing
    if opt_name == "adamw":
        assert opt.state[frozen_params[0]]["step"].item() == 1


@pytest.mark.parametrize("how", ["thaw", "thaw, another optimizer first", "requires_grad by hand"])
def test_a_thaw_under_fused_sgd_trains_as_from_fresh_momentum(how):
    """torch's fused SGD needs a momentum buffer for all of a group's parameters or for none: a parameter whose
    buffer a freeze dropped crashed the next step once it trained again (a thaw, with or without another
    optimizer stepping first, or requires_grad_(True) by hand). It now steps as the for-loop SGD does from fresh
    state (the README's one documented difference from freezing by hand)."""
    def run(fused):
        model, x, y = _cnn()
        head = list(model.head.parameters())
        body = [p for p in model.parameters() if all(p is not q for q in head)]
        sgd = torch.optim.SGD(body if "another" in how else model.parameters(), lr=0.05, momentum=0.9,
                              fused=fused, foreach=None if fused else False)
        opts = ([torch.optim.Adam(head, lr=1e-3)] if "another" in how else []) + [sgd]
        fm = frzcompile.optimize(model, (x,), optimizer=opts, policy="manual")
        for step in range(8):
            if step == 2:
                fm.freeze("features.0")
            if step == 5:
                if how == "requires_grad by hand":
                    model.features[0].requires_grad_(True)
                else:
                    fm.unfreeze("features.0")
            nn.functional.cross_entropy(fm(x), y).backward()
            for o in opts:
                o.step()
                o.zero_grad()
        return model
    fused, loop = run(True), run(False)
    for (name, a), b in zip(fused.named_parameters(), loop.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_optimizer_state_loaded_for_frozen_parameters_is_dropped_at_the_next_step():
    """A checkpoint's optimizer state saved before a waiting plan applied, loaded after the freeze state or into an
    optimizer made after optimize(), gave frozen parameters their Adam moments back for the rest of the run (and
    to a later thaw, which must start fresh)."""
    model, x, y = _cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    fm = frzcompile.optimize(model, (x,), optimizer=opt, policy="manual")

    def step(o):
        nn.functional.cross_entropy(fm(x), y).backward()
        o.step()
        o.zero_grad()
    step(opt)
    saved = copy.deepcopy(opt.state_dict())  # state for every parameter
    fm.freeze("features.0")
    frozen = list(model.features[0].parameters())
    for o in (opt, torch.optim.Adam(model.parameters(), lr=1e-3)):  # reloaded; made later and loaded
        o.load_state_dict(saved)
        o.load_state_dict(saved)  # twice (a check by the state dict's id missed it: CPython reuses the address)
        assert all(p in o.state for p in frozen)
        step(o)
        assert not any(p in o.state for p in frozen) and len(o.state) > 0
        assert all(not p.requires_grad and p.grad is None for p in frozen)


def test_plan_change_shows_in_the_analysis_graph_and_takes_effect_at_once():
    model, x, y = _cnn()
    fm = frzcompile.optimize(model, (x,))
    g0 = fm.graph_module()
    assert not hasattr(g0, REGION)
    fm.freeze("features.0")
    g1 = fm.graph_module()
    assert g1 is not g0 and hasattr(g1, REGION)
    nn.functional.cross_entropy(fm(x), y).backward()
    assert model.features[0][0].weight.grad is None
    fm.unfreeze("features.0")
    nn.functional.cross_entropy(fm(x), y).backward()
    assert model.features[0][0].weight.grad is not None  # the unfrozen unit trains again at once
    assert fm.analysis.builds == 2 and fm.graph_module() is g0  # the earlier plan's analysis is reused


def test_optimizer_hook_drives_policy_and_fm_step_without_optimizer():
    model, x, y = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    fm = frzcompile.optimize(model, (x,), optimizer=opt, policy="linear", total_steps=10)
    seen = []
    for _ in range(10):
        nn.functional.cross_entropy(fm(x), y).backward()
        opt.step()
        opt.zero_grad()
        seen.append(len(fm.frozen))
    # Composer defaults: nothing before half of training, then a linear ramp, never the last unit
    assert seen[:4] == [0, 0, 0, 0] and seen == sorted(seen) and seen[-1] == len(fm.units) - 1
    assert fm.plan.since["features.0"] == 6

    model2, x2, _ = _cnn()
    fm2 = frzcompile.optimize(model2, (x2,), policy=frzcompile.Linear(total_steps=4, freeze_start=0.0))
    for _ in range(4):
        fm2.step()
    assert len(fm2.frozen) == len(fm2.units) - 1


def test_a_dry_run_step_on_swapped_in_clones_is_not_a_training_step():
    """torch.optim.swap_in_optimizer_params_and_state (torch 2.13) runs a step on clones of the parameters and
    state, leaving the model alone: it was counted as a training step (the policy decided on it, and a traced
    step's graph held the policy's weight sampling), because which optimizer holds the model's parameters was
    remembered by their number only."""
    from torch.optim import swap_in_optimizer_params_and_state
    from torch.utils import _pytree as pytree

    model, x, y = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    fm = frzcompile.optimize(model, (x,), optimizer=opt, policy="manual")
    nn.functional.cross_entropy(fm(x), y).backward()
    opt.step()
    clones = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        clones[n].grad = p.grad.clone()
    before = [p.detach().clone() for p in model.parameters()]
    with swap_in_optimizer_params_and_state(opt, clones, pytree.tree_map_only(torch.Tensor, torch.clone,
                                                                                opt.state_dict())):
        opt.step()
    assert fm.step_count == 1 and all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    opt.step()  # the model's own again
    assert fm.step_count == 2


def _train(fm, opt, data, steps):
    return train_losses(fm, opt, (data[i % len(data)] for i in range(steps)))


def _setup(policy):
    torch.manual_seed(0)
    model = zoo.ResNet(depths=(1, 1, 1), width=8)
    data = [(torch.randn(8, 1, 12, 12), torch.randint(0, 10, (8,))) for _ in range(4)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    fm = frzcompile.optimize(model, (data[0][0],), optimizer=opt, policy=policy)
    return model, opt, fm, data


def test_checkpoint_resume_gives_the_same_continuation(tmp_path):
    policy = lambda: frzcompile.AutoFreeze(interval=3, percentile=60)  # noqa: E731
    _, opt, fm, data = _setup(policy())
    torch.manual_seed(7)
    full = _train(fm, opt, data, 18)
    assert fm.frozen, "the test needs freeze events"

    _, opt_a, fm_a, _ = _setup(policy())
    torch.manual_seed(7)
    first = _train(fm_a, opt_a, data, 8)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": fm_a.state_dict(), "opt": opt_a.state_dict(), "frz": fm_a.freeze_state_dict(),
                "rng": torch.get_rng_state()}, path)

    _, opt_b, fm_b, _ = _setup(policy())
    ckpt = torch.load(path, weights_only=False)
    fm_b.load_state_dict(ckpt["model"])
    fm_b.load_freeze_state_dict(ckpt["frz"])
    opt_b.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    rest = _train(fm_b, opt_b, data, 10)
    assert first + rest == full
    assert fm_b.frozen == fm.frozen and fm_b.plan.since == fm.plan.since


def test_a_model_pickled_mid_run_thaws_after_its_freeze_state_is_loaded():
    import pickle

    torch.manual_seed(0)
    model = zoo.ResNet(depths=(1, 1, 1), width=8)
    model.layer1[0].conv1.weight.requires_grad_(False)  # frozen by the user before optimize(): stays frozen
    data = [(torch.randn(8, 1, 12, 12), torch.randint(0, 10, (8,))) for _ in range(4)]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    fm = frzcompile.optimize(model, (data[0][0],), optimizer=opt, policy="manual")
    fm.freeze("conv1", "bn1", "layer1")
    _train(fm, opt, data, 2)
    copy, state = pickle.loads(pickle.dumps(fm.model)), fm.freeze_state_dict()  # as fm.__reduce_ex__ advises
    assert not copy.conv1.weight.requires_grad
    fm2 = frzcompile.optimize(copy, (data[0][0],), policy="manual")
    fm2.load_freeze_state_dict(state)
    fm2.unfreeze("conv1", "layer1")
    assert copy.conv1.weight.requires_grad and copy.layer1[0].conv2.weight.requires_grad
    assert not copy.layer1[0].conv1.weight.requires_grad and not copy.bn1.weight.requires_grad
    fm.unfreeze("conv1", "layer1")
    assert [p.requires_grad for p in copy.parameters()] == [p.requires_grad for p in model.parameters()]


def test_freeze_state_rejects_another_model():
    _, _, fm, _ = _setup("manual")
    state = fm.freeze_state_dict()
    state["units"] = state["units"][:-1]
    with pytest.raises(frzcompile.PlanError, match="different model"):
        fm.load_freeze_state_dict(state)
    with pytest.raises(frzcompile.PlanError, match="not a frzcompile freeze state"):
        fm.load_freeze_state_dict({"frozen": []})
    state = fm.freeze_state_dict()
    state["policy"]["name"] = "linear"
    with pytest.raises(frzcompile.PlanError, match=r"optimize with policy='linear'.*fm.freeze\(\*state\['frozen'\]\)"):
        fm.load_freeze_state_dict(state)


def test_to_dtype_keeps_graph_in_sync():
    from tests.conftest import make_case

    model, args, kwargs = make_case("bert")
    fm = frzcompile.optimize(model, args, example_kwargs=kwargs)
    fm.freeze(fm.units[0])
    fm.double()
    fm.eval()
    out = fm(*args, **kwargs).logits
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, model(*args, **kwargs).logits)


def test_a_resumed_freeze_state_survives_a_load_with_assign():
    """load_freeze_state_dict set what a thaw gives back on the parameters, not by name: after a
    load_state_dict(assign=True) (new parameter objects) on a model copied mid-run, a thaw left them frozen."""
    import copy as copy_

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 2))
    x = torch.randn(4, 8)
    fm = frzcompile.optimize(model, (x,), policy="manual")
    fm.freeze("0")
    weights, state = copy_.deepcopy(fm.state_dict()), fm.freeze_state_dict()
    clone = copy_.deepcopy(model)  # copied mid-run: its first layer does not require grad
    fm2 = frzcompile.optimize(clone, (x,), policy="manual")
    fm2.load_freeze_state_dict(state)
    clone.load_state_dict(weights, assign=True)
    fm2(x)
    fm2.unfreeze("0")
    assert clone[0].weight.requires_grad and clone[0].bias.requires_grad



@pytest.fixture
def swap_on_conversion():
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    yield
    torch.__future__.set_swap_module_params_on_conversion(previous)


def _no_weak_references(model):
    import weakref

    return [n for n, p in model.named_parameters() if weakref.getweakrefs(p)]


@pytest.mark.parametrize("how", ["manual", "cache", "sparsity", "backend"])
def test_parameters_stay_swappable(how, swap_on_conversion):
    """With torch.__future__.set_swap_module_params_on_conversion(True) (and for tensor subclasses such as
    DTensor, always) nn.Module._apply and load_state_dict swap each parameter's contents with
    torch.utils.swap_tensors, which refuses a tensor that has a weak reference: frzcompile kept one on every
    parameter (its per-parameter flags, the compiled graphs' records), so fm.double(), share_memory() and
    load_state_dict failed after optimize(), even after fm.release()."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    ref = copy.deepcopy(model)
    x = torch.randn(6, 8)
    if how == "backend":
        net = torch.compile(model, backend="frzcompile")
    else:
        net = frzcompile.optimize(model, (x,), policy="manual", cache=how == "cache",
                                  sparsity=0.5 if how == "sparsity" else None)
        net.freeze("0")
        ref[0].requires_grad_(False)
    for _ in range(2):
        net(x).sum().backward()
    assert not _no_weak_references(model)
    net.double()
    ref.double()
    model.load_state_dict(model.state_dict())
    net.share_memory()
    assert model[0].weight.dtype == torch.float64 and model[0].weight.is_shared()
    if how == "sparsity":  # the gradient masks' hooks, dead after a swap, are registered again
        model.zero_grad()
        net(x.double()).sum().backward()
        masked = [(m.weight.grad, m.weight_mask) for m in model.modules() if hasattr(m, "weight_mask")]
        assert masked and all(bool((g[mask == 0] == 0).all()) for g, mask in masked if g is not None)
    if how != "sparsity":  # (its masks make the weights differ from ref's: only the conversion is checked)
        xd = x.double().requires_grad_()
        rx = x.double().requires_grad_()
        model.zero_grad()
        net(xd).sum().backward()
        ref(rx).sum().backward()
        exact = {} if how == "backend" else {"rtol": 0, "atol": 0}  # (the backend's graphs: Inductor's rounding)
        torch.testing.assert_close(xd.grad, rx.grad, **exact)
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            assert (p.grad is None) == (q.grad is None), n
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, **exact)
    if how != "backend":
        net.unfreeze("0")
        assert model[0].weight.requires_grad
        net.release()
        model.float()
        assert model[0].weight.dtype == torch.float32


def test_a_replaced_parameter_is_not_kept_alive():
    """The plan keeps each parameter beside its flags (no weak reference, see above); one that left the model (a
    layer swapped out) is forgotten at the next call, not kept alive."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    fm = frzcompile.optimize(model, (x,), policy="manual")
    fm.freeze("0")
    old = weakref.ref(model[0].weight)
    model[0] = nn.Linear(4, 8)
    fm(x).sum().backward()
    gc.collect()
    assert old() is None
    assert not model[0].weight.requires_grad and model[2].weight.grad is not None  # (frozen as its predecessor)


def test_a_hugging_face_model_captured_by_export_stays_swappable(swap_on_conversion):
    """torch.export (the capture of most Hugging Face models) left weak references to every parameter: in a
    module-level map of torch's, until the next export, and in its fake mode's table of the tensors it converted,
    which the captured graph keeps. `.double()` under swap_module_params_on_conversion failed (57 references on a
    tiny BERT)."""
    import weakref

    model = zoo.tiny_bert(num_labels=3, layers=2)
    ids = torch.randint(1, 100, (4, 9))
    fm = frzcompile.optimize(model, example_kwargs={"input_ids": ids}, policy="manual")
    assert fm.capture_method == "export"
    fm.freeze("bert.embeddings")
    fm(input_ids=ids).logits.sum().backward()
    assert not [n for n, p in model.named_parameters() if weakref.getweakrefs(p)]
    fm.double()
    assert model.bert.encoder.layer[0].output.dense.weight.dtype == torch.float64
    assert fm(input_ids=ids).logits.dtype == torch.float64


def test_long_loops_keep_bounded_records():
    """A loop whose steps are never counted (an update by hand, no fm.step()) kept one loss reading per call for
    good (5,000 tensors after 5,000 calls, a probe's count); a loop toggling units by hand, one plan change each."""
    from frzcompile.runtime.loss import MAX_READINGS
    from frzcompile.runtime.plan import MAX_CHANGES

    torch.manual_seed(0)
    model, x = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)), torch.randn(3, 4)
    fm = frzcompile.optimize(model, (x,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", frzcompile.NoStepWarning)
        for _ in range(MAX_READINGS + 20):
            fm(x).square().mean().backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.01 * p.grad
                    p.grad = None
    assert fm.step_count == 0 and len(fm._loss._gradients) == MAX_READINGS
    fm.step()
    assert fm._loss._gradients == [] and len(fm.losses()) == 1
    for _ in range(MAX_CHANGES // 2 + 3):
        fm.freeze("0")
        fm.unfreeze("0")
    assert len(fm.plan.changes) == MAX_CHANGES and fm.plan.change_count == MAX_CHANGES + 6
    assert f"plan changes: {MAX_CHANGES + 6}" in str(frzcompile.explain(fm))
