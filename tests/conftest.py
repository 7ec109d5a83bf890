import copy
import os

# Triton's interpreter runs the kernels on CPU tensors. It must be on before anything imports Triton (which
# torch.utils.flop_counter does), because triton.jit decides at decoration time, for Triton's own helpers too.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from torch import nn

from frzcompile import zoo


def _bert_case():
    pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (4, 12), generator=g)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[1, 8:] = 0
    return zoo.tiny_bert(layers=3), (), {"input_ids": ids, "attention_mask": mask}


def _case(name):
    torch.manual_seed(0)
    if name == "mlp":
        return zoo.mlp(in_features=64, hidden=32, depth=3), (torch.randn(6, 64),), {}
    if name == "cnn":
        return zoo.SmallCNN(width=8, dropout=0.2), (torch.randn(6, 1, 8, 8),), {}
    if name == "resnet":
        return zoo.ResNet(depths=(2, 2, 2), width=8), (torch.randn(6, 1, 12, 12),), {}
    if name == "transformer":
        return zoo.TransformerClassifier(vocab=50, d_model=32, nhead=2, layers=3), (torch.randint(0, 50, (6, 10)),), {}
    if name == "bert":
        return _bert_case()
    raise KeyError(name)


MODELS = ["mlp", "cnn", "resnet", "transformer", "bert"]


@pytest.fixture(params=MODELS)
def model_case(request):
    return (request.param,) + _case(request.param)


def make_case(name):
    return _case(name)


def output_tensor(out):
    """The main tensor of a model output (a tensor, or a Hugging Face ModelOutput)."""
    return out if isinstance(out, torch.Tensor) else out.logits


def eager_reference(model, frozen_modules, frozen_params):
    """A deep copy of `model` frozen the plain PyTorch way: requires_grad=False and eval() on frozen modules."""
    ref = copy.deepcopy(model)
    names = {id(p): n for n, p in model.named_parameters()}
    ref_params = dict(ref.named_parameters())
    for p in frozen_params:
        ref_params[names[id(p)]].requires_grad_(False)
    ref_modules = dict(ref.named_modules())
    orig_names = {id(m): n for n, m in model.named_modules()}
    for m in frozen_modules:
        ref_modules[orig_names[id(m)]].eval()
    return ref


def train_losses(fm, opt, batches):
    """Plain training steps over an iterable of (x, y); the loss of each step."""
    losses = []
    for x, y in batches:
        loss = nn.functional.cross_entropy(fm(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses
