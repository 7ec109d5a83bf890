"""Every way compiled behaviour could differ from eager here, recorded as executable tests.

Each test states what plain `torch.compile` does on this torch version and what frzcompile's compiled path
(`optimize(..., compile=...)`) does about it. A test that pins plain torch.compile behaviour failing after a
torch upgrade means the footgun changed: update the test and the README's notes.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

import frzcompile
from frzcompile import backend

OPTIONS = {"inner": "aot_eager"}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5))
        self.mid = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.mid(self.stem(x)))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def x():
    return torch.randn(8, 6, generator=torch.Generator().manual_seed(0))


def graphs(module):
    """The graphs compiled for a FrozenModule (its own log) or a plain compiled model."""
    return list(module.compiled.log) if isinstance(module, frzcompile.FrozenModule) else backend.graphs_for(module)


def reasons(module):
    records = graphs(module)
    return [backend.recompile_reason(r, records) for r in records]


def make_fm(x, **options):
    torch.manual_seed(0)
    return frzcompile.optimize(Net(), (x,), policy="manual", compile=frzcompile.CompileConfig(**{**OPTIONS, **options}))


def test_requires_grad_toggle_after_compile(x):
    # Plain torch.compile: on this torch version Dynamo guards on requires_grad of parameters and recompiles
    # (pytorch/pytorch#139476 was a silent-staleness bug here on earlier versions).
    model = Net()
    compiled = torch.compile(model, backend="frzcompile", options=OPTIONS)
    compiled(x).sum().backward()
    for p in model.stem.parameters():
        p.requires_grad_(False)
        p.grad = None
    compiled(x).sum().backward()
    assert len(graphs(model)) == 2 and "freeze plan changed" in reasons(model)[1]
    assert model.stem[0].weight.grad is None and model.head.weight.grad is not None
    # frzcompile does not rely on that guard: each plan gets its own backend object, hence its own graphs.
    fm = make_fm(x)
    fm(x)
    fm.freeze("stem")
    fm(x)
    plans = [g.plan[0] for g in graphs(fm)]
    assert plans == [frozenset(), frozenset({"stem"})]


def test_unfreeze_after_compile_restores_gradients(x):
    fm = make_fm(x)
    fm.freeze("stem", "mid")
    fm(x).sum().backward()
    assert fm.model.mid[0].weight.grad is None
    fm.unfreeze("mid")
    fm(x).sum().backward()
    assert fm.model.mid[0].weight.grad is not None and fm.model.stem[0].weight.grad is None
    assert [len(g.frozen) for g in graphs(fm)] == [0, 6, 4][-len(graphs(fm)):]


def test_train_eval_toggles(x):
    fm = make_fm(x)
    ref = copy.deepcopy(fm.model)
    fm.freeze("stem")
    fm.eval()
    ref.eval()
    torch.testing.assert_close(fm(x), ref(x))
    fm.train()
    # the frozen unit stays in eval mode after train(): its dropout is off, its BatchNorm uses running stats
    assert not fm.model.stem.training and not fm.model.stem[3].training and fm.model.mid.training
    ref.train()
    ref.stem.eval()
    torch.testing.assert_close(fm(x), ref(x))
    assert reasons(fm) == ["first graph of this frame", "recompile: FrozenModule switched to train mode"]


def test_batchnorm_and_dropout_in_a_frozen_region(x):
    fm = make_fm(x)
    fm.freeze("stem")
    bn = fm.model.stem[1]
    stats = (bn.running_mean.clone(), bn.num_batches_tracked.clone())
    first, second = fm(x), fm(x)
    torch.testing.assert_close(first, second)  # frozen dropout is off: two calls agree
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.num_batches_tracked, stats[1])
    # Plain torch.compile with requires_grad=False only (not frzcompile's freezing) keeps eager semantics:
    # the BatchNorm keeps updating its statistics and the dropout stays random.
    model = Net()
    for p in model.stem.parameters():
        p.requires_grad_(False)
    compiled = torch.compile(model, backend="frzcompile", options=OPTIONS)
    before = model.stem[1].running_mean.clone()
    a, b = compiled(x), compiled(x)
    assert not torch.equal(model.stem[1].running_mean, before)
    assert not torch.allclose(a, b)


def test_recompile_limit_is_reported(x):
    fm = make_fm(x)
    with torch._dynamo.config.patch(recompile_limit=2):
        fm(x)
        fm.freeze("stem")
        with pytest.warns(backend.RecompileBudgetWarning, match="graph 0/1 uses the last of the 2 compiles"):
            fm(x)
        fm.freeze("mid")
        with pytest.warns(backend.RecompileBudgetWarning, match="compiled no graph for the plan"):
            out = fm(x)
    assert len(graphs(fm)) == 2
    assert "1 plan(s) got no compiled graph" in str(frzcompile.explain(fm))
    # still correct: that plan ran eagerly, with the frozen units frozen
    out.sum().backward()
    assert fm.model.mid[0].weight.grad is None and fm.model.head.weight.grad is not None
    # back to that plan again and again (a policy thawing and freezing): no new attempt, warning or backend each
    # time (each kept a backend object in torch for good, and its plan again in eager_plans)
    plans = [(), ("stem",), ("stem", "mid"), ("mid",), ("mid", "head"), ("head",)]  # more than the 4 kept
    with torch._dynamo.config.patch(recompile_limit=2), warnings.catch_warnings():
        warnings.simplefilter("ignore", backend.RecompileBudgetWarning)
        for frozen in plans:  # the first round: the plans beyond the limit run eagerly, each said once
            fm.unfreeze(*fm.units)
            if frozen:
                fm.freeze(*frozen)
            fm(x)
        eager = len(fm.compiled.eager_plans)
        warnings.simplefilter("error", backend.RecompileBudgetWarning)
        for frozen in plans * 2:
            fm.unfreeze(*fm.units)
            if frozen:
                fm.freeze(*frozen)
            fm(x)
    assert eager == len(fm.compiled.eager_plans) == len(set(fm.compiled.eager_plans)) >= 3


def test_recompile_limit_can_raise(x):
    fm = make_fm(x, on_budget="raise")
    with torch._dynamo.config.patch(recompile_limit=1):
        with pytest.raises(backend.RecompileBudgetError):
            fm(x)  # the first graph already uses the only compile the limit allows
    torch._dynamo.reset()  # Dynamo counts compiles per code object, across instances of Net
    fm = make_fm(x, on_budget="raise", recompile_budget=3)
    with torch._dynamo.config.patch(recompile_limit=2):
        fm(x)
        fm.freeze("stem")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fm(x)  # within the budget: no warning
        fm.freeze("mid")
        with pytest.raises(backend.RecompileBudgetError, match="recompile_limit"):
            fm(x)


def test_a_budget_below_dynamos_limit_reports_without_saying_compiles_stop(x):
    """CompileConfig(recompile_budget=2) under Dynamo's limit of 8 said "the last of the 2 compiles allowed ...
    further changes will make Dynamo run this frame eagerly" at each compile from the second, while they compiled."""
    torch._dynamo.reset()
    fm = make_fm(x, recompile_budget=2)
    with torch._dynamo.config.patch(recompile_limit=8):
        fm(x)
        fm.freeze("stem")
        with pytest.warns(backend.RecompileBudgetWarning, match=r"compile 2 of this frame, reaching "
                                                                r"CompileConfig\(recompile_budget=2\).* 8 times"):
            fm(x)
        fm.freeze("mid")
        with pytest.warns(backend.RecompileBudgetWarning, match="compile 3 of this frame, beyond"):
            fm(x)
    assert len(graphs(fm)) == 3  # (each plan compiled)


def test_hooks_added_after_compile(x):
    # Plain torch.compile ignores a forward hook registered after the first call on this torch version.
    model = Net()
    compiled = torch.compile(model, backend="frzcompile", options=OPTIONS)
    compiled(x)
    calls = []
    model.mid.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    compiled(x)
    assert calls == []
    # frzcompile's compiled path keys its graphs by the hooks too, so the hook is traced in and runs.
    fm = make_fm(x)
    fm(x)
    handle = fm.model.mid.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    fm(x)
    assert calls == [torch.Size([8, 16])]
    handle.remove()
    fm(x)
    assert len(calls) == 1
