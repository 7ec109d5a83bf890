"""Never stale: weights and buffers of the frozen prefix (and a buffer at the root that it reads) are edited in every
way users edit them, at random steps, and every batch the cache serves equals an uncached recomputation."""
import copy
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


def test_an_empty_batch_runs_as_in_eager():
    model = Net()
    fm = frzcompile.optimize(model, (torch.randn(8, 12),), policy="manual", units=["stem", "block", "head"],
                             cache=CacheConfig(check_cost=False))
    fm.freeze("stem", "block")
    fm.eval()
    with torch.no_grad():
        fm(torch.randn(8, 12))
        assert fm(torch.randn(0, 12)).shape == (0, 3) == model(torch.randn(0, 12)).shape
    assert fm.cache.report()["steps_aside"].get("an empty batch") == 1


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


def _bert_batches():
    """Dynamic padding: batches of 4 sentences padded to their own longest (6, 9 or 12 tokens), each seen twice."""
    g = torch.Generator().manual_seed(3)
    batches = []
    for length in (6, 9, 12):
        ids = torch.randint(1, 128, (4, length), generator=g)
        mask = torch.ones(4, length, dtype=torch.long)
        mask[0, length - 2:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def test_any_length_autocast_inference_mode_empty_batch_and_batch_of_one():
    """One cached BERT through what a run meets: a sanity check under inference mode first (Lightning's), dynamic
    padding, autocast on and off on the same samples, an empty batch and a batch of one; every output equals the
    uncached run, in its own dtype, and the cache served."""
    pytest.importorskip("transformers")
    from frzcompile import zoo

    torch.manual_seed(0)  # no dropout: training-mode outputs are compared with an uncached run
    model = zoo.tiny_bert(layers=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    batches = _bert_batches()
    fm = frzcompile.optimize(model, example_kwargs=batches[0], policy="manual", cache=CacheConfig(check_cost=False))
    fm.freeze(*fm.units[:3])
    opt = torch.optim.SGD([p for p in fm.parameters() if p.requires_grad], lr=0.01)

    def uncached(**kw):
        enabled, fm.cache.enabled = fm.cache.enabled, False
        try:
            return fm(**kw).logits
        finally:
            fm.cache.enabled = enabled

    with torch.inference_mode():  # first touch: the cache steps aside, and stores nothing made in this mode
        fm.eval()
        fm(**batches[0])
    fm.train()
    for autocast in (False, True, False, True):
        for batch in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = fm(**batch).logits
                with torch.no_grad():
                    want = uncached(**batch)
            assert out.dtype == want.dtype == (torch.bfloat16 if autocast else torch.float32)
            torch.testing.assert_close(out.detach(), want)
            out.float().sum().backward()  # a training step on top of served activations
            opt.step()
            opt.zero_grad()
    report = fm.cache.report()
    assert report["steps_aside"].get("inference mode") == 1
    assert report["fully_served_batches"] >= 6 and report["signatures"] >= 6  # 3 lengths x autocast on/off
    with torch.no_grad():
        one = {k: v[1:2] for k, v in batches[1].items()}
        hits = fm.cache.stats["hits"]
        torch.testing.assert_close(fm(**one).logits, uncached(**one))
        # a batch of one steps aside (single samples may take other code paths: test_a_batch_of_one_is_never_served)
        assert fm.cache.stats["hits"] == hits and "a batch of one sample" in " ".join(fm.cache.report()["steps_aside"])


def test_a_batch_of_one_is_never_served():
    """A frozen encoder ending in `.squeeze()` (or branching on `x.shape[0] == 1`) runs other code for a single
    sample, which the analysis of a batch of 8 and its halves never sees: a loader's last batch of one was served
    from entries a batch of 8 stored, with shape (1, 3) where eager gives (3,), or values 0.09 off."""

    class Pool(nn.Module):  # a feature encoder's ending: (B, 8, 2) -> (B, 8), or (8,) for one sample
        def forward(self, h):
            return h.mean(-1).squeeze()

    class Halves(nn.Linear):
        def forward(self, x):
            out = super().forward(x)
            return out * 0.5 if x.shape[0] == 1 else out

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
            self.pool = Pool()
            self.b = Halves(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.b(self.pool(self.a(x).view(len(x), 8, 2))))

    torch.manual_seed(0)
    model, x = Model(), torch.randn(8, 6)
    fm = frzcompile.optimize(model, (x,), policy="manual", cache=CacheConfig(check_cost=False))
    fm.freeze("a", "b")
    ref = copy.deepcopy(model)
    for _ in range(3):
        fm(x)
        for i in range(len(x)):
            one = x[i:i + 1]
            out = fm(one)
            assert out.shape == ref(one).shape == (3,)
            torch.testing.assert_close(out, ref(one), rtol=0, atol=0)
    assert fm.cache.report()["hits"] > 0  # the batches of 8 were served
    # nor stored by warm_cache, whose single-sample entries later batches were then served (0.106 off)
    fm2 = frzcompile.optimize(copy.deepcopy(model), (x,), policy="manual", cache=CacheConfig(check_cost=False))
    fm2.freeze("a", "b")
    fm2(torch.randn(8, 6))  # a plan for the signature, from other samples
    fm2.warm_cache([x[i:i + 1] for i in range(len(x))], progress=False)
    torch.testing.assert_close(fm2(x), ref(x))
    assert fm2.cache.report()["hits"] == 0
