"""Core correctness: frzcompile's training step against eager PyTorch with the same parameters frozen."""
import warnings

import pytest
import torch
import torch.utils._pytree as pytree

import frzcompile
from frzcompile.passes.freeze import REGION
from tests.conftest import eager_reference, output_tensor


class RegionProbe:
    """Counts tensors saved for backward, and whether any was saved while a frozen-prefix module ran (hooks on
    the model's own prefix modules: what runs is the model)."""

    def __init__(self, fm):
        self.depth = 0
        self.saved_inside = 0
        self.saved_total = 0
        self.region_outputs = []
        self.handles = []
        self.modules = [fm.model.get_submodule(path) for u in fm.frozen_prefix for path in fm.unit_graph.paths(u)]
        for m in self.modules:
            self.handles.append(m.register_forward_pre_hook(lambda m, a: self._enter()))
            self.handles.append(m.register_forward_hook(lambda m, a, out: self._leave(out)))

    def _enter(self):
        self.depth += 1

    def _leave(self, out):
        self.depth -= 1
        self.region_outputs.extend(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))

    def pack(self, t):
        self.saved_total += 1
        self.saved_inside += self.depth > 0
        return t

    def close(self):
        for h in self.handles:
            h.remove()


def _plan(units, plan):
    half = len(units) // 2
    return {"none": [], "prefix": units[:half], "middle": [units[half]]}[plan]


@pytest.mark.parametrize("plan", ["none", "prefix", "middle"])
def test_gradients_match_eager(model_case, plan):
    name, model, args, kwargs = model_case
    model.train()
    fm = frzcompile.optimize(model, args, example_kwargs=kwargs)
    frozen = _plan(fm.units, plan)
    units = fm.unit_graph.units
    ref = eager_reference(
        model,
        [m for u in frozen for m in units[u].modules],
        [p for u in frozen for p in units[u].params],
    )
    if frozen:
        fm.freeze(*frozen)
    assert fm.frozen == tuple(frozen)

    probe = RegionProbe(fm)
    torch.manual_seed(123)
    with torch.autograd.graph.saved_tensors_hooks(probe.pack, lambda t: t):
        out = output_tensor(fm(*args, **kwargs))
    probe.close()
    out.float().square().mean().backward()

    torch.manual_seed(123)
    ref_out = output_tensor(ref(*args, **kwargs))
    ref_out.float().square().mean().backward()

    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    ref_params = dict(ref.named_parameters())
    frozen_ids = {id(p) for u in frozen for p in units[u].params}
    checked = 0
    for pname, p in model.named_parameters():
        rp = ref_params[pname]
        if id(p) in frozen_ids:
            assert not p.requires_grad and p.grad is None, pname
            continue
        assert (p.grad is None) == (rp.grad is None), pname
        if p.grad is not None:
            torch.testing.assert_close(p.grad, rp.grad, rtol=1e-5, atol=1e-6, msg=lambda m, pname=pname: f"{pname}: {m}")
            checked += 1
    assert checked > 0
    for (bname, b), (_, rb) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, rb, msg=lambda m, bname=bname: f"buffer {bname}: {m}")

    if plan == "prefix":
        # the plan took effect: the prefix saves nothing for backward and hands out plain tensors, and the
        # freeze pass shows it as the no-grad region of the analysis graph
        assert probe.modules and probe.region_outputs
        assert all(t.grad_fn is None for t in probe.region_outputs)
        assert probe.saved_inside == 0 and probe.saved_total > 0
        assert fm.frozen_prefix == tuple(frozen)
        assert hasattr(fm.graph_module(), REGION)
    else:
        assert fm.frozen_prefix == () and not hasattr(fm.graph_module(), REGION)
    if plan == "middle":
        # gradients flow through the frozen middle unit into the trainable units before it
        first = units[fm.units[0]].params
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in first)


