"""accelerate: fm goes through `Accelerator.prepare` (model, optimizer, loader; bf16 autocast included), and
optimize() takes accelerate's wrapped optimizer; training equals freezing by hand under the same Accelerator."""
import pytest
import torch
from torch import nn

accelerate = pytest.importorskip("accelerate")

import frzcompile  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state (mixed precision included); each test starts and ends clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def reset():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


class Schedule(frzcompile.Policy):
    name = "schedule"

    def decide(self, view):
        return {2: set(view.units[:2]), 5: set(view.units[:1])}.get(view.step)


def parts():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.2), nn.Tanh()) for _ in range(3)],
                          nn.Linear(16, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 16, generator=g), torch.randint(0, 3, (64,), generator=g))
    return model, opt, torch.utils.data.DataLoader(data, batch_size=8)


def train(acc, net, opt, loader, by_hand=None):
    net.train()
    for step, (x, y) in enumerate(loader, start=1):
        loss = nn.functional.cross_entropy(net(x), y)
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        if by_hand is not None:
            by_hand(step)


def hand_freezer(model, opt):
    def at(step):
        count = {2: 2, 5: 1}.get(step)
        if count is None:
            return
        for i, block in enumerate(model[:3]):
            frozen = i < count
            block.train(not frozen)  # the loop's model.train() comes first; freezing by hand puts frozen blocks in eval
            for p in block.parameters():
                if frozen and p.requires_grad:
                    opt.optimizer.state.pop(p, None)
                    p.grad = None
                p.requires_grad_(not frozen)
    return at


class KeepEval:
    """By hand, a frozen block must be put back in eval after each model.train(): a forward pre-hook does it."""

    def __init__(self, model):
        self.model = model
        model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        for block in self.model[:3]:
            if not next(block.parameters()).requires_grad:
                block.eval()


@pytest.mark.parametrize("order", ["optimize_then_prepare", "prepare_then_optimize"])
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_accelerate_prepare(order, precision):
    acc = accelerate.Accelerator(cpu=True, mixed_precision=precision)
    model, opt, loader = parts()
    if order == "optimize_then_prepare":
        fm = frzcompile.optimize(model, (torch.randn(2, 16),), optimizer=opt, policy=Schedule())
        net, opt_w, loader_w = acc.prepare(fm, opt, loader)
    else:
        model_w, opt_w, loader_w = acc.prepare(model, opt, loader)
        fm = net = frzcompile.optimize(model_w, (torch.randn(2, 16),), optimizer=opt_w, policy=Schedule())
    torch.manual_seed(1)
    train(acc, net, opt_w, loader_w)
    assert fm.frozen == ("0",) and [s for s, *_ in fm.plan.changes] == [2, 5]

    reset()
    acc2 = accelerate.Accelerator(cpu=True, mixed_precision=precision)
    ref, ref_opt, ref_loader = parts()
    KeepEval(ref)
    ref_w, ref_opt_w, ref_loader_w = acc2.prepare(ref, ref_opt, ref_loader)
    torch.manual_seed(1)
    train(acc2, ref_w, ref_opt_w, ref_loader_w, by_hand=hand_freezer(ref, ref_opt_w))
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=k)


def test_prepare_under_bf16_leaves_the_users_model_copyable_and_unwraps_to_fp32():
    """accelerate's prepare(fm) under bf16 keeps `_original_forward` beside the autocast forward it sets; fm passed
    that name on to the user's model, which then held a reference to fm: `copy.deepcopy(model)` and
    `AveragedModel(model)` (an EMA) raised fm's copy error, and `unwrap_model(keep_fp32_wrapper=False)` could not
    find it and left autocast on (2.96e-3 off fp32)."""
    import copy

    acc = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    model, opt, _ = parts()
    fm = frzcompile.optimize(model, (torch.randn(2, 16),), optimizer=opt, policy="manual")
    net, _ = acc.prepare(fm, opt)
    assert "_original_forward" not in model.__dict__ and "_original_forward" in fm.__dict__
    copy.deepcopy(model)
    torch.optim.swa_utils.AveragedModel(model)
    x = torch.randn(3, 16)
    unwrapped = acc.unwrap_model(net, keep_fp32_wrapper=False)
    with torch.no_grad():
        model.eval()
        assert torch.equal(unwrapped(x), model(x))  # (the plain forward, in fp32: nothing to cast)
    fm.temperature = 2.0  # a public name still reaches the model
    assert model.temperature == 2.0
