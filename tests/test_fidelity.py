"""The fidelity contract: `fm` behaves exactly as the user's model does with the same parameters frozen (and the
frozen units' modules in eval mode), on a traced model, Hugging Face BERT and a Llama decoder with its default
use_cache=True: modes, hooks, attributes read at call time, swapped submodules, input gradients and double
backward, any batch size / length / keyword, and the same random numbers as eager."""
import copy
import gc
import warnings

import pytest
import torch
from torch import nn

import frzcompile
from frzcompile import numerics
from tests.conftest import output_tensor


class Net(nn.Module):
    """A traced model with BatchNorm, dropout in a unit and between units, an attribute and a root buffer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.block1 = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.3), nn.ReLU())
        self.block2 = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(16, 3)
        self.temperature = 1.0
        self.register_buffer("offset", torch.zeros(8))

    def forward(self, x):
        h = self.block2(self.block1(self.stem(x - self.offset)))
        return self.head(self.drop(h)) / self.temperature


def llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=False, attention_dropout=0.2)
    return transformers.LlamaForCausalLM(cfg)


def make(name):
    """(model, args, kwargs, call) -- `call(batch_size, length)` makes new inputs of that shape."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "traced":
        return Net(), (torch.randn(6, 8, generator=g),), {}, lambda b, n: ((torch.randn(b, 8, generator=g),), {})
    if name == "bert":
        from frzcompile import zoo

        pytest.importorskip("transformers")
        model = zoo.tiny_bert(layers=3, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    else:
        model = llama()

    def call(b, n):
        ids = torch.randint(0, 64, (b, n), generator=g)
        mask = torch.ones(b, n, dtype=torch.long)
        mask[0, n // 2:] = 0
        return (), {"input_ids": ids, "attention_mask": mask}

    return (model,) + call(4, 12) + (call,)


MODELS = ["traced", "bert", "llama"]


def frozen_half(fm):
    return fm.units[: len(fm.units) // 2]


def reference(model, fm, frozen):
    """A deep copy frozen by hand the plain-PyTorch way: requires_grad=False and eval() on the frozen units."""
    ref = copy.deepcopy(model)
    for u in frozen:
        for path in fm.unit_graph.paths(u):
            for p in ref.get_submodule(path).parameters():
                p.requires_grad_(False)
    return ref


def by_hand_modes(ref, fm, frozen, training):
    ref.train(training)
    for u in frozen:
        for path in fm.unit_graph.paths(u):
            ref.get_submodule(path).eval()


def same(a, b):
    torch.testing.assert_close(output_tensor(a), output_tensor(b), rtol=0, atol=0)


def half_frozen(name, **options):
    """(model, args, kwargs, call, fm with its first half frozen, the frozen units, the by-hand reference)."""
    model, args, kwargs, call = make(name)
    fm = frzcompile.optimize(model, args, example_kwargs=kwargs, policy="manual", **options)
    frozen = frozen_half(fm)
    fm.freeze(*frozen)
    return model, args, kwargs, call, fm, frozen, reference(model, fm, frozen)


@pytest.mark.parametrize("name", MODELS)
def test_modes_set_on_the_users_model_take_effect(name):
    model, args, kwargs, _, fm, frozen, ref = half_frozen(name)
    for step, (who, mode) in enumerate([(model, False), (model, True), (fm, False), (model, True), (fm, True)]):
        who.train(mode)  # the user's own variable or fm: either takes effect
        by_hand_modes(ref, fm, frozen, mode)
        torch.manual_seed(step)
        got = fm(*args, **kwargs)
        torch.manual_seed(step)
        same(got, ref(*args, **kwargs))
        assert fm.training == model.training == mode
    # and the frozen units stay in eval mode through it all
    assert all(not m.training for u in frozen for m in fm.unit_graph.units[u].modules)


@pytest.mark.parametrize("name", MODELS)
def test_training_draws_the_same_random_numbers_as_eager(name):
    model, args, kwargs, call, fm, frozen, ref = half_frozen(name)
    by_hand_modes(ref, fm, frozen, True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        a, k = call(4, 12 - step)
        torch.manual_seed(100 + step)
        loss = output_tensor(fm(*a, **k)).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        torch.manual_seed(100 + step)
        ref_loss = output_tensor(ref(*a, **k)).float().square().mean()
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        assert loss.item() == ref_loss.item()  # bitwise: the same ops, the same dropout masks
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("name", MODELS)
def test_optimize_fires_no_hook_registered_before_it(name):
    """optimize()'s own runs of the model (the capture's, the FLOP count's) fired the user's hooks: three calls to
    a hook counting calls before training started. A hook registered before optimize() fires once per call, as
    without frzcompile; transformers' own hooks, which it installs at its first call (here the capture's) on a
    module that already holds a user's hook, are kept (output_hidden_states returns every layer's)."""
    model, args, kwargs, _ = make(name)
    modules = [m for m in model.modules() if next(m.children(), None) is None]
    inner = next((m for m in model.modules() if type(m).__name__.endswith("Layer")), modules[len(modules) // 2])
    seen = []
    inner.register_forward_hook(lambda m, a, out: seen.append("inner"))
    model.register_forward_pre_hook(lambda m, a, k: seen.append("root"), with_kwargs=True)
    fm = frzcompile.optimize(model, args, example_kwargs=kwargs)
    frzcompile.explain(fm)  # (counts FLOPs: one more run of the model)
    assert seen == []
    output_tensor(fm(*args, **kwargs)).float().sum().backward()
    assert seen == ["root", "inner"]
    if name == "bert":
        with torch.no_grad():
            hidden = fm(*args, **kwargs, output_hidden_states=True).hidden_states
        assert len(hidden) == 4 and seen.count("inner") == 2


def test_a_model_that_needs_its_hooks_to_run_is_captured_with_them_and_global_hooks_stay_silent():
    """optimize()'s runs suspend the user's hooks; a model that cannot run without one (a pre-hook converting uint8
    images, a model reading what hooks on its blocks collect, as timm's feature mode does) failed to optimize
    with "cannot run on the example inputs". It is captured with its hooks (which then see those runs), and runs
    as in eager. Global hooks (register_module_forward_hook) fired 149 times in a tiny BERT's optimize()."""
    torch.manual_seed(0)

    class Collecting(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
            self.head = nn.Linear(24, 3)
            self.features = {}
            for i, b in enumerate(self.blocks):
                b.register_forward_hook(lambda m, a, out, i=i: self.features.__setitem__(i, out))

        def forward(self, x):
            self.features.clear()
            for b in self.blocks:
                x = torch.relu(b(x))
            return self.head(torch.cat([self.features[i] for i in range(3)], -1))

    def converting():
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        model.register_forward_pre_hook(lambda m, args: (args[0].float() / 255,))
        return model

    def reshaping():  # (a pre-hook on a leaf module: symbolic_trace calls it as a module, the FLOP count too)
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 3))
        model[0].register_forward_pre_hook(lambda m, args: (args[0].view(-1, 1, 28, 28),))
        return model

    images = torch.randint(0, 256, (4, 8), dtype=torch.uint8)
    for build, x in ((converting, images), (Collecting, torch.randn(4, 8)), (reshaping, torch.randn(4, 784))):
        torch.manual_seed(0)
        model = build()
        torch.manual_seed(0)
        ref = build()  # (a deepcopy's hooks would still write to the original's features)
        fm = frzcompile.optimize(model, (x,), policy="manual")
        fm.freeze(fm.units[0])
        for p in ref.get_submodule(fm.units[0]).parameters():  # (by hand: `reference` deep-copies)
            p.requires_grad_(False)
        out, expected = fm(x), ref(x)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        assert "fwd FLOPs" in str(frzcompile.explain(fm))  # (the FLOP count's run keeps the hooks too)
        out.sum().backward()
        expected.sum().backward()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad))
    import torch.nn.modules.module as module_hooks

    seen = []
    handle = module_hooks.register_module_forward_hook(lambda m, a, out: seen.append(type(m).__name__))
    try:
        model, args, kwargs, _ = make("bert")
        fm = frzcompile.optimize(model, args, example_kwargs=kwargs)
        frzcompile.explain(fm)
        assert seen == []
        fm(*args, **kwargs)
        assert "BertLayer" in seen
    finally:
        handle.remove()


def test_suspended_hooks_keep_torchs_own_and_those_registered_meanwhile():
    """frzcompile's own runs suspend forward hooks, but torch's own (pruning's recomputes the weight the module runs
    with: suspended, a run after an optimizer step used the weight from before it), and a hook registered during
    the run (a library installing its hooks at its first call) stays registered after it."""
    from torch.nn.utils import prune

    from frzcompile.torch_private import forward_hooks_suspended

    torch.manual_seed(0)
    lin, x = nn.Linear(4, 4), torch.randn(2, 4)
    prune.l1_unstructured(lin, "weight", amount=0.5)
    seen = []
    lin.register_forward_hook(lambda m, a, out: seen.append("user"))
    with torch.no_grad():
        lin.weight_orig.mul_(2)  # (an optimizer step)
        with forward_hooks_suspended([lin], keep=("torch.",)):
            out = lin(x)
            handle = lin.register_forward_hook(lambda m, a, out: seen.append("library"))
        assert seen == []
        torch.testing.assert_close(out, nn.functional.linear(x, lin.weight_orig * lin.weight_mask, lin.bias))
        lin(x)
        assert seen == ["user", "library"]
        handle.remove()
        with forward_hooks_suspended([lin]):
            lin(x)
        lin(x)
    assert seen == ["user", "library", "user"]


@pytest.mark.parametrize("name", MODELS)
def test_hooks_on_any_module_fire(name):
    model, args, kwargs, _ = make(name)
    fm = frzcompile.optimize(model, args, example_kwargs=kwargs, policy="manual", cache=True)
    frozen = frozen_half(fm)
    fm.freeze(*frozen)
    inside = fm.unit_graph.units[frozen[-1]].modules[-1]   # deep inside the frozen prefix
    trainable = fm.unit_graph.units[fm.units[-1]].modules[0]
    seen = []
    handles = [inside.register_forward_hook(lambda m, a, out: seen.append("inside")),
               trainable.register_forward_hook(lambda m, a, out: seen.append("trainable")),
               trainable.register_full_backward_hook(lambda m, gi, go: seen.append("backward")),
               fm.model.register_forward_pre_hook(lambda m, a, k: seen.append("root"), with_kwargs=True)]
    for _ in range(2):  # the second call could be served from the cache: the hook inside must still fire
        output_tensor(fm(*args, **kwargs)).float().sum().backward()
    assert seen.count("inside") == seen.count("trainable") == seen.count("backward") == seen.count("root") == 2
    assert fm.cache.stats["hits"] == 0 and any("hooks" in why for why in fm.cache.steps_aside)
    for h in handles:
        h.remove()
    output_tensor(fm(*args, **kwargs))
    assert len(seen) == 8


def test_attributes_buffers_and_swapped_submodules_are_read_at_call_time():
    model, (x,), _, _ = make("traced")
    fm = frzcompile.optimize(model, (x,), policy="manual")
    fm.freeze("stem", "block1")
    fm.eval()
    base = fm(x)
    model.temperature = 2.0                          # an attribute set on the user's variable
    torch.testing.assert_close(fm(x), base / 2)
    fm.temperature = 4.0                             # or on fm: it is set on the model
    assert model.temperature == 4.0 and "temperature" not in fm.__dict__
    torch.testing.assert_close(fm(x), base / 4)
    model.offset = torch.ones(8)                     # a root buffer reassigned
    torch.testing.assert_close(fm(x), model(x))
    new_head = nn.Linear(16, 3)
    model.head = new_head                            # a head swapped after optimize()
    torch.testing.assert_close(fm(x), model(x))
    assert fm.head is new_head and fm.unit_graph.units["head"].params[0] is new_head.weight
    new_block = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.3), nn.ReLU())
    fm.block1 = new_block                            # a frozen unit replaced: the new one is frozen too
    assert model.block1 is new_block
    fm.train()
    out = fm(x)
    assert not new_block.training and not any(p.requires_grad for p in new_block.parameters())
    out.sum().backward()
    assert new_block[0].weight.grad is None and new_head.weight.grad is not None
    assert fm.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("name", ["traced", "bert"])
def test_input_gradients_flow_and_double_backward_works(name):
    model, args, kwargs, _, fm, frozen, ref = half_frozen(name, cache=True)
    fm.eval()
    by_hand_modes(ref, fm, frozen, False)
    if name == "traced":
        x, rx = args[0].clone().requires_grad_(), args[0].clone().requires_grad_()
        run, ref_run = (lambda: fm(x)), (lambda: ref(rx))
    else:  # gradients with respect to the input embeddings (saliency, adversarial training)
        emb = model.get_input_embeddings()(kwargs["input_ids"]).detach()
        x, rx = emb.clone().requires_grad_(), emb.clone().requires_grad_()
        mask = kwargs["attention_mask"]
        run = lambda: fm(inputs_embeds=x, attention_mask=mask).logits  # noqa: E731
        ref_run = lambda: ref(inputs_embeds=rx, attention_mask=mask).logits  # noqa: E731
    # (torch has no double backward for CPU scaled-dot-product attention, eager or not: BERT stops at one)
    double = name == "traced"
    for _ in range(2):  # (the cache steps aside: an input requires grad)
        out, ref_out = run(), ref_run()
        (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=double, retain_graph=True)
        (rg,) = torch.autograd.grad(ref_out.square().sum(), rx, create_graph=double, retain_graph=True)
        torch.testing.assert_close(g, rg)
        if double:
            g.square().sum().backward()                  # a gradient penalty: double backward
            rg.square().sum().backward()
        else:
            out.square().sum().backward()
            ref_out.square().sum().backward()
    trained = [(p, q) for p, q in zip(model.parameters(), ref.parameters()) if p.requires_grad]
    assert trained and all(p.grad is not None for p, _ in trained)
    for p, q in trained:
        torch.testing.assert_close(p.grad, q.grad)
    assert fm.cache.stats["lookups"] == 0 and "an input requires grad" in fm.cache.steps_aside


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_any_batch_size_length_and_keyword_the_model_accepts(name):
    model, args, kwargs, call = make(name)
    fm = frzcompile.optimize(model, args, example_kwargs=kwargs, policy="manual", cache=True)
    fm.freeze(*frozen_half(fm))
    fm.eval()
    ids = kwargs["input_ids"]
    calls = [{"input_ids": ids}, {"input_ids": ids[:1, :5]}, {"input_ids": ids[:, :3]}, call(7, 20)[1],
             dict(kwargs, output_hidden_states=True), dict(kwargs, return_dict=False)]
    calls.append(dict(kwargs, labels=torch.tensor([0, 1, 0, 1]) if name == "bert" else ids))
    if name == "llama":
        calls.append(dict(kwargs, use_cache=False))
    with torch.no_grad():
        for k in calls:
            for _ in range(2):  # twice: the second may be served from the cache
                got, expected = fm(**k), model(**k)
                assert type(got) is type(expected)
                for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)):
                    if isinstance(a, torch.Tensor):
                        torch.testing.assert_close(a, b)