def test_outputs_and_structure_unchanged(model_case):
    name, model, args, kwargs = model_case
    model.eval()
    fm = frzcompile.optimize(model, args, example_kwargs=kwargs)
    with torch.no_grad():
        expected, got = model(*args, **kwargs), fm(*args, **kwargs)
    assert type(got) is type(expected)
    torch.testing.assert_close(output_tensor(got), output_tensor(expected))
    assert list(fm.state_dict()) == list(model.state_dict())
    assert [n for n, _ in fm.named_parameters()] == [n for n, _ in model.named_parameters()]


def test_smaller_last_batch(model_case):
    name, model, args, kwargs = model_case
    fm = frzcompile.optimize(model, args, example_kwargs=kwargs)
    fm.freeze(fm.units[0])
    small_args = tuple(a[:1] for a in args)
    small_kwargs = {k: v[:1] for k, v in kwargs.items()}
    fm.eval()
    model_out = output_tensor(fm(*small_args, **small_kwargs))
    assert model_out.shape[0] == 1


def test_state_dict_loads_into_original_model(model_case):
    name, model, args, kwargs = model_case
    fm = frzcompile.optimize(model, args, example_kwargs=kwargs)
    fm.freeze(fm.units[0])
    with torch.no_grad():
        for p in fm.parameters():
            p.add_(0.5)
    from tests.conftest import make_case

    fresh = make_case(name)[0]
    fresh.load_state_dict(fm.state_dict())
    for (n, a), (_, b) in zip(fresh.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), n


def test_auto_units_follow_blocks():
    from frzcompile import zoo

    torch.manual_seed(0)
    x = torch.randn(2, 1, 12, 12)
    fm = frzcompile.optimize(zoo.ResNet(width=8), (x,))
    assert fm.units == ["conv1", "bn1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "fc"]
    assert fm.capture_method == "symbolic_trace"
    dag = fm.unit_graph.dag
    assert dag.has_edge("layer1.1", "layer2.0") and dag.has_edge("layer3.1", "fc")


def test_auto_units_open_stages_layer_stacks_and_encoders_with_parameters():
    from frzcompile.units import auto_units
    from torch import nn

    class Block(nn.Module):  # a residual block whose MLP is a Sequential of layers: never split
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))

        def forward(self, x):
            return x + self.mlp(x)

    class Staged(nn.Module):  # torchvision ConvNeXt / Swin / RegNet: features = [stem, stage, downsample, stage]
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Linear(8, 8), nn.Sequential(Block(), Block()),
                                          nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)), nn.Sequential(Block(), Block()))
            self.head = nn.Linear(8, 2)

    class Encoder(nn.Module):  # torchvision ViT: the encoder holds the position embedding itself
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(1, 4, 8))
            self.layers = nn.Sequential(Block(), Block())
            self.ln = nn.LayerNorm(8)

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.encoder, self.heads = nn.Linear(8, 8), Encoder(), nn.Linear(8, 2)

    class VGG(nn.Module):  # a plain stack of layers
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                                          nn.ReLU(), nn.Conv2d(4, 4, 3))
            self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(4, 2))

    class ConvBNAct(nn.Sequential):
        def __init__(self):
            super().__init__(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())

    class InvertedResidual(nn.Module):  # MobileNet: its layers are Conv-BN-activation Sequentials, not blocks
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(ConvBNAct(), ConvBNAct(), ConvBNAct())

    mobilenet = nn.Sequential(nn.Sequential(InvertedResidual(), InvertedResidual()), nn.Linear(4, 2))
    assert auto_units(mobilenet) == ["0.0", "0.1", "1"]

    class ConvLayer(nn.Module):  # Hugging Face ResNet: a Conv-BN-activation module of its own
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    class BasicLayer(nn.Module):  # a residual block of two such layers: a unit, never opened
        def __init__(self):
            super().__init__()
            self.shortcut, self.layer = ConvLayer(), nn.Sequential(ConvLayer(), ConvLayer())

    class Stage(nn.Module):  # a stage of two blocks: opened to them
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(BasicLayer(), BasicLayer())

    hf_resnet = nn.Sequential(nn.ModuleList([Stage(), Stage()]), nn.Linear(4, 2))
    assert auto_units(hf_resnet) == ["0.0.layers.0", "0.0.layers.1", "0.1.layers.0", "0.1.layers.1", "1"]
    assert auto_units(Staged()) == ["features.0", "features.1.0", "features.1.1", "features.2", "features.3.0",
                                    "features.3.1", "head"]
    assert auto_units(ViT()) == ["proj", "encoder.layers.0", "encoder.layers.1", "encoder.ln", "heads"]
    assert auto_units(VGG()) == ["features.0", "features.1", "features.3", "features.5", "classifier"]


