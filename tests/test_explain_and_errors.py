"""explain(), graph dumps, and the errors users see on bad input."""
import warnings

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import frzcompile
from tests.conftest import eager_reference
from frzcompile import zoo


def _resnet():
    torch.manual_seed(0)
    return zoo.ResNet(width=8), torch.randn(4, 1, 12, 12)


@pytest.mark.parametrize("cast", ["double", "bfloat16"])
def test_explain_after_a_cast_counts_the_same_flops_and_fires_no_hook(cast):
    """explain() counts FLOPs lazily on the example inputs: after model.double() / .bfloat16() it raised
    "Input type (float) and bias type (double) should be the same", and the user's hooks fired on its run."""
    model, x = _resnet()
    fm = frzcompile.optimize(model, (x,))
    seen = []
    model.conv1.register_forward_pre_hook(lambda m, a: seen.append("pre"))
    model.fc.register_forward_hook(lambda m, a, o: seen.append("post"))
    getattr(model, cast)()
    flops = fm.unit_flops()
    assert seen == [] and "fwd FLOPs" in str(frzcompile.explain(fm))
    model.float()
    fm.release()
    reference = frzcompile.optimize(model, (x,)).unit_flops()
    assert flops == reference and flops["layer1.0"] > 0


def test_explain_after_a_cast_of_an_exported_model_says_why_flops_are_not_counted():
    """An exported graph (GPT-2) asserts the dtypes it was captured with: explain() after model.double() raised
    "Tensor dtype mismatch" from the graph. It now says the FLOPs are not counted and why; a count made before
    the cast stands."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    ids = torch.randint(0, 100, (2, 8))
    counted = None
    for explain_first in (False, True):
        model = transformers.GPT2LMHeadModel(config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fm = frzcompile.optimize(model, example_kwargs={"input_ids": ids}, policy="manual")
        assert fm.analysis.captured.method == "export"
        if explain_first:
            counted = fm.unit_flops()
        model.double()
        text = str(frzcompile.explain(fm))
        if explain_first:
            assert fm.unit_flops() == counted and sum(counted.values()) > 0 and "not counted" not in text
        else:
            assert "forward FLOPs not counted: the exported graph checks the dtypes" in text
        assert fm(input_ids=ids).logits.dtype == torch.float64
        fm.release()


def test_explain_table_and_flops():
    model, x = _resnet()
    fm = frzcompile.optimize(model, (x,))
    fm.freeze("conv1", "bn1", "layer1.0", "layer2.1")
    report = frzcompile.explain(fm)
    text = str(report)
    for needle in ("symbolic_trace", "layer1.0", "frozen-prefix", "frozen", "trainable", "fwd FLOPs", "freeze ("):
        assert needle in text
    statuses = {r["unit"]: r["status"] for r in report.rows}
    assert statuses["layer1.0"] == "frozen-prefix" and statuses["layer2.1"] == "frozen"
    assert statuses["fc"] == "trainable"
    # per-unit FLOPs add up to what FlopCounterMode counts for the whole eager forward
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    assert sum(r["flops"] for r in report.rows) + report.outside_flops == counter.get_total_flops()
    assert report.rows[2]["flops"] > 0
    assert sum(r["params"] for r in report.rows) == sum(p.numel() for p in model.parameters())


def test_explain_names_the_export_fallback():
    model = zoo.TransformerClassifier(vocab=50, d_model=16, nhead=2, layers=2)
    fm = frzcompile.optimize(model, (torch.randint(0, 50, (2, 6)),))
    text = str(frzcompile.explain(fm))
    assert "captured by export" in text and "tried symbolic_trace first; it cannot capture this model" in text


def test_debug_env_writes_each_graph(tmp_path, monkeypatch):
    monkeypatch.setenv("FRZ_DEBUG", str(tmp_path))
    model, x = _resnet()
    fm = frzcompile.optimize(model, (x,))
    fm.freeze("conv1", "bn1")
    fm(x)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["ResNet.build000.00.captured.py", "ResNet.build000.01.select_tokens.py",
                     "ResNet.build000.02.sparsify.py", "ResNet.build000.03.freeze.py", "ResNet.build000.04.cache.py"]
    after = (tmp_path / files[3]).read_text()
    assert "frozen_prefix" in after and "frozen_prefix" not in (tmp_path / files[0]).read_text()


def test_not_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        frzcompile.optimize(lambda x: x, (torch.randn(2),))


def test_unknown_unit_names_suggest_close_ones():
    model, x = _resnet()
    fm = frzcompile.optimize(model, (x,))
    with pytest.raises(frzcompile.UnitError, match=r"Did you mean .*layer1\.0"):
        fm.freeze("layer1.O")
    with pytest.raises(frzcompile.UnitError, match="not a module path"):
        frzcompile.optimize(model, (x,), units=["conv1", "layer9"])
    with pytest.raises(frzcompile.UnitError, match="must not nest"):
        frzcompile.optimize(model, (x,), units=["layer1", "layer1.0"])


def test_a_module_the_example_never_calls_is_named_as_such():
    class WithExtra(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.extra, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x, aux=None):
            h = self.stem(x)
            return self.head(h if aux is None else h + self.extra(aux))

    fm = frzcompile.optimize(WithExtra(), (torch.randn(2, 4),), policy="manual")
    with pytest.raises(frzcompile.UnitError, match="'extra' is a module of the model, but the example batch"):
        fm.freeze("extra")


def test_optimize_leaves_the_example_batch_alone():
    """optimize() runs the model on copies of the example batch: a forward that changes its input in place does
    not change the user's batch (once per run of the capture)."""
    class Scales(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            x.mul_(2.0)
            return self.head(torch.relu(self.stem(x)))

    x = torch.ones(3, 4)
    for method in ("symbolic_trace", "export"):
        frzcompile.optimize(Scales(), (x,), policy="manual", capture_method=method)
        assert torch.equal(x, torch.ones(3, 4)), method


def test_freezing_every_unit_is_refused():
    model, x = _resnet()
    fm = frzcompile.optimize(model, (x,))
    with pytest.raises(frzcompile.PlanError, match="nothing to train"):
        fm.freeze(*fm.units)
    assert fm.frozen == ()  # the refused plan left nothing half-applied
    assert all(p.requires_grad for p in model.parameters())


def test_example_inputs_that_do_not_match():
    model, x = _resnet()
    with pytest.raises(frzcompile.InputMismatchError, match="cannot run on the example inputs"):
        frzcompile.optimize(model, (torch.randn(4, 3, 12, 12),))
    with pytest.raises(frzcompile.InputMismatchError, match="needs example_inputs"):
        frzcompile.optimize(model)
    with pytest.raises(frzcompile.InputMismatchError, match=r"tuple .*, not dict: pass keyword arguments as "
                                                            r"example_kwargs"):
        frzcompile.optimize(model, {"x": x})


def test_calls_shaped_unlike_the_example_run_as_the_model_does():
    from tests.conftest import make_case

    model, args, kwargs = make_case("bert")
    fm = frzcompile.optimize(model, args, example_kwargs=kwargs)
    fm.freeze(fm.units[0])
    fm.eval()
    ids = kwargs["input_ids"]
    for call in ({"input_ids": ids}, {"input_ids": ids[:1, :5]}, {"input_ids": ids, "labels": torch.tensor([0, 1, 0, 1])},
                 {"input_ids": ids, "attention_mask": kwargs["attention_mask"], "output_hidden_states": True}):
        got, expected = fm(**call), model(**call)
        assert type(got) is type(expected) and got.keys() == expected.keys()
        torch.testing.assert_close(got.logits, expected.logits)


def test_explain_says_when_gradient_checkpointing_makes_the_frozen_prefix_run_with_autograd():
    from tests.conftest import make_case

    model, args, kwargs = make_case("bert")
    fm = frzcompile.optimize(model, args, example_kwargs=kwargs, policy="manual")
    fm.freeze(*fm.units[:2])
    assert "enable_input_require_grads" not in str(frzcompile.explain(fm))
    model.gradient_checkpointing_enable()
    text = str(frzcompile.explain(fm))
    assert "runs with autograd" in text and "model.disable_input_require_grads()" in text
    model.disable_input_require_grads()
    assert "enable_input_require_grads" not in str(frzcompile.explain(fm))


def test_explain_names_parameters_outside_every_unit_and_the_unit_they_freeze_with():
    class M(nn.Module):  # a table read before the first layer and added to every layer's input (DeBERTa's)
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(4))
            self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            t = self.table * 2
            return self.head(self.b(self.a(x) + t) + t)

    fm = frzcompile.optimize(M(), (torch.randn(3, 4),), policy="manual")
    assert "unit a also holds table (outside every unit's modules; a reads it first): freezing a freezes it too" \
        in str(frzcompile.explain(fm))
    fm.freeze("a")
    assert not fm.model.table.requires_grad


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:  # Python control flow on a tensor value: symbolic_trace and export cannot capture it
            h = h * 2
        return self.b(h)