def test_decoder_with_its_default_use_cache():
    model, args, kwargs, _ = make("llama")
    assert model.config.use_cache
    fm = frzcompile.optimize(model, args, example_kwargs=kwargs, cache=frzcompile.CacheConfig(check_cost=False))
    assert fm.units == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2", "model.norm",
                        "lm_head"]
    fm.freeze(*fm.units[:3])
    out = fm(**kwargs)
    assert out.past_key_values is not None  # use_cache=True, as the model does
    # the key/value cache is filled inside the frozen layers: serving them would leave it empty, so no caching
    assert "key/value cache" in fm.cache.report()["decision"]
    for _ in range(2):
        fm(**kwargs, use_cache=False)
    assert fm.cache.report()["decision"].startswith("on") and fm.cache.stats["hits"] == 4


def test_linear_probe_keeps_the_dropout_before_the_classifier():
    model, args, kwargs, _ = make("bert")
    fm = frzcompile.optimize(model, args, example_kwargs=kwargs, policy="manual")
    fm.freeze(*fm.units[:-1])  # everything but the classifier
    assert model.dropout.training and not model.bert.encoder.layer[0].training
    torch.manual_seed(0)
    a = fm(**kwargs).logits
    b = fm(**kwargs).logits
    assert not torch.equal(a, b)  # the dropout in front of the classifier is still on, as by hand


def test_an_optimizer_made_after_optimize_drives_the_policy():
    model, (x,), _, _ = make("traced")
    y = torch.randint(0, 3, (6,))
    fm = frzcompile.optimize(model, (x,), policy=frzcompile.Linear(total_steps=8, freeze_start=0.0))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)  # made after optimize(), never given to it
    frozen = []
    for _ in range(4):
        nn.functional.cross_entropy(fm(x), y).backward()
        opt.step()
        opt.zero_grad()
        frozen.append(len(fm.frozen))
    assert fm.step_count == 4 and frozen == [0, 1, 1, 2]
    assert all(p not in opt.state for p in fm.plan.frozen_params())  # its state was dropped when freezing
    second = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)  # a second phase
    for _ in range(4):
        nn.functional.cross_entropy(fm(x), y).backward()
        second.step()
        second.zero_grad()
    assert fm.step_count == 8 and len(fm.frozen) == len(fm.units) - 1