def test_auto_units_hugging_face_bert():
    from tests.conftest import make_case

    model, args, kwargs = make_case("bert")
    fm = frzcompile.optimize(model, args, example_kwargs=kwargs)
    assert fm.capture_method == "export"
    assert fm.units == ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.2",
                        "bert.pooler", "classifier"]
    assert fm.config is model.config  # attributes fall through to the wrapped model


def test_a_fallback_to_export_prints_nothing(capfd):
    class Lengths(torch.nn.Module):  # symbolic_trace runs into torch.tensor(None) and export takes over
        def __init__(self):
            super().__init__()
            self.a, self.head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)

        def forward(self, x, lengths=None):
            h = self.a(x)
            if lengths is not None:
                h = h * torch.tensor(lengths, dtype=h.dtype).unsqueeze(-1)
            return self.head(h)

    fm = frzcompile.optimize(Lengths(), (torch.randn(4, 8),), policy="manual")
    assert fm.capture_method == "export"
    assert "Traceback" not in capfd.readouterr().err  # torch.fx's GraphModule.__call__ prints one on failure


def test_export_units_of_a_sliced_module_list_in_a_model_holding_a_module_twice():
    """`for layer in self.layers[:n]` (Hugging Face's decoders) in a model that holds a module under two paths
    (PEFT prompt tuning's alias of the embedding): export names the layers `layers.slice(None, 3, None).0`, so
    they were no units, their parameters joined the embedding's, and `fm.freeze("body.layers.0")` was refused as
    never called."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            return x + self.b(torch.relu(self.a(x)))

    class Body(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
            self.layers = torch.nn.ModuleList([Block() for _ in range(5)])

        def forward(self, x):
            h = self.emb(x)
            for layer in self.layers[1:3]:
                h = layer(h)
            for layer in self.layers[-2:][::-1]:  # (a slice of a slice, from the end: layers 4 and 3)
                h = layer(h)
            return self.head(h)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.extra = Body(), torch.nn.Linear(4, 4)
            self.alias = self.body.emb

        def forward(self, x):
            return self.body(self.extra(x))

    torch.manual_seed(0)
    model = Wrapped()
    x = torch.randn(4, 4)
    fm = frzcompile.optimize(model, (x,), policy="manual", capture_method="export")
    assert fm.units == ["extra", "body.emb", "body.layers.1", "body.layers.2", "body.layers.4", "body.layers.3",
                        "body.head"]
    ref = eager_reference(model, [model.extra, model.body.emb, model.body.layers[1]],
                          [*model.extra.parameters(), *model.body.emb.parameters(),
                           *model.body.layers[1].parameters()])
    fm.freeze("extra", "body.emb", "body.layers.1")
    fm(x).sum().backward()
    ref(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), name
    assert model.body.layers[2].a.weight.grad is not None and model.body.layers[1].a.weight.grad is None


class PackedLSTM(torch.nn.Module):
    """An LSTM text classifier over packed sequences: symbolic_trace and export both refuse
    `pack_padded_sequence` (its lengths are read as Python values)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16, padding_idx=0)
        self.rnn = torch.nn.LSTM(16, 24, batch_first=True)
        self.head = torch.nn.Linear(24, 3)

    def forward(self, ids, lengths):
        packed = torch.nn.utils.rnn.pack_padded_sequence(self.emb(ids), lengths, batch_first=True,
                                                         enforce_sorted=False)
        _, (h, _) = self.rnn(packed)
        return self.head(h[-1])