def test_a_data_dependent_model_is_captured_by_recording_one_call(capfd):
    """Data-dependent control flow was refused with a CaptureError, though frzcompile runs the model itself: the
    third method records the example's path. Both branches then train as eager PyTorch with `a` frozen by hand."""
    torch.manual_seed(0)
    model = DataDependent()
    fm = frzcompile.optimize(model, (torch.randn(3, 4),), policy="manual")
    assert fm.capture_method == "record" and fm.units == ["a", "b"]
    err = capfd.readouterr().err  # export's failure printed its partial graph and a warning (about 50 lines)
    assert "def forward" not in err and "Unable to find user code" not in err
    assert [m for m, _ in fm._captured.attempts] == ["symbolic_trace", "export"]
    assert "captured by record" in str(frzcompile.explain(fm))
    ref = eager_reference(model, [model.a], list(model.a.parameters()))
    fm.freeze("a")
    assert list(fm.frozen) == ["a"] and not model.a.weight.requires_grad
    for sign in (1.0, -1.0):  # one batch down each branch
        x = (sign * torch.randn(5, 4)).requires_grad_(True)
        x_ref = x.detach().clone().requires_grad_(True)
        ours, theirs = fm(x), ref(x_ref)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        ours.square().sum().backward()
        theirs.square().sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
        torch.testing.assert_close(model.b.weight.grad, ref.b.weight.grad, rtol=0, atol=0)
        model.zero_grad(), ref.zero_grad()


