"""fm.attach(): calls of the model itself run as fm(...) does (what the Trainer, Lightning and DDP integrations
rely on), and nothing else about the model changes."""
import copy
import inspect
import io

import pytest
import torch
from torch import nn

import frzcompile


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3), nn.Tanh()),
                         nn.Sequential(nn.Linear(16, 16), nn.Tanh()), nn.Linear(16, 3))


def test_model_calls_run_the_plan_the_cache_and_the_policy():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(6, 8)
    fm = frzcompile.optimize(model, (x,), optimizer=opt, policy="manual",
                             cache=frzcompile.CacheConfig(check_cost=False)).attach()  # a tiny prefix
    assert fm.attached and inspect.signature(model.forward) == inspect.signature(type(model).forward.__get__(model))
    fm.freeze("0")
    model.train()  # the loop's model.train(): the frozen unit goes back to eval at the next call of the model
    outs = []
    for _ in range(3):
        out = model(x)
        outs.append(out.detach())
        out.sum().backward()
        opt.step()
        opt.zero_grad()
    assert not model[0].training and not model[0][1].training and model[1].training
    assert model[0][0].weight.grad is None and not model[0][0].weight.requires_grad
    report = fm.cache.report()
    assert report["hits"] > 0 and report["served_calls"] == ["0"]
    # fm(...) while attached runs the services once (the model's inner call goes straight to its forward)
    batches = report["batches"]
    fm(x)
    assert fm.cache.report()["batches"] == batches + 1
    # and the same numbers as the model run by hand with the unit frozen
    ref = net()
    ref[0].requires_grad_(False)
    ref[0].eval()
    ref_opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.1)
    for out in outs:
        got = ref(x)
        torch.testing.assert_close(got.detach(), out)
        got.sum().backward()
        ref_opt.step()
        ref_opt.zero_grad()
    calls = []
    model.register_forward_hook(lambda m, a, o: calls.append(1))
    model(x)
    fm(x)
    assert len(calls) == 2  # the model's own hooks fire once per call, either way (the cache steps aside)


def test_policy_steps_through_model_calls():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 8)
    fm = frzcompile.optimize(model, (x,), optimizer=opt, policy=frzcompile.Linear(total_steps=4)).attach()
    for _ in range(4):
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
    model(x)
    assert fm.frozen == ("0", "1")


def test_copies_are_plain_models_and_detach_restores():
    model = net()
    x = torch.randn(4, 8)
    fm = frzcompile.optimize(model, (x,), policy="manual").attach()
    fm.freeze("0")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[2].weight.zero_()
        twin[2].bias.fill_(1.0)
    assert torch.equal(twin.eval()(x), torch.ones(4, 3))  # the copy runs its own weights
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    model.eval()
    torch.testing.assert_close(loaded.eval()(x), model(x))
    fm.detach()
    assert "forward" not in model.__dict__ and not fm.attached
    assert not model[0][0].weight.requires_grad  # the plan stays


def test_attach_refuses_compile():
    model = net()
    fm = frzcompile.optimize(model, (torch.randn(2, 8),), policy="manual", compile=True)
    with pytest.raises(frzcompile.ConfigError, match="compile"):
        fm.attach()


def test_warm_cache_while_attached():
    model = net()
    x = torch.randn(6, 8)
    fm = frzcompile.optimize(model, (x,), policy="manual", cache=frzcompile.CacheConfig(check_cost=False)).attach()
    fm.freeze("0")
    fm.eval()
    assert fm.warm_cache([x, x + 1], progress=False) == 12
    with torch.no_grad():
        model(x + 1)
    assert fm.cache.report()["hits"] == 6


def test_a_new_frozen_module_attaches_over_one_never_detached():
    """An interrupted run leaves its FrozenModule attached; optimizing the model again takes over (and refuses
    while the first one is still attached and alive)."""
    model = net()
    x = torch.randn(4, 8)
    first = frzcompile.optimize(model, (x,), policy="manual").attach()
    with pytest.warns(UserWarning, match="still alive"):
        second = frzcompile.optimize(model, (x,), policy="manual")
    with pytest.raises(frzcompile.ConfigError, match="detach"):
        second.attach()
    del first
    second.attach()
    second.freeze("0")
    model.train()
    model(x)
    assert not model[0].training  # the second FrozenModule runs the calls
    second.detach()
    assert "forward" not in model.__dict__


def test_an_attached_model_exports():
    """torch.export of the model while fm.attach() holds it failed inside torch ("'AttachedForward' object has no
    attribute '__code__'": it reads the signature from `model.forward`); it records the model's call now."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(2, 4)
    fm = frzcompile.optimize(model, (x,), policy="manual").attach()
    fm.freeze("0")
    program = torch.export.export(model, (x,))
    assert fm.attached and torch.equal(program.module()(x), model(x))