def test_packed_sequences_are_captured_by_recording_one_call(capfd):
    torch.manual_seed(0)
    model = PackedLSTM()
    ids, lengths = torch.randint(1, 50, (6, 9)), torch.tensor([9, 7, 7, 4, 2, 1])
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    fm = frzcompile.optimize(model, (ids, lengths), optimizer=opt, policy="manual")
    assert fm.capture_method == "record" and fm.units == ["emb", "rnn", "head"]
    assert "Traceback" not in capfd.readouterr().err
    flops = fm.unit_flops()
    assert flops["rnn"] > flops["head"] > 0  # the recorded graph holds the LSTM's work
    ref = eager_reference(model, [model.emb], list(model.emb.parameters()))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    fm.freeze("emb")
    g = torch.Generator().manual_seed(1)
    for length in (9, 5, 12):  # other lengths and batch sizes than the example's
        ids = torch.randint(1, 50, (4, length), generator=g)
        lengths = torch.randint(1, length + 1, (4,), generator=g)
        y = torch.randint(0, 3, (4,), generator=g)
        for m, o in ((fm, opt), (ref, ref_opt)):
            torch.nn.functional.cross_entropy(m(ids, lengths), y).backward()
            o.step()
            o.zero_grad()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    assert not torch.equal(model.rnn.weight_ih_l0, PackedLSTM().rnn.weight_ih_l0)


def test_glue_traced_after_a_later_unit_does_not_merge_units():
    """`self.b(h) + 0.5 * h`: the `0.5 * h` (glue of unit a) is traced after b, and the add that reads both used
    to join a, so a and b fed each other and were merged into one unit 'a+b'."""
    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            h = self.b(h) + 0.5 * h
            return self.head(h)

    torch.manual_seed(0)
    model, x = Residual(), torch.randn(5, 4)
    fm = frzcompile.optimize(model, (x,), policy="manual")
    assert fm.units == ["a", "b", "head"] and not fm.unit_graph.merges
    assert set(fm.unit_graph.dag.edges) == {("a", "b"), ("b", "head")}
    ref = eager_reference(model, [model.a], list(model.a.parameters()))
    fm.freeze("a")
    fm(x).sum().backward()
    ref(x).sum().backward()
    assert model.a.weight.grad is None
    torch.testing.assert_close(model.b.weight.grad, ref.b.weight.grad, rtol=0, atol=0)


