"""Never stale: weights and buffers of the frozen prefix (and a buffer at the root that it reads) are edited in every
way users edit them, at random steps, and every batch the cache serves equals an uncached recomputation."""
import random

import pytest
import torch
from torch import nn

import frzcompile
from frzcompile import CacheConfig


class Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 24)
        self.bn = nn.BatchNorm1d(24)

    def forward(self, x):
        return torch.tanh(self.bn(self.lin(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(24, 24)

    def forward(self, x):
        return x + torch.tanh(self.lin(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(12))  # input normalization at the root, outside every unit
        self.stem, self.block, self.head = Stem(), Block(), nn.Linear(24, 3)
        self.temperature = 1.0

    def forward(self, x):
        h = self.block(self.stem((x - self.mean) / self.temperature))
        return self.head(h)


def edits(model):
    """name -> a function editing the model the way users do."""
    lin, bn, block = model.stem.lin, model.stem.bn, model.block.lin
    return {
        "p.data.mul_ (EMA)": lambda: lin.weight.data.mul_(0.97),
        "p.data = ... (loader)": lambda: setattr(block.weight, "data", block.weight.data * 1.05),
        "p.data[mask] = 0 (pruning)": lambda: block.weight.data.__setitem__(block.weight.data.abs() < 0.05, 0.0),
        "running_mean.data.add_": lambda: bn.running_mean.data.add_(0.1),
        "running_var.data.mul_": lambda: bn.running_var.data.mul_(1.2),
        "root buffer fill_ under no_grad": lambda: _no_grad(lambda: model.mean.fill_(random.random())),
        "root buffer .data.add_": lambda: model.mean.data.add_(0.05),
        "copy_ under no_grad": lambda: _no_grad(lambda: lin.bias.copy_(torch.randn_like(lin.bias))),
        "load_state_dict": lambda: model.load_state_dict(
            {k: (v * 0.99 if k.startswith("block.") and v.is_floating_point() else v)
             for k, v in model.state_dict().items()}),
        "attribute": lambda: setattr(model, "temperature", random.choice([1.0, 2.0])),
        "nothing": lambda: None,
    }


def _no_grad(f):
    with torch.no_grad():
        f()


def _uncached(fm, x):
    enabled, fm.cache.enabled = fm.cache.enabled, False
    try:
        return fm(x)
    finally:
        fm.cache.enabled = enabled


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_served_batch_equals_an_uncached_recomputation(seed):
    random.seed(seed)
    torch.manual_seed(seed)
    model = Net()
    fm = frzcompile.optimize(model, (torch.randn(8, 12),), policy="manual", units=["stem", "block", "head"],
                             cache=CacheConfig(check_cost=False))
    fm.freeze("stem", "block")
    batches = [torch.randn(8, 12) for _ in range(4)]
    kinds = edits(model)
    done = {name: 0 for name in kinds}
    served_before_check = 0
    for step in range(120):
        name = random.choice(list(kinds))
        if random.random() < 0.5:  # half the steps edit something, so that entries also get served
            kinds[name]()
            done[name] += 1
        x = random.choice(batches)
        with torch.no_grad():
            got = fm(x)
            hits = fm.cache.stats["hits"]
            want = _uncached(fm, x)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6,
                                   msg=lambda m: f"step {step}, after edits {done}: {m}")
        served_before_check = max(served_before_check, hits)
    assert fm.cache.enabled and served_before_check > 100, (fm.cache.report(), done)
    assert all(n > 0 for n in done.values()), done


def test_a_data_edit_is_seen_and_watch_data_false_trusts_version_counters():
    x = torch.randn(8, 12)
    for watch in (True, False):
        torch.manual_seed(0)
        model = Net()
        fm = frzcompile.optimize(model, (x,), policy="manual", units=["stem", "block", "head"],
                                 cache=CacheConfig(check_cost=False, watch_data=watch))
        fm.freeze("stem", "block")
        with torch.no_grad():
            fm(x)
            fm(x)
            model.block.lin.weight.data.mul_(0.5)  # moves no version counter
            stale = not torch.equal(fm(x), _uncached(fm, x))
        assert stale == (not watch)