def test_freezing_a_path_that_holds_modules_of_no_unit_says_they_stay_trainable():
    """A mixture of experts whose example batch routed no sample to one expert: that expert is no unit, and
    `fm.freeze("experts")` left it trainable without a word (`experts.requires_grad_(False)` freezes it)."""
    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(4, 4)
            self.experts = nn.ModuleDict({"low": nn.Linear(4, 4), "high": nn.Linear(4, 4)})
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            h = self.stem(x)
            route = h.mean() > 0  # the whole batch goes to one expert (data-dependent: recorded)
            return self.head(self.experts["high" if route else "low"](h))

    torch.manual_seed(0)
    model = Experts()
    x = torch.randn(6, 4)
    fm = frzcompile.optimize(model, (x,), policy="manual", units=["stem", "experts.low", "experts.high", "head"])
    called = "high" if model.stem(x).mean() > 0 else "low"
    other = "low" if called == "high" else "high"
    assert f"experts.{called}" in fm.units and f"experts.{other}" not in fm.units
    with pytest.warns(UserWarning, match=f"leaves 2 of its parameters trainable \\(experts.{other}.weight"):
        fm.freeze("experts")
    assert getattr(model.experts, other).weight.requires_grad
    getattr(model.experts, other).requires_grad_(False)  # frozen by hand already: nothing to say
    fm.unfreeze("experts")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fm.freeze("experts")


def test_modules_the_example_never_reaches_are_named_and_still_train():
    """An early exit taken only in eval mode (capture runs the example in eval): the blocks after it are no
    units. units=[...] naming them dropped them silently; freezing every unit was refused as leaving nothing to
    train without a word of them; the error for freezing one said to pass an example that reaches it, with no
    word of eval mode; and a path inside an nn.LSTM was "inside unit 'rnn'", to be split with finer units."""
    class EarlyExit(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.block, self.exit = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
            self.rnn = nn.LSTM(4, 4, num_layers=2, batch_first=True)

        def forward(self, x):
            h = self.stem(x)
            if not self.training:
                return self.exit(h)
            return self.exit(self.block(h) + self.rnn(h[:, None])[0][:, 0])

    model = EarlyExit()
    with pytest.warns(UserWarning, match="units=\\[...\\] names 'block', 'rnn', which the example batch"):
        fm = frzcompile.optimize(model, (torch.randn(3, 4),), policy="manual", units=["stem", "block", "rnn", "exit"])
    assert fm.units == ["stem", "exit"]
    with pytest.raises(frzcompile.UnitError, match="runs the example in eval mode: a module your forward calls only "
                                                   "in training"):
        fm.freeze("block")
    with pytest.raises(frzcompile.PlanError, match="trainable parameters belong to no unit: modules the example"):
        fm.freeze("stem", "exit")  # block and rnn, in no unit, may train (they do, past the early exit)
    fm.freeze("stem")
    fm.train()
    fm(torch.randn(3, 4)).sum().backward()
    assert model.block.weight.grad is not None and model.stem.weight.grad is None

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.LSTM(4, 4, num_layers=2, batch_first=True), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    fm = frzcompile.optimize(Recurrent(), (torch.randn(3, 5, 4),), policy="manual")
    assert fm.units == ["rnn", "head"]
    with pytest.raises(frzcompile.UnitError, match="unknown unit or module path 'rnn.l0'"):
        fm.freeze("rnn.l0")

    class Shared(nn.Module):  # a called around b: the two feed each other, one unit 'a+b'
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.a(self.b(self.a(x))))

    fm = frzcompile.optimize(Shared(), (torch.randn(3, 4),), policy="manual")
    assert fm.units == ["a+b", "head"]
    with pytest.raises(frzcompile.UnitError, match="unknown unit or module path 'b.nothing'"):
        fm.freeze("b.nothing")


class RefusesTracing(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 2)

    def forward(self, x):
        if torch.fx._symbolic_trace.is_fx_tracing():  # a forward that refuses every tracer
            raise RuntimeError("not traceable")
        return self.a(x)


def test_untraceable_model_names_every_attempt():
    with pytest.raises(frzcompile.CaptureError) as info:
        frzcompile.optimize(RefusesTracing(), (torch.randn(3, 4),))
    message = str(info.value)
    assert "RefusesTracing" in message and "symbolic_trace:" in message and "export:" in message
    assert "record:" in message
    assert [m for m, _ in info.value.attempts] == ["symbolic_trace", "export", "record"]


def test_import_is_lean():
    import subprocess
    import sys

    code = (
        "import sys, torch; before = torch.get_default_dtype(), torch.is_grad_enabled(); import frzcompile;"
        "assert 'triton' not in sys.modules, 'triton imported';"
        "libs = [m for m in ('transformers', 'lightning', 'accelerate', 'frzcompile.integrations', 'networkx',"
        "                    'torch._dynamo')"
        "        if m in sys.modules];"
        "assert not libs, f'imported {libs}';"
        "assert not torch.cuda.is_initialized(), 'cuda initialized';"
        "assert (torch.get_default_dtype(), torch.is_grad_enabled()) == before"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_explain_says_why_units_were_merged():
    class Interleaved(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.a(self.b(self.a(x))))  # a, then b, then a again: they feed each other

    fm = frzcompile.optimize(Interleaved(), (torch.randn(3, 4),), policy="manual")
    assert fm.units == ["a+b", "head"]
    text = str(frzcompile.explain(fm))
    assert "merged unit a+b: data flows both ways" in text and "a -> b" in text and "b -> a" in text


def test_a_model_on_the_meta_device_is_refused_with_what_to_do():
    """A model built under torch.device("meta") failed deep in the capture (aten::equal has no meta kernel)."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(frzcompile.ConfigError, match=r"meta device .*to_empty\(device=\.\.\.\)"):
        frzcompile.optimize(model, (torch.randn(2, 4, device="meta"),))
    model.register_buffer("scale", torch.ones(4))  # (a real buffer beside meta weights: init_empty_weights' way)
    with pytest.raises(frzcompile.ConfigError, match="meta device"):
        frzcompile.optimize(model, (torch.randn(2, 4),))
    model.to_empty(device="cpu")
    for m in (model[0], model[2]):
        m.reset_parameters()
    fm = frzcompile.optimize(model, (torch.randn(2, 4),), policy="manual")
    assert fm(torch.randn(3, 4)).shape == (3, 2)


def test_a_forward_that_needs_grad_is_refused_saying_so():
    """A forward hooking an intermediate (`h.register_hook(...)`, unguarded) fails under torch.no_grad(), which the
    capture uses; the error blamed the example inputs."""

    class Hooked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            h.register_hook(lambda g: g * 2)
            return self.b(h)

    with pytest.raises(frzcompile.InputMismatchError, match=r"with grad enabled but not under torch.no_grad\(\).*"
                                                           r"if h.requires_grad"):
        frzcompile.optimize(Hooked(), (torch.randn(2, 4),))


def test_torch_compiles_wrapper_is_refused_with_what_to_do():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(frzcompile.ConfigError, match="_orig_mod.*compile=True"):
        frzcompile.optimize(torch.compile(model), (torch.randn(2, 4),))


def test_explain_after_a_head_swap_a_release_and_a_weight_trained_by_hand():
    """After a head swap explain counted the old head's FLOPs (2,048 against 32,768) and fm.graph_module() called
    it; after fm.release() nothing said so; a frozen weight made trainable by hand was counted as frozen."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 32), nn.ReLU()),
                                         nn.Sequential(nn.Linear(32, 32), nn.ReLU())])
            self.head = nn.Linear(32, 4)

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return self.head(x)

    torch.manual_seed(0)
    model, x = M(), torch.randn(8, 16)
    fm = frzcompile.optimize(model, (x,), policy="manual")
    assert fm.capture_method == "symbolic_trace"
    fm.freeze("blocks.0")
    frzcompile.explain(fm)  # FLOPs counted before the swap
    fm.head = nn.Linear(32, 64)
    fm(x)
    with FlopCounterMode(display=False) as counter:
        model.head(torch.randn(8, 32))
    e = frzcompile.explain(fm)
    assert {r["unit"]: r for r in e.rows}["head"]["flops"] == counter.get_total_flops() == 32768
    assert fm.graph_module().head is model.head
    torch.testing.assert_close(fm.graph_module()(x), model(x))
    model.blocks[0][0].weight.requires_grad_(True)  # taken back by hand: it trains
    text = str(frzcompile.explain(fm))
    assert "; 32 frozen parameters: requires_grad=False" in text  # the bias
    assert "; 512 parameters of frozen units train: you set requires_grad_(True) on them by hand" in text
    fm.release()
    assert "RELEASED" in str(frzcompile.explain(fm))


def test_a_swap_rebinds_the_graph_without_touching_the_users_modules():
    """The re-binding after a swap wrote the new head's weight into the old head object (a forward that reads
    `self.head.weight` before calling `self.head`), and a block the graph traced through, swapped for another
    structure, went unremarked while fm.graph_module() computed the old one."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(16, 32)
            self.block = nn.Sequential(nn.Linear(32, 32), nn.ReLU())
            self.head = nn.Linear(32, 4)

        def forward(self, x):
            x = x.to(self.head.weight.dtype)
            return self.head(self.block(self.stem(x)))

    torch.manual_seed(0)
    model, x = M(), torch.randn(8, 16)
    fm = frzcompile.optimize(model, (x,), policy="manual")
    fm.freeze("stem")
    old_head, old_weight = model.head, model.head.weight
    model.head = nn.Linear(32, 4)
    fm(x)
    assert old_head.weight is old_weight and fm.graph_module().head is model.head
    torch.testing.assert_close(fm.graph_module()(x), model(x))
    assert "structure changed" not in str(frzcompile.explain(fm))  # a leaf swapped: the graph calls the new one
    model.block = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh())
    fm(x)
    assert "structure changed since optimize()" in str(frzcompile.explain(fm))


def test_freezing_a_unit_that_a_root_parameter_joined_says_so():
    """CLIP's `logit_scale * img @ txt.t()`: the root's temperature joins the image tower's last unit, and
    fm.freeze("visual") froze it silently (locked-image tuning expects it to train)."""

    class TwoTowers(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
            self.text = nn.Linear(4, 4)
            self.logit_scale = nn.Parameter(torch.ones(()))

        def forward(self, x, t):
            img, txt = self.visual(x), self.text(t)
            return self.logit_scale * img @ txt.t()

    torch.manual_seed(0)
    model = TwoTowers()
    fm = frzcompile.optimize(model, (torch.randn(3, 4), torch.randn(3, 4)), policy="manual")
    with pytest.warns(UserWarning, match=r"also freezes 'logit_scale', from outside its modules"):
        fm.freeze("visual")
    assert not model.logit_scale.requires_grad  # (frozen with its unit, as the warning says)
    model.logit_scale.requires_grad_(True)
    out = fm(torch.randn(3, 4), torch.randn(3, 4))
    out.sum().backward()
    assert model.logit_scale.grad is not None and model.visual[0].weight.grad is None