def test_code_that_reads_only_the_inputs_carries_no_data_flow_between_units():
    """A DDPM wrapper draws the timestep in its forward; the time embedding reads it, and so, through the noised
    input, does the first block (whose unit the timestep's code was counted in): the two fed each other and were
    merged into 'net.down0+net.temb', which cannot freeze apart."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x, e):
            return self.lin(x) + e

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.temb, self.down0, self.down1 = torch.nn.Linear(1, 8), Block(), Block()
            self.head = torch.nn.Linear(8, 2)

        def forward(self, x, t):
            e = self.temb(t)
            return self.head(self.down1(self.down0(x, e), e))

    class Diffusion(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Net()

        def forward(self, x0):
            t = x0[:, :1] * 0 + 1  # reads only the input (the timestep a DDPM draws here)
            return self.net(x0 * (t * 0.5), t)

    torch.manual_seed(0)
    model, x = Diffusion(), torch.randn(4, 8)
    fm = frzcompile.optimize(model, (x,), policy="manual", units=["net.temb", "net.down0", "net.down1", "net.head"])
    assert fm.units == ["net.temb", "net.down0", "net.down1", "net.head"] and not fm.unit_graph.merges
    ref = eager_reference(model, [model.net.temb, model.net.down0], list(model.net.temb.parameters()) +
                          list(model.net.down0.parameters()))
    fm.freeze("net.temb", "net.down0")
    assert fm.frozen_prefix == ("net.temb", "net.down0")
    fm(x).sum().backward()
    ref(x).sum().backward()
    torch.testing.assert_close(model.net.down1.lin.weight.grad, ref.net.down1.lin.weight.grad, rtol=0, atol=0)


def test_a_loss_that_branches_on_the_labels_values_is_captured_without_them():
    """DeBERTa's loss (`if (labels >= 0).nonzero().size(0) > 0`) and CTC losses branch on the labels' values:
    neither capture method could trace the example with labels, so the HF Trainer callback (whose example is the
    first training batch, labels included) failed at its first step. The units come from the forward without
    them; the model itself still runs with them."""
    import copy

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)

        def forward(self, x, labels=None):
            logits = self.head(torch.relu(self.b(torch.relu(self.a(x)))))
            if labels is None:
                return logits
            keep = (labels >= 0).nonzero().view(-1)
            if keep.size(0) > 0:  # data-dependent: no graph of this
                return torch.nn.functional.cross_entropy(logits[keep], labels[keep]), logits
            return logits.sum() * 0, logits

    torch.manual_seed(0)
    model, x, y = Classifier(), torch.randn(6, 8), torch.tensor([0, 2, -100, 1, 1, 0])
    ref = copy.deepcopy(model)
    fm = frzcompile.optimize(model, (x,), example_kwargs={"labels": y}, policy="manual")
    assert fm.units == ["a", "b", "head"] and "labels" not in fm._analysis.captured.kwargs
    assert "tried the example with its labels (captured without them) first" in str(frzcompile.explain(fm))
    fm.freeze("a")
    ref.a.requires_grad_(False)
    loss, _ = fm(x, labels=y)
    loss.backward()
    ref_loss, _ = ref(x, labels=y)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(model.b.weight.grad, ref.b.weight.grad)


def test_optimize_leaves_a_buffer_the_forward_updates_at_every_call_as_it_was():
    """A forward that counts its calls or keeps a running mean by hand (not only in training): capture's runs
    and explain's FLOP count moved them (3 calls before the first training step; 0.11 off eager at step 1); a
    buffer counted through `.data` and a momentum copy of the head's parameters (MoCo) moved too."""
    import copy

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))
            self.register_buffer("mean", torch.zeros(4))

            self.target = torch.nn.Linear(4, 2)  # a momentum copy of the head (MoCo's key encoder)
            self.register_buffer("seen", torch.zeros(()))

        def forward(self, x):
            self.calls += 1
            self.seen.data.add_(1)  # through .data: no version counter moves
            with torch.no_grad():
                self.mean.mul_(0.9).add_(0.1 * x.mean(0))
            for pt, p in zip(self.target.parameters(), self.head.parameters()):
                pt.data = 0.5 * pt.data + 0.5 * p.data
            return self.head(torch.relu(self.a(x - self.mean))) + self.target(x).detach()

    torch.manual_seed(0)
    model, x = Counting(), torch.randn(5, 4)
    ref = copy.deepcopy(model)
    fm = frzcompile.optimize(model, (x,), policy="manual")
    assert "fwd FLOPs" in str(frzcompile.explain(fm))
    assert int(model.calls) == 0 and torch.equal(model.mean, torch.zeros(4)) and float(model.seen) == 0
    torch.testing.assert_close(model.target.weight, ref.target.weight, rtol=0, atol=0)
    torch.testing.assert_close(fm(x), ref(x), rtol=0, atol=0)
    assert int(model.calls) == 1
    # a lazy module's buffers are not materialised before the capture runs it: nothing to keep (it raised)
    lazy = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LazyBatchNorm1d(), torch.nn.Linear(8, 2))
    assert frzcompile.optimize(lazy, (x,), policy="manual").units == ["0", "1", "2"]


def test_optimize_keeps_buffers_first_and_passes_over_meta_tensors(monkeypatch):
    """Parameters shared the copy budget with buffers, module by module: large parameters ahead of a queue buffer
    (MoCo) left it uncopied, and capture's runs wrote into it; a meta parameter (deferred init) made optimize()
    raise (values cannot be compared)."""
    from frzcompile import capture

    monkeypatch.setattr(capture, "KEPT_BUFFER_BYTES", 4096)

    class Memory(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("queue", torch.zeros(4, 30))  # 480 bytes

        def forward(self, h):
            self.queue[: len(h)] = h.detach()
            return h

    class Queue(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(30, 30)   # 3.7 KB of parameters: with the queue, beyond 4 KB
            self.memory = Memory()                # visited after proj, module by module
            self.head = torch.nn.Linear(30, 2)
            with torch.device("meta"):
                self.later = torch.nn.Linear(4, 4)  # initialised later, never called yet

        def forward(self, x):
            return self.head(self.memory(self.proj(x)))

    model = Queue()
    frzcompile.optimize(model, (torch.randn(4, 30),), policy="manual")
    assert not model.memory.queue.any()


def test_a_model_returning_a_plain_dataclass_is_captured():
    """The capture's check compared a plain @dataclass output with its `==` (ambiguous on tensors) and refused the
    model with advice that pointed the wrong way."""
    import dataclasses

    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor
        hidden: torch.Tensor
        note: str = "x"

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)

        def forward(self, x):
            h = self.b(torch.relu(self.a(x)))
            return Out(self.head(h), h)

    torch.manual_seed(0)
    model, x = M(), torch.randn(5, 4)
    fm = frzcompile.optimize(model, (x,), policy="manual")
    assert fm.capture_method == "symbolic_trace" and fm.units == ["a", "b", "head"]
    fm.freeze("a")
    out = fm(x)
    assert isinstance(out, Out)
    torch.testing.assert_close(out.logits, model.head(model.b(torch.relu(model.a(x)))))
    from frzcompile.numerics import tree_agree
    assert not tree_agree(Out(out.logits, out.hidden + 1), out)  # compared field by field


def test_freezing_part_of_a_merged_unit_warns_with_what_else_it_freezes():
    """A shared block interleaved with per-step adapters (`for a in adapters: h = a(shared(h))`): the shared block
    and the first adapters feed each other, so they are one unit, and freezing the block froze those adapters
    too, silently."""
    class Adapter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l = torch.nn.Linear(8, 8)

        def forward(self, x):
            return x + self.l(x)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.shared = torch.nn.Linear(4, 8), torch.nn.Linear(8, 8)
            self.adapters = torch.nn.ModuleList([Adapter() for _ in range(3)])
            self.head = torch.nn.Linear(8, 2)

        def forward(self, x):
            h = self.emb(x)
            for a in self.adapters:
                h = a(self.shared(h))
            return self.head(h)

    fm = frzcompile.optimize(Net(), (torch.randn(4, 4),), policy="manual")
    merged = next(u for u in fm.units if "shared" in u)
    assert "+" in merged and "adapters.0" in merged
    with pytest.warns(UserWarning, match=r"'shared' is part of unit .*freezes adapters\.0.* too"):
        fm.freeze("emb", "shared")
    assert merged in fm.frozen
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fm.freeze(merged)  # the whole unit, named as it is: nothing to warn about
        fm.unfreeze("shared")  # (nor on a thaw, which thaws the whole unit)
    assert merged not in fm.frozen


def test_user_units_override():
    from frzcompile import zoo

    x = torch.randn(2, 1, 12, 12)
    fm = frzcompile.optimize(zoo.ResNet(width=8), (x,), units=["conv1", "layer1", "layer2", "layer3", "fc"])
    assert fm.units == ["conv1", "layer1", "layer2", "layer3", "fc"]
    # bn1 is no unit: its parameters join the unit of the code that reads them
    assert "bn1.weight" in fm.unit_graph.units["conv1"].param_names
    fm.freeze("conv1", "layer1")
    assert fm.frozen_prefix == ("conv1", "layer1")