def test_two_optimizers_in_one_step_count_once_and_wrapped_optimizers_work():
    model, (x,), _, _ = make("traced")
    y = torch.randint(0, 3, (6,))

    class Wrapped(torch.optim.Optimizer):  # accelerate's AcceleratedOptimizer: the real one in .optimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

        def step(self, closure=None):
            return self.optimizer.step(closure)

        def zero_grad(self, set_to_none=True):
            self.optimizer.zero_grad(set_to_none)

    body = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("head")], lr=0.01)
    head = Wrapped(torch.optim.SGD(model.head.parameters(), lr=0.01))
    fm = frzcompile.optimize(model, (x,), optimizer=[body, head], policy="manual")
    for _ in range(3):
        nn.functional.cross_entropy(fm(x), y).backward()
        body.step()
        head.step()
        body.zero_grad()
        head.zero_grad()
    assert fm.step_count == 3


def test_training_without_a_torch_optimizer_warns_that_the_policy_never_runs():
    model, (x,), _, _ = make("traced")
    fm = frzcompile.optimize(model, (x,), policy=frzcompile.Linear(total_steps=10))
    with pytest.warns(frzcompile.NoStepWarning, match="fm.step()"):
        for _ in range(frzcompile.runtime.module.NO_STEP_WARNING_CALLS):
            fm(x).sum().backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.001 * p.grad
                    p.grad = None


def test_the_cache_keeps_the_random_numbers_of_eager():
    """Prefix-only runs of the cache (filling misses, its analysis) fork the random number generator."""
    model, (x,), _, _ = make("traced")
    fm = frzcompile.optimize(model, (x,), policy="manual", cache=frzcompile.CacheConfig(check_cost=False))
    fm.freeze("stem", "block1")
    ref = reference(model, fm, ["stem", "block1"])
    by_hand_modes(ref, fm, ["stem", "block1"], True)
    xs = torch.randn(12, 8, generator=torch.Generator().manual_seed(5))
    for step, idx in enumerate([slice(0, 6), slice(3, 9), slice(0, 6), slice(6, 12)]):  # misses, partial, hits
        torch.manual_seed(step)
        got = fm(xs[idx])
        torch.manual_seed(step)
        # misses are computed on the rows that missed, not on the whole batch: on some CPUs (AMD EPYC here) a
        # matmul's rounding depends on the batch size (1 ulp); a different dropout mask would differ by ~0.1
        torch.testing.assert_close(got, ref(xs[idx]), rtol=1e-5, atol=1e-6)
    assert fm.cache.stats["hits"] == 3 + 6 + 3 and fm.cache.report()["served_calls"] == ["block1"]


def test_numerical_checks_hold_in_reduced_precision():
    """Capture and the cache's per-sample analysis compare within measured noise, so bf16 autocast (and TF32 on
    GPUs) does not make them fail; a real batch dependence is still caught."""
    from tests.test_cache import BatchMixer

    model, args, kwargs, _ = make("bert")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # check_cost=False: whether serving this small BERT's prefix pays is timed; this test is about numerics
        fm = frzcompile.optimize(model, args, example_kwargs=kwargs, policy="manual",
                                 cache=frzcompile.CacheConfig(check_cost=False))
        fm.freeze(*fm.units[:2])
        fm.eval()
        for _ in range(2):
            fm(**kwargs)
    assert fm.cache.report()["decision"].startswith("on") and fm.cache.stats["hits"] == 4
    mixer = frzcompile.optimize(BatchMixer(mix_in_unit=True), (torch.randn(6, 4),), cache=True)
    mixer.freeze("a")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixer(torch.randn(8, 4))
    assert "mixes samples" in mixer.cache.report()["decision"]
    # the precision floors: TF32 matmuls on a GPU are allowed ~1e-2 relative, float32 on CPU ~1e-5
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert numerics.floor(torch.float32, torch.device("cuda")) == pytest.approx(1e-2)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert numerics.floor(torch.float32, torch.device("cpu")) < 1e-4
    a = torch.randn(1000, dtype=torch.float64)
    assert numerics.agree(a + 1e-9 * torch.randn(1000, dtype=torch.float64), a, noise=1e-9)
    assert not numerics.agree(a + 1e-3, a, noise=1e-9)
    # complex values compare whole (their imaginary parts were dropped, with torch's warning, at optimize())
    z = torch.randn(64, dtype=torch.cfloat)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not numerics.agree(z.conj().resolve_conj(), z) and numerics.agree(z * (1 + 1e-7), z)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8, dtype=torch.cfloat), torch.nn.Linear(8, 2, dtype=torch.cfloat))
        fm = frzcompile.optimize(model, (torch.randn(4, 8, dtype=torch.cfloat),), policy="manual")
    fm.freeze("0")
    assert torch.equal(fm(z[:32].reshape(4, 8)), model(z[:32].reshape(4, 8)))


def test_no_warning_on_a_plain_training_loop():
    model, (x,), _, _ = make("traced")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    fm = frzcompile.optimize(model, (x,), optimizer=opt, policy="autofreeze")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            fm(x).sum().backward()
            opt.step()
            opt.zero_grad()


def test_optimize_draws_no_random_numbers():
    model, args, kwargs, _ = make("bert")
    state = torch.get_rng_state()
    frzcompile.optimize(model, args, example_kwargs=kwargs, cache=True)  # the default policy, with the cache
    assert torch.equal(state, torch.get_rng_state())


def test_every_optimizer_keeps_masked_weights_at_zero():
    model, (x,), _, _ = make("traced")
    fm = frzcompile.optimize(model, (x,), policy="manual", sparsity=0.5)
    matrices = [p for p in model.parameters() if p.dim() == 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    first, second = torch.optim.AdamW(vectors, lr=1e-2), torch.optim.SGD(matrices, lr=0.1, momentum=0.9)
    for _ in range(3):
        fm(x).square().mean().backward()
        first.step()
        second.step()  # steps after the counted one are masked too
        first.zero_grad()
        second.zero_grad()
    assert fm.step_count == 3
    for t in fm.sparsity.targets.values():
        assert torch.all(t.weight[~t.mask] == 0)


def test_a_plan_decided_at_a_step_waits_for_the_iteration_to_end():
    """With two optimizers, the one stepping second still updates a unit the policy froze at the first's step,
    as when freezing by hand between iterations."""
    model, (x,), _, _ = make("traced")
    fm = frzcompile.optimize(model, (x,), policy=frzcompile.Linear(total_steps=2, freeze_start=0.0))
    stem = list(model.stem.parameters())
    first = torch.optim.SGD([p for p in model.parameters() if all(p is not q for q in stem)], lr=0.1)
    second = torch.optim.SGD(stem, lr=0.1)
    fm(x).sum().backward()
    first.step()
    before = [p.detach().clone() for p in stem]
    second.step()
    assert any(not torch.equal(p, b) for p, b in zip(stem, before))
    assert "stem" in fm.frozen and all(not p.requires_grad for p in stem)


def test_weights_frozen_before_optimize_and_sparsity():
    model, (x,), _, _ = make("traced")
    model.block1[0].weight.requires_grad_(False)
    fm = frzcompile.optimize(model, (x,), policy="manual", sparsity=0.5)
    fm(x).sum().backward()
    assert model.block1[0].weight.grad is None and model.block2[0].weight.grad is not None


def test_functional_call_leaves_the_callers_tensors_alone():
    model, (x,), _, _ = make("traced")
    fm = frzcompile.optimize(model, (x,), policy="manual")
    fm.freeze("stem")
    fm.eval()
    params = {n: p.detach().clone().requires_grad_() for n, p in fm.named_parameters()}
    out = torch.func.functional_call(fm, params, (x,))
    assert all(t.requires_grad for t in params.values())
    torch.testing.assert_close(out, torch.func.functional_call(model, params, (x,)))
    assert not model.stem[0].weight.requires_grad and fm.frozen == ("stem",)


def test_functional_call_with_another_models_parameters_leaves_them_trainable():
    """torch.func.functional_call(fm, dict(other.named_parameters()), x) froze `other`'s parameters of the frozen
    units for good (taken for a swap); by hand they get gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    other, x = copy.deepcopy(model), torch.randn(3, 4)
    fm = frzcompile.optimize(model, (x,), policy="manual")
    fm.freeze("0")
    torch.func.functional_call(fm, dict(other.named_parameters()), (x,)).sum().backward()
    assert all(p.requires_grad and p.grad is not None for p in other.parameters())
    assert not model[0].weight.requires_grad and fm.frozen == ("0",)
    # a real swap is still frozen with its unit, however often, whatever ids CPython hands the new layers
    for _ in range(6):
        model[0] = nn.Linear(4, 8)
        fm(x).sum().backward()
        assert not model[0].weight.requires_grad and model[0].weight.grad is None


def test_batched_backward_through_the_default_policy():
    """A vectorized jacobian (a batched backward) failed in the loss proxy's gradient hook ("Batching rule not
    implemented for aten::detach"), and must not count as a step's loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    ref, x = copy.deepcopy(model), torch.randn(3, 4)
    fm = frzcompile.optimize(model, (x,))
    fm.freeze("0")
    ref[0].requires_grad_(False)
    jac = torch.autograd.functional.jacobian
    assert torch.equal(jac(fm, x, vectorize=True), jac(ref, x, vectorize=True))
    xx = x.clone().requires_grad_()
    g, = torch.autograd.grad(fm(xx), xx, torch.eye(6).view(6, 3, 2), is_grads_batched=True)
    xr = x.clone().requires_grad_()
    assert torch.equal(g, torch.autograd.grad(ref(xr), xr, torch.eye(6).view(6, 3, 2), is_grads_batched=True)[0])
    assert not fm._loss._gradients


def test_an_nn_sequential_is_indexed_measured_and_iterated_through_fm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    fm = frzcompile.optimize(model, (x,), policy="manual")
    fm.freeze("0")
    assert fm[0] is model[0] and fm[-1] is model[-1] and isinstance(fm[1:3], nn.Sequential)
    assert len(fm) == 5 and list(fm) == list(model) and list(reversed(fm)) == list(reversed(model))
    assert model[2] in fm and bool(fm)
    torch.testing.assert_close(fm[:-1](x), model[:-1](x))  # a feature extractor
    head = nn.Linear(8, 3)
    fm[-1] = head
    assert model[-1] is head and fm(x).shape == (3, 3)
    del fm[-1]
    assert len(model) == 4
    other, (y,), _, _ = make("traced")  # not a container: an nn.Module's face, true and without a length
    fo = frzcompile.optimize(other, (y,), policy="manual")
    assert bool(fo) and not hasattr(fo, "__len__") and not hasattr(fo, "__getitem__")


def test_the_module_face():
    import gc
    import inspect
    import pickle
    import weakref

    model, args, kwargs, _ = make("bert")
    fm = frzcompile.optimize(model, args, example_kwargs=kwargs, policy="manual")
    assert inspect.signature(fm.forward) == inspect.signature(model.forward)  # what HF Trainer reads
    assert next(iter(fm.modules())) is model and len(list(fm.modules())) == len(list(model.modules()))
    with pytest.raises(frzcompile.ConfigError, match="copy the model"):
        copy.deepcopy(fm)
    with pytest.raises(frzcompile.ConfigError, match="pickled"):
        pickle.dumps(fm)
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, out: calls.append(type(m).__name__))
    try:
        fm(**kwargs)
    finally:
        handle.remove()
    assert calls.count(type(model).__name__) == 1 and "FrozenModule" not in calls  # one model call, as without fm
    traced, (x,), _, _ = make("traced")
    fm = frzcompile.optimize(traced, (x,), policy="smartfrz", cache=True)
    ref = weakref.ref(traced)
    gc.disable()
    try:
        del fm, traced
        assert ref() is None  # no reference cycle keeps the model (and its GPU memory) alive
    finally:
        gc.enable()


@pytest.mark.parametrize("name", ["traced", "bert"])
def test_autocast_training_matches_eager(name):
    model, args, kwargs, call, fm, frozen, ref = half_frozen(name, cache=frzcompile.CacheConfig(check_cost=False))
    by_hand_modes(ref, fm, frozen, True)
    a, k = call(6, 10)
    for step in range(3):  # the same batch again: from the second step the cache serves the frozen half
        torch.manual_seed(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = output_tensor(fm(*a, **k))
        out.float().square().mean().backward()
        torch.manual_seed(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_out = output_tensor(ref(*a, **k))
        ref_out.float().square().mean().backward()
        assert out.dtype == ref_out.dtype
        same(out, ref_out)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=n)
    assert fm.cache.stats["hits"] == 2 * 6  # the rewrite fired: served under autocast, exactly as eager computes


def step_both_and_compare(opt, ref_opt, model, ref):
    """Step fm's and the by-hand reference's optimizers, clear their gradients, and require equal weights."""
    for o in (opt, ref_opt):
        o.step()
        o.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("root_eval", [False, True], ids=["train", "eval"])
@pytest.mark.parametrize("make_opt", [lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                                      lambda ps: torch.optim.AdamW(ps, lr=0.01)], ids=["sgd", "adamw"])
def test_a_freeze_between_backward_and_step_lets_that_step_apply_the_gradients(make_opt, root_eval):
    """Freezing by hand in the middle of an iteration (after backward, before the step; gradient accumulation)
    keeps the gradients, so that step still moves the weights, with their optimizer state; the gradients and the
    state go after it, and the frozen weights move no more. Training with the model in eval mode too (BatchNorm
    and dropout kept in eval by the user): its calls are no training calls, but a backward may follow them."""
    model, (x,), _, _ = make("traced")
    fm = frzcompile.optimize(model, (x,), policy="manual")
    ref = copy.deepcopy(model)
    if root_eval:
        fm.eval()
        ref.eval()
    opt, ref_opt = make_opt(model.parameters()), make_opt(ref.parameters())
    stem, ref_stem = list(model.stem.parameters()), list(ref.stem.parameters())
    for step in range(3):
        torch.manual_seed(step)
        fm(x).sum().backward()
        torch.manual_seed(step)
        ref(x).sum().backward()
        if step == 1:  # freeze after backward
            fm.freeze("stem")
            for p in ref_stem:
                p.requires_grad_(False)
            ref.stem.eval()
            assert all(p.grad is not None for p in stem)
        step_both_and_compare(opt, ref_opt, model, ref)
        if step == 1:  # that step applied the stem's gradients; now they and the stem's state are gone
            assert all(p.grad is None and p not in opt.state for p in stem)
    assert all(torch.equal(a, b) for a, b in zip(stem, ref_stem))


@pytest.mark.parametrize("when", ["policy", "by hand"])
def test_a_freeze_after_the_step_drops_the_gradient_it_applied_and_reading_the_plan_changes_nothing(when):
    """A gradient the step has already applied is no step's in flight: frozen after `opt.step()` and before
    `zero_grad(set_to_none=False)` (a log line reading `fm.frozen` there applies the policy's decision), the weight
    moves no more through momentum, exactly as when the freeze waits for the next call."""
    def run(read: bool):
        model, (x,), _, _ = make("traced")
        y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(2))
        policy = frzcompile.Linear(total_steps=8, freeze_start=0.0) if when == "policy" else "manual"
        fm = frzcompile.optimize(model, (x,), policy=policy)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        weights, frozen = [], []
        for step in range(5):
            torch.manual_seed(step)
            nn.functional.cross_entropy(fm(x), y).backward()
            opt.step()
            if when == "by hand" and step == 1 and read:
                fm.freeze("stem")  # between the step and the zeroing
            elif read:
                frozen.append(fm.frozen)
            opt.zero_grad(set_to_none=False)
            if when == "by hand" and step == 1 and not read:
                fm.freeze("stem")  # after the zeroing
            weights.append([p.detach().clone() for p in model.parameters()])
        return model, weights, frozen

    model, plain, _ = run(read=False)
    _, read, frozen = run(read=True)
    if when == "policy":
        assert frozen == [(), ("stem",), ("stem",), ("stem", "block1"), ("stem", "block1")]  # the reads applied it
    for a, b in zip(plain, read):
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    stem = [i for i, (n, _) in enumerate(model.named_parameters()) if n.startswith("stem.0")]
    assert stem and all(torch.equal(read[1][i], read[-1][i]) for i in stem)  # frozen from step 1 on: never moved


def test_a_freeze_after_the_forward_with_the_last_steps_gradient_still_there_does_not_apply_it_again():
    """`loss = fm(x); opt.zero_grad(set_to_none=False); loss.backward(); opt.step()`: a freeze after the forward
    finds the gradient the last step applied; it is zeroed before the backward, and a zero-filled gradient moves no
    frozen weight (the step drops it with the weight's state), as after a freeze before the forward."""
    model, (x,), _, _ = make("traced")
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(2))
    fm = frzcompile.optimize(model, (x,), policy="manual")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(4):
        loss = nn.functional.cross_entropy(fm(x), y)
        if step == 2:
            at_freeze = model.stem[0].weight.detach().clone()
            fm.freeze("stem")
            assert fm.plan.in_flight  # (nonzero: the last step's, kept for a step that may still apply it)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
    assert torch.equal(model.stem[0].weight, at_freeze)
    assert model.stem[0].weight.grad is None and model.stem[0].weight not in opt.state


def test_reading_the_plan_after_a_step_gradscaler_skipped_for_one_optimizer_changes_nothing():
    """Two optimizers over split parameter groups under a GradScaler: an inf gradient skips the first one's step
    while the second steps and the policy decides to freeze the stem, whose (never applied) gradient is still
    there. A read of `fm.frozen` then keeps it for a step in flight; zeroed by `zero_grad(set_to_none=False)` it is
    no gradient, and the stem moves no more, as without the read."""
    def run(read: bool):
        model, (x,), _, _ = make("traced")
        fm = frzcompile.optimize(model, (x,), policy=frzcompile.Linear(total_steps=8, freeze_start=0.0))
        first = list(model.stem.parameters()) + list(model.head.parameters())
        opt_a = torch.optim.SGD(first, lr=0.1, momentum=0.9)
        opt_b = torch.optim.SGD(list(model.block1.parameters()) + list(model.block2.parameters()), lr=0.1,
                                momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        g = torch.Generator().manual_seed(1)
        stem = []
        for it in range(5):
            xb, yb = torch.randn(6, 8, generator=g), torch.randint(0, 3, (6,), generator=g)
            torch.manual_seed(it)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = fm(xb)
            scaler.scale(nn.functional.cross_entropy(out.float(), yb)).backward()
            if it == 1:
                model.stem[0].weight.grad.view(-1)[0] = float("inf")
            scaler.step(opt_a)
            scaler.step(opt_b)
            scaler.update()
            if read:
                fm.frozen
            for o in (opt_a, opt_b):
                o.zero_grad(set_to_none=False)
            stem.append(model.stem[0].weight.detach().clone())
        assert fm.plan.changes[0][:2] == (2, ("stem",))
        return model, stem

    plain, plain_stem = run(read=False)
    read, read_stem = run(read=True)
    assert all(torch.equal(s, read_stem[1]) for s in read_stem[1:])  # skipped at 1, frozen at 2: never moved
    for a, b in zip(plain.parameters(), read.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("cache", [False, True])
def test_a_frozen_weight_made_to_require_grad_by_hand_trains(cache):
    """`p.requires_grad_(True)` on a parameter of a frozen unit: it gets its gradient (the cache steps aside) and
    the optimizer moves it, as with the same parameter thawed by hand on a model frozen by hand."""
    model, (x,), _, _ = make("traced")
    options = {"cache": frzcompile.CacheConfig(check_cost=False, min_hit_rate=0)} if cache else {}
    fm = frzcompile.optimize(model, (x,), policy="manual", **options)
    fm.freeze("stem", "block1")
    ref = reference(model, fm, ["stem", "block1"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    fm.eval()
    for _ in range(3):  # fill the cache
        fm(x)
    model.block1[0].weight.requires_grad_(True)
    ref.block1[0].weight.requires_grad_(True)
    for step in range(2):
        fm.train()
        by_hand_modes(ref, fm, ["stem", "block1"], True)
        torch.manual_seed(step)
        fm(x).sum().backward()
        torch.manual_seed(step)
        ref(x).sum().backward()
        torch.testing.assert_close(model.block1[0].weight.grad, ref.block1[0].weight.grad, rtol=0, atol=0)
        step_both_and_compare(opt, ref_opt, model, ref)
    if cache:
        assert any("requires grad again" in why for why in fm.cache.steps_aside)


def test_lbfgs_keeps_its_history_through_a_freeze():
    """LBFGS keeps one state for all its parameters, under the first one: freezing the unit that holds it must not
    drop the history of the others (freezing by hand keeps it too)."""
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Sequential(nn.Linear(8, 16), nn.Tanh()), nn.Linear(16, 4))

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
    model, ref = net(), net()
    opt, ref_opt = (torch.optim.LBFGS(m.parameters(), lr=0.5, max_iter=4) for m in (model, ref))
    fm = frzcompile.optimize(model, (x,), optimizer=opt, policy="manual")

    def step(m, o):
        def closure():
            o.zero_grad()
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            return loss
        o.step(closure)

    for i in range(4):
        if i == 2:
            fm.freeze("0")
            ref[0].requires_grad_(False)
            assert len(opt.state[opt.param_groups[0]["params"][0]]["old_dirs"]) > 0
        step(fm, opt)
        step(ref, ref_opt)
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_parameters_added_replaced_or_set_by_hand_keep_what_freezing_by_hand_gives():
    """After a structure change: a LoRA adapter added to a frozen layer trains (a new name keeps its own
    requires_grad), a frozen weight the user made trainable by hand stays trainable when the head is swapped,
    and a frozen unit whose parameters were replaced (load_state_dict(assign=True)) is trainable again on a thaw."""
    import torch.nn.utils.parametrize as parametrize

    class LoRA(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.A = nn.Parameter(torch.zeros(d, 2))
            self.B = nn.Parameter(torch.full((2, d), 0.1))

        def forward(self, w):
            return w + self.A @ self.B

    model, (x,), _, _ = make("traced")
    fm = frzcompile.optimize(model, (x,), policy="manual")
    fm.freeze("stem", "block1")
    lora = LoRA(16)
    parametrize.register_parametrization(model.block1[0], "weight", lora)
    model.stem[0].weight.requires_grad_(True)  # taken back by hand
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.head = nn.Linear(16, 3)              # and a new head
    opt.add_param_group({"params": list(model.head.parameters())})
    fm(x).sum().backward()
    assert lora.A.grad is not None and model.stem[0].weight.grad is not None
    opt.step()
    assert lora.A.abs().sum() > 0 and lora.A.requires_grad and model.stem[0].weight.requires_grad
    assert not model.block1[0].parametrizations.weight.original.requires_grad  # the frozen weight itself
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fm.load_state_dict(state, assign=True)     # new parameter objects under the frozen units' names
    fm(x)
    assert not model.stem[0].bias.requires_grad
    fm.unfreeze("stem")
    assert all(p.requires_grad for p in model.stem.parameters())


def test_a_freeze_right_after_a_structure_change_acts_on_the_new_objects():
    """fm.freeze right after a block was swapped or the parameters replaced (load_state_dict(assign=True)) froze
    the old objects until the next call, so an optimizer made then over the trainable parameters got the frozen
    unit's new ones; a freeze state loaded after such a load did the same."""
    model, (x,), _, _ = make("traced")
    fm = frzcompile.optimize(model, (x,), policy="manual")
    fm(x)
    new_block = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.3), nn.ReLU())
    model.block1 = new_block
    fm.freeze("block1")                                       # no call in between
    assert not new_block.training and not any(p.requires_grad for p in new_block.parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fm.load_state_dict(state, assign=True)
    fm.freeze("stem")
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert not any(p.requires_grad for p in model.block1.parameters())
    fm.unfreeze("block1")
    assert all(p.requires_grad for p in model.block1.parameters())
    saved = fm.freeze_state_dict()
    other, _, _, _ = make("traced")
    fo = frzcompile.optimize(other, (x,), policy="manual")
    other.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)  # on the user's variable
    fo.load_freeze_state_dict(saved)
    trainable = {n for n, p in other.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("stem.") for n in trainable)


def test_a_pickled_model_loads_without_frzcompile(tmp_path):
    """torch.save(model) after optimize(), attached or not, loads in a process where frzcompile cannot be
    imported (a serving machine): the model carried a reference to frzcompile's classes."""
    import subprocess
    import sys

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    fm = frzcompile.optimize(model, (x,), policy="manual")
    fm.freeze("0")
    torch.save(model, tmp_path / "plain.pt")
    fm.attach()
    torch.save(model, tmp_path / "attached.pt")
    expected = model(x)
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys; sys.modules['frzcompile'] = None\n"  # `import frzcompile` fails from here on
            "import torch\n"
            f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
            "for name in ('plain', 'attached'):\n"
            f"    m = torch.load({str(tmp_path)!r} + f'/{{name}}.pt', weights_only=False)\n"
            "    assert not m[0].weight.requires_grad and m[2].weight.requires_grad\n"
            f"    torch.save(m(x), {str(tmp_path)!r} + f'/{{name}}_out.pt')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("plain", "attached"):
        torch.testing.assert_close(torch.load(tmp_path / f"{name}_out.pt"), expected, rtol=0, atol=0)


def test_a_thaw_gives_back_the_flags_a_unit_had_when_it_was_frozen():
    """A thaw gave parameters back their requires_grad of optimize() time: a weight frozen by hand afterwards
    (a LoRA base) trained again after a freeze and thaw of its unit, and in a two-phase fine-tuning (backbone
    frozen by hand, then `requires_grad_(True)` for phase 2) a freeze and thaw froze it again, and freezing the
    head was refused as leaving nothing to train."""
    model, (x,), _, _ = make("traced")
    fm = frzcompile.optimize(model, (x,), policy="manual")
    model.block1[0].weight.requires_grad_(False)  # by hand, after optimize()
    fm.freeze("block1")
    assert fm.freeze_state_dict()["trainable"]["block1.0.weight"] is False
    fm.unfreeze("block1")
    assert not model.block1[0].weight.requires_grad and model.block1[0].bias.requires_grad

    model, (x,), _, _ = make("traced")
    model.stem.requires_grad_(False)
    model.block1.requires_grad_(False)            # phase 1: the backbone frozen by hand
    fm = frzcompile.optimize(model, (x,), policy="manual")
    model.requires_grad_(True)                    # phase 2: everything trains
    fm.freeze("stem")
    fm.unfreeze("stem")
    assert all(p.requires_grad for p in model.parameters())
    fm.freeze("head")                             # stem and block1 train now: not "nothing to train"
    assert "head" in fm.frozen and model.block1[0].weight.requires_grad


def test_a_structure_change_that_moves_units_between_paths_warns():
    """Units are bound to module paths: after `del model.layers[0]` the old layers.2 sits at layers.1, a frozen
    unit's path, and was put in eval with its weights training, silently."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(4)], nn.Linear(8, 2))
    x = torch.randn(4, 8)
    fm = frzcompile.optimize(model, (x,), policy="manual")
    fm.freeze("0", "1")
    fm(x)
    del model[0]
    with pytest.warns(UserWarning, match="'2' is now at '1'.*call optimize\\(\\) again"):
        fm(x)


def test_per_sample_gradients_and_export_leave_the_policys_loss_alone():
    """torch.func's vmap(grad(...)) through fm and torch.export of fm in train mode trace or transform the model:
    their outputs are not a training step's loss, and must not reach the loss the default policy reads (a
    wrapped tensor broke the next opt.step(); a symbolic loss broke the freeze state's pickling)."""
    import pickle

    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Sequential(nn.Linear(16, 16), nn.ReLU()),
                          nn.Linear(16, 3))  # no BatchNorm: vmap(grad) refuses its in-place statistics, eager too
    x = torch.randn(6, 8)
    fm = frzcompile.optimize(model, (x,))  # the default policy, which reads the loss
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    params = {n: p.detach() for n, p in model.named_parameters()}
    y = torch.randint(0, 3, (len(x),))

    def loss(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(fm, p, (xi[None],)), yi[None])

    vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    torch.export.export(fm, (x,))
    for _ in range(2):
        nn.functional.cross_entropy(fm(x), y).backward()
        opt.step()
        opt.zero_grad()
    values = fm.losses()
    assert len(values) == 2 and all(isinstance(v, float) for v in values)
    pickle.dumps(fm.freeze_state_dict())


def test_optimizing_a_model_twice_says_so():
    """A second optimize() of a model whose first FrozenModule is alive warns (both would act on its parameters);
    once the first is gone, or on a copy or a pickle of the model, nothing is said."""
    import gc
    import io

    model, (x,), _, _ = make("traced")
    fm = frzcompile.optimize(model, (x,), policy="manual")
    with pytest.warns(UserWarning, match="still alive"):
        second = frzcompile.optimize(model, (x,), policy="manual")
    del fm, second
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fm = frzcompile.optimize(model, (x,), policy="manual")
        frzcompile.optimize(copy.deepcopy(model), (x,), policy="manual")
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        frzcompile.optimize(torch.load(buffer, weights_only=False), (x,), policy="manual")
    with pytest.warns(UserWarning, match="its submodule '0'"):  # the model inside a new parent
        frzcompile.optimize(nn.Sequential(model), (x,), policy="manual")
    # release() lets go for good: no more steps seen, no more calls, and optimizing again is quiet
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fm.release()
    fm_steps = fm.step_count
    model(x).sum().backward()
    opt.step()
    assert fm.step_count == fm_steps
    with pytest.raises(frzcompile.ConfigError, match="released"):
        fm(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frzcompile.optimize(model, (x,), policy="manual")


def test_a_freeze_in_the_middle_of_accumulation_on_bert_with_user_habits():
    """The same on a BERT from a config, as users train it: model.train() on their own variable, a hook on a
    trainable layer, bf16 autocast, micro-batches of other shapes, AdamW; the first half frozen after the first
    micro-batch's backward. Weights, logits and hook calls as frozen by hand."""
    model, _, _, call = make("bert")
    fm = frzcompile.optimize(model, example_kwargs=call(4, 12)[1], policy="manual")
    frozen = frozen_half(fm)
    ref = copy.deepcopy(model)
    opt, ref_opt = torch.optim.AdamW(model.parameters(), 1e-3), torch.optim.AdamW(ref.parameters(), 1e-3)
    seen = {id(model): 0, id(ref): 0}
    for m in (model, ref):
        m.get_submodule(fm.units[-2]).register_forward_hook(
            lambda mod, a, out, m=m: seen.__setitem__(id(m), seen[id(m)] + 1))
    batches = [call(4, 12)[1], call(2, 7)[1], call(3, 9)[1], call(4, 5)[1]]
    for step in range(2):
        for micro, kwargs in enumerate(batches[2 * step:2 * step + 2]):
            model.train()  # the user's own variable, as every epoch
            ref.train()
            if fm.frozen:
                by_hand_modes(ref, fm, frozen, True)
            outs = []
            for m in (fm, ref):
                torch.manual_seed(10 * step + micro)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = m(**kwargs)
                out.logits.float().sum().backward()
                outs.append(out.logits)
            same(outs[0], outs[1])
            if step == 0 and micro == 0:  # frozen after this micro-batch's backward
                fm.freeze(*frozen)
                for u in frozen:
                    for path in fm.unit_graph.paths(u):
                        ref.get_submodule(path).requires_grad_(False)
        step_both_and_compare(opt, ref_opt, model, ref)
    assert seen[id(model)] == seen[id(ref)] == 4


def test_freezing_the_first_layer_of_a_nested_tensor_encoder_warns():
    """nn.TransformerEncoder (enable_nested_tensor=True, the default) decides on nested tensors from its first
    layer alone: frozen (in eval) while a later layer trains, its next call with a padding mask fails inside
    PyTorch, as frozen by hand, hundreds of steps after a policy froze it, without a word."""
    class Classifier(nn.Module):
        def __init__(self, nested):
            super().__init__()
            self.emb = nn.Embedding(30, 16)
            layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 3, enable_nested_tensor=nested)
            self.head = nn.Linear(16, 2)

        def forward(self, ids, pad):
            return self.head(self.enc(self.emb(ids), src_key_padding_mask=pad)[:, 0])

    ids, pad = torch.randint(0, 30, (4, 6)), torch.zeros(4, 6, dtype=torch.bool)
    fm = frzcompile.optimize(Classifier(True), (ids, pad), policy="manual")
    with pytest.warns(UserWarning, match="enable_nested_tensor=False"):
        fm.freeze("emb", "enc.layers.0")
    fm = frzcompile.optimize(Classifier(False), (ids, pad), policy="manual")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fm.freeze("emb", "enc.layers.0")
    # with PyTorch's fast path off (what the warning and explain advise) the freeze works: no warning, which the
    # first version gave
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        torch.manual_seed(0)
        model = Classifier(True)
        ref = copy.deepcopy(model)
        fm = frzcompile.optimize(model, (ids, pad), policy="manual")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fm.freeze("emb", "enc.layers.0")
        for m in (ref.emb, ref.enc.layers[0]):
            m.requires_grad_(False).eval()
        pad[1:, 4:] = True
        torch.manual_seed(1)
        out = fm(ids, pad)
        torch.manual_seed(1)
        assert torch.equal(out, ref(ids, pad))
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def test_blocks_inside_an_autocast_block_of_the_forward_are_units_of_their_own():
    """torch.export wraps a `with torch.autocast(...)` block in one node named after its last module: the four
    blocks called inside it became one unit `blocks.3` holding all their parameters, and freezing blocks.0 was
    refused as never called."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Linear(6, 16), nn.Linear(16, 3)
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(4)])

        def forward(self, x):
            h = self.embed(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                for b in self.blocks:
                    h = b(h)
            return self.head(h.to(self.head.weight.dtype))

    torch.manual_seed(0)
    model, x = Net(), torch.randn(8, 6)
    ref = copy.deepcopy(model)
    fm = frzcompile.optimize(model, (x,), policy="manual")
    assert fm.capture_method == "export"
    assert fm.units == ["embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
    fm.freeze("embed", "blocks.0")
    ref.embed.requires_grad_(False)
    ref.blocks[0].requires_grad_(False)
    out, expected = fm(x), ref(x)
    out.sum().backward()
    expected.sum().backward()
    assert torch.equal(out, expected)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)
    flops = fm.unit_flops()  # the analysis runs the graph, the autocast block included: 2 x 8 x 16 x 16 a block
    assert [flops[f"blocks.{i}"] for i in range(4)] == [4096] * 4 and flops["head"] == 2 * 8 * 16 * 3


def test_a_failure_inside_a_captured_autocast_block_leaves_autocast_off():
    """The inlined block enters and exits autocast as nodes of the graph: a run that fails between them (the FLOP
    count after the model was cast) left autocast on for the rest of the program."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(2)])
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = x
                for b in self.blocks:
                    h = b(h)
            return self.head(h.to(self.head.weight.dtype))

    model = Net()
    fm = frzcompile.optimize(model, (torch.randn(8, 16),), policy="manual")
    assert fm.capture_method == "export" and fm.units == ["blocks.0", "blocks.1", "head"]
    model.double()  # the FLOP count's runs of the float32 example now fail inside the block
    try:
        fm.unit_flops()
    except RuntimeError:
        pass
    assert not torch.is_autocast_enabled("cpu") and (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_the_flops_of_a_recorded_route_survive_weights_that_take_another():
    """A recording is one data-dependent path (an MoE's routing): replayed with trained weights it may not fit
    (Switch Transformers: explain raised IndexError after a few steps). Its FLOPs are counted when captured."""
    class Routed(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.body, self.head = nn.Linear(4, 1), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            rows = self.body(x[self.gate(x)[:, 0] > 0]).unbind(0)  # as many rows as the gate picks
            return self.head(torch.stack(list(rows)))

    torch.manual_seed(0)
    model, x = Routed(), torch.randn(8, 4)
    with torch.no_grad():
        model.gate.bias.fill_(5.0)  # every row picked at capture
    fm = frzcompile.optimize(model, (x,), policy="manual")
    assert fm.capture_method == "record"
    with torch.no_grad():  # now about half of them
        model.gate.bias.zero_()
        model.gate.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    fm(x)
    expected = {"gate": 2 * 8 * 4, "body": 2 * 8 * 4 * 4, "head": 2 * 8 * 4 * 2, "(outside units)": 0}
    assert fm.unit_flops() == expected and "body" in str(frzcompile.explain(fm))
    model.head = nn.Linear(4, 2)  # a structure change: counted again, which this recording cannot be
    fm(x)
    assert fm.unit_flops() == expected


def test_state_dict_hooks_and_the_models_own_loading_run_through_fm_and_a_module_holding_it():
    """nn.Sequential(fm, head).load_state_dict skipped the model's root load pre-hook (transformers' Mamba and ESM
    rename old checkpoint keys there) and its class's _load_from_state_dict; hooks registered on fm itself ran in
    some routes and not others."""
    class Renaming(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(4, 4), nn.Linear(4, 2)
            self._register_load_state_dict_pre_hook(self._rename)

        @staticmethod
        def _rename(state_dict, prefix, *args):
            for key in [k for k in state_dict if k.startswith(prefix + "fc.")]:
                state_dict[prefix + "head." + key[len(prefix) + 3:]] = state_dict.pop(key)

        def forward(self, x):
            return self.head(self.body(x))

    torch.manual_seed(0)
    model, old = Renaming(), Renaming()
    fm = frzcompile.optimize(model, (torch.randn(2, 4),), policy="manual")
    fm.freeze("body")
    wrapper = nn.Sequential(fm, nn.Linear(2, 2))
    saved = {("0." + k.replace("head.", "fc.")): v for k, v in old.state_dict().items()}  # an old checkpoint
    saved.update({"1." + k: v for k, v in wrapper[1].state_dict().items()})
    assert not wrapper.load_state_dict(saved).missing_keys and torch.equal(model.head.weight, old.head.weight)

    def hooked_calls(module, wrapper):  # the same calls on fm, and on a plain model
        calls = []
        module.register_state_dict_post_hook(lambda *a: calls.append("post"))
        module.register_load_state_dict_post_hook(lambda *a: calls.append("load post"))
        module.state_dict()
        wrapper.state_dict()
        module.load_state_dict(module.state_dict())
        wrapper.load_state_dict(wrapper.state_dict())
        return calls

    plain = Renaming()
    assert hooked_calls(fm, wrapper) == hooked_calls(plain, nn.Sequential(plain, nn.Linear(2, 2))) == \
        ["post", "post", "post", "load post", "post", "load post"]
    fm.release()
    del fm, wrapper
    gc.collect()
    model.load_state_dict(model.state_dict())  # the hooks registered through fm outlive it


def test_two_frozen_modules_sharing_a_backbone_are_warned_about():
    """Two models sharing a submodule, each optimize()d: no warning, and their plans disagreed silently (one's
    frozen list named a unit the other had thawed and that trained)."""
    backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    task_a, task_b = nn.Sequential(backbone, nn.Linear(8, 2)), nn.Sequential(backbone, nn.Linear(8, 3))
    x = torch.randn(4, 4)
    fa = frzcompile.optimize(task_a, (x,), policy="manual")
    with pytest.warns(UserWarning, match="'0' is also part of the model of another live FrozenModule"):
        fb = frzcompile.optimize(task_b, (x,), policy="manual")
    fb.release()
    with pytest.warns(UserWarning, match="also part of the model of another live FrozenModule"):  # fa's, still
        frzcompile.optimize(nn.Sequential(backbone, nn.Linear(8, 3)), (x,), policy="manual")
    fa.release()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frzcompile.optimize(nn.Sequential(backbone, nn.Linear(8, 3)), (x,), policy="manual")


def test_capture_leaves_no_traced_value_on_the_models_modules():
    """A forward that keeps `self.last = h.detach()` (a plain attribute, or a buffer registered empty) and reads it
    back at the next call: symbolic_trace left an fx Proxy there and the first real call failed inside fx; other
    captures left the example's activations (outputs 0.023 off eager at the first call)."""
    class Carry(nn.Module):
        def __init__(self, as_buffer):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            if as_buffer:
                self.register_buffer("last", None)

        def forward(self, x):
            h = self.lin(x)
            last = getattr(self, "last", None)
            if last is not None and last.shape == h.shape:
                h = h + 0.5 * last
            self.last = h.detach()
            return h

    for as_buffer in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(Carry(as_buffer), nn.Linear(4, 2))
        ref, x = copy.deepcopy(model), torch.randn(3, 4)
        fm = frzcompile.optimize(model, (torch.randn(3, 4),), policy="manual")
        assert getattr(model[0], "last", None) is None and list(model.state_dict()) == list(ref.state_dict())
        fm.freeze("0")
        ref[0].requires_grad_(False)
        for _ in range(2):
            assert torch.equal(fm(x), ref(x))


def test_capture_keeps_an_attribute_the_forward_sets_from_none_to_a_tensor():
    """A recurrent state set up as `self.hidden = None` and set to the last hidden state by the forward: capture's
    runs deleted the attribute (only attributes that were tensors were put back), so the next call failed with
    AttributeError, even after a failed capture; and the first method's fx Proxy left there failed the others
    (optimize() refused the model although export and record capture it alone)."""
    class Stateful(nn.Module):
        def __init__(self, rnn):
            super().__init__()
            self.emb, self.rnn, self.out = nn.Embedding(40, 16), rnn(16, 24, batch_first=True), nn.Linear(24, 40)
            self.hidden = None

        def forward(self, ids):
            y, h = self.rnn(self.emb(ids), self.hidden)
            self.hidden = h.detach() if isinstance(h, torch.Tensor) else tuple(t.detach() for t in h)  # (LSTM: h, c)
            return self.out(y)

    for rnn in (nn.GRU, nn.LSTM):
        torch.manual_seed(0)
        model = Stateful(rnn)
        ref, ids = copy.deepcopy(model), torch.randint(0, 40, (4, 5))
        fm = frzcompile.optimize(model, (ids,), policy="manual")
        assert model.hidden is None
        fm.freeze("emb")
        ref.emb.requires_grad_(False)
        for _ in range(3):  # (the state carried from call to call)
            assert torch.equal(fm(ids), ref(ids))


def test_a_module_the_forward_creates_during_the_capture_takes_the_mode_it_would_have():
    """Hugging Face's BigBird swaps new attention modules into its layers for inputs too short for block-sparse
    attention, each in its layer's mode; the capture runs the model in eval, so they stayed in eval after
    optimize() and their dropout was off in training (0.009 off eager). They follow their parent's mode now."""
    class Swapping(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.head = nn.Linear(4, 8), nn.Linear(8, 2)
            self.drop = None

        def forward(self, x):
            if self.drop is None:  # created once, at the first call, in the mode of the model
                self.drop = nn.Sequential(nn.Dropout(0.5))
                if not self.training:
                    self.drop.eval()
            return self.head(self.drop(self.lin(x)))

    torch.manual_seed(0)
    model = Swapping()
    ref, x = copy.deepcopy(model), torch.randn(16, 4)
    fm = frzcompile.optimize(model, (x,), policy="manual")
    assert all(m.training for m in model.modules())
    for _ in range(2):
        torch.manual_seed(1)
        out = fm(x)
        torch.manual_seed(1)
        assert torch.equal(out, ref(x))
    assert all(m.training for m in model.modules())


def test_a_distribution_output_and_a_mapping_input_of_another_class_are_captured():
    """A policy network returning `torch.distributions.Categorical`, and a SentenceTransformer-style forward taking
    its tokenizer's BatchEncoding (a UserDict): every capture method failed ("argument of type Categorical"), so
    optimize() refused both models. The recording now returns the output's tensors, and the example's mapping is
    taken apart as a dict."""
    from collections import UserDict

    class PolicyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.body, self.pi = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, obs):
            return torch.distributions.Categorical(logits=self.pi(torch.relu(self.body(torch.relu(self.enc(obs))))))

    class Features(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.body, self.head = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, features):
            h = self.embed(features["input_ids"]) * features["mask"].unsqueeze(-1)
            features.update({"pooled": self.body(h).mean(1)})  # (SentenceTransformer's modules add their outputs)
            features["out"] = self.head(features["pooled"])
            return features

    torch.manual_seed(0)
    obs, ids = torch.randn(6, 8), torch.randint(0, 20, (4, 5))
    for model, example, first, result in (
            (PolicyNet(), lambda: (obs,), "enc", lambda out: out.logits),
            (Features(), lambda: (UserDict({"input_ids": ids, "mask": torch.ones(4, 5)}),), "embed",
             lambda out: out["out"])):
        ref = copy.deepcopy(model)
        fm = frzcompile.optimize(model, example(), policy="manual")
        assert fm.units[0] == first and len(fm.units) == 3, fm.units
        fm.freeze(first)
        ref.get_submodule(first).requires_grad_(False)
        out, ref_out = result(fm(*example())), result(ref(*example()))
        assert torch.equal(out, ref_out)
        out.square().sum().backward()
        ref_out.square().sum().backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), name
    # a tokenizer's output as example_kwargs (a Mapping, not a dict: `model(**batch)` takes it)
    transformers = pytest.importorskip("transformers")

    class Ids(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(20, 8), nn.Linear(8, 2)

        def forward(self, input_ids, attention_mask):
            return self.head(self.embed(input_ids).mean(1) * attention_mask[:, :1])

    batch = transformers.BatchEncoding({"input_ids": ids, "attention_mask": torch.ones(4, 5)})
    fm = frzcompile.optimize(Ids(), example_kwargs=batch, policy="manual")
    assert fm.units == ["embed", "head"] and fm(**batch).shape == (4, 2)


def test_a_scripted_or_traced_submodule():
    """A model holding a torch.jit.script'ed or traced block: optimize() failed in the capture ("'OrderedDictWrapper'
    object has no attribute 'get'": a ScriptModule's buffer and parameter dicts are torch's wrappers)."""
    for make in (lambda: torch.jit.script(nn.Linear(8, 8)),
                 lambda: torch.jit.trace(nn.Linear(8, 8), torch.randn(2, 8))):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), make(), nn.ReLU(), nn.Linear(8, 4))
        x = torch.randn(4, 8)
        fm = frzcompile.optimize(model, (x,), policy="manual", cache=frzcompile.CacheConfig(check_cost=False))
        assert fm.units == ["0", "1", "3"]
        fm.freeze("0", "1")
        with torch.no_grad():
            expected = model[3](model[2](model[1](model[0](x))))
        for _ in range(3):
            out = fm(x)
            assert torch.equal(out, expected)
        out.sum().backward()
        assert model[0].weight.grad is None and model[3].weight.grad is not None


def test_release_leaves_no_marker_on_the_model():
    """optimize() marks the model and its modules (to warn about a second optimize() or a shared backbone); after
    fm.release() those markers stayed on every module (and in pickles of the model)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    clean = {id(m): set(m.__dict__) for m in model.modules()}
    fm = frzcompile.optimize(model, (torch.randn(2, 4),), policy="manual")
    assert any(k.startswith("_frzcompile") for k in model.__dict__)
    with pytest.warns(UserWarning, match="shared backbone"):  # (it shares model[0])
        other = frzcompile.optimize(nn.Sequential(model[0]), (torch.randn(2, 4),), policy="manual")
    fm.release()
    assert all(set(m.__dict__) == clean[id(m)] for m in model.modules() if m is not model[0])
    assert "_frzcompile_part_of" in model[0].__dict__  # (still part of the other, live one)
    other.release()
    assert all(set(m.__dict__) == clean[id(m)] for m in model.modules())


def test_a_released_frozen_module_changes_the_model_no_more():
    """After fm.release(), fm.freeze() still switched requires_grad off, put the unit in eval mode and dropped
    its optimizer state (and unfreeze and load_freeze_state_dict acted too); release lets go for good, so they
    raise, saying what to use, and leave the model as it was."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    fm = frzcompile.optimize(model, (torch.randn(2, 4),), optimizer=opt, policy="manual")
    nn.functional.mse_loss(fm(torch.randn(2, 4)), torch.zeros(2, 2)).backward()
    opt.step()
    state = fm.freeze_state_dict()
    fm.release()
    for call in (lambda: fm.freeze("0"), lambda: fm.unfreeze("0"), lambda: fm.load_freeze_state_dict(state)):
        with pytest.raises(frzcompile.ConfigError, match="released"):
            call()
    assert all(p.requires_grad for p in model.parameters()) and model.training and model[0].training
    assert len(opt.state) == 4


def test_an_optimizer_with_earlier_steps_meeting_a_policy_at_step_0_warns_that_the_policy_starts_over():
    """A run resumed from the model's and optimizer's state without the freeze state starts the policy over: said
    once, at the first step; not with the freeze state loaded, nor under the manual policy, nor on a fresh run."""
    def run(policy, *, trained_before: bool, load_state=None):
        model, (x,), _, _ = make("traced")
        y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(2))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if trained_before:
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        fm = frzcompile.optimize(model, (x,), optimizer=opt, policy=policy)
        if load_state is not None:
            fm.load_freeze_state_dict(load_state)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for _ in range(3):
                nn.functional.cross_entropy(fm(x), y).backward()
                opt.step()
                opt.zero_grad()
        return fm, [w for w in seen if issubclass(w.category, frzcompile.ResumeWarning)]

    fm, said = run(frzcompile.Linear(total_steps=8, freeze_start=0.0), trained_before=True)
    assert len(said) == 1 and "load_freeze_state_dict" in str(said[0].message)
    assert said[0].filename == __file__  # it points at the user's opt.step()
    assert not run(frzcompile.Linear(total_steps=8, freeze_start=0.0), trained_before=False)[1]
    assert not run("manual", trained_before=True)[1]
    saved = fm.freeze_state_dict()
    assert not run(frzcompile.Linear(total_steps=8, freeze_start=0.0), trained_before=True, load_state=saved)[1]
