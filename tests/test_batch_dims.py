"""The operation-level sample-independence check (frzcompile/cache/batch_dims.py): per-sample code passes, every
kind of mixing across the batch is named."""
import pytest
import torch
from torch import nn

from frzcompile.cache.batch_dims import OpRecorder, batch_mixing


def mixing(f, x):
    half = x[: x.shape[0] // 2]
    with torch.no_grad():
        with OpRecorder() as full_run:
            f(x)
        with OpRecorder() as half_run:
            f(half)
    assert full_run.ops, "nothing was recorded"
    return batch_mixing(full_run.ops, half_run.ops)


torch.manual_seed(0)
MHA = nn.MultiheadAttention(16, 4, batch_first=True).eval()
MHA_SEQ_FIRST = nn.MultiheadAttention(16, 4).eval()
ENCODER = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True).eval()
ENCODER_NORM_FIRST = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, norm_first=True).eval()
CONV = nn.Sequential(nn.Conv2d(5, 8, 3), nn.BatchNorm2d(8).eval(), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
BN_TRAIN = nn.BatchNorm1d(5).train()

PER_SAMPLE = {
    "attention, batch first": lambda t: MHA(t, t, t, need_weights=False),
    "attention, sequence first": lambda t: MHA_SEQ_FIRST(*(t.transpose(0, 1),) * 3),
    "encoder layer": ENCODER,
    "encoder layer, padding mask": lambda t: ENCODER_NORM_FIRST(t, src_key_padding_mask=torch.zeros(
        t.shape[:2], dtype=torch.bool)),
    "BatchNorm in eval": nn.BatchNorm1d(5).eval(),
    "instance norm (BatchNorm on a (1, B*C) view)": nn.InstanceNorm1d(5),
    "conv net": lambda t: CONV(t.reshape(t.shape[0], 5, 4, 4)),
    "layer norm and softmax": lambda t: torch.softmax(nn.functional.layer_norm(t, (16,)), -1),
    "masked writes": lambda t: t.masked_fill(t > 0, 0) + t.clone().index_put_((t > 1,), torch.tensor(0.0)),
    "class token": lambda t: t[:, 0] * 2,
    "identity index by arange (HF masks)": lambda t: t[torch.arange(t.shape[0])[:, None], torch.arange(5)[None]],
    "a branch on a batch-wide value": lambda t: t * 2 if bool((t > -100).all()) else t * 2,
    "repeat along features": lambda t: t.repeat(1, 2, 1),
    "per-sample matmul": lambda t: t @ torch.ones(16, 4),
}
MIXING = {
    "total": (lambda t: t.sum() + t, "reduces across the batch"),
    "scale by the batch maximum": (lambda t: t / t.abs().amax(), "aten.amax"),
    "mask.amin(0)": (lambda t: t * (t > 0).amin(0), "aten.amin"),
    "minus the batch mean": (lambda t: t - t.mean(0), "aten.mean"),
    "x @ x.T": (lambda t: t.flatten(1) @ t.flatten(1).T, "contracts samples"),
    "a permutation": (lambda t: t[torch.randperm(t.shape[0])], "indexes along the batch"),
    "BatchNorm on batch statistics": (BN_TRAIN, "batch statistics"),
    "sort(0)": (lambda t: t.sort(0).values, "sort over dim [0]"),
    "cumsum(0)": (lambda t: t.cumsum(0), "cumsum over dim [0]"),
    "softmax(0)": (lambda t: t.softmax(0), "_softmax over dim [0]"),
    "cat along the batch": (lambda t: torch.cat([t, t], 0), "concatenates along the batch"),
    "the first sample for all": (lambda t: t[:1].expand_as(t) + t, "takes part of the batch"),
    "roll(0)": (lambda t: t.roll(1, 0), "roll over dim [0]"),
    "boolean selection": (lambda t: t[t > 0].sum() + t, "indexes along the batch"),
    "a batch-wide value used as a tensor": (lambda t: t * (t > 0).all(), "aten.all"),
    "a batch-wide number used in arithmetic": (lambda t: t / t.abs().max().item(), "aten.max"),
    "flip over two dims": (lambda t: t.flip(2, 0), "flip over dim [0]"),
    "roll over two dims": (lambda t: t.roll((1, 1), (2, 0)), "roll over dim [0]"),
    "unfold along the batch": (lambda t: t.unfold(0, 2, 1).sum(-1) + 0, "unfold over dim [0]"),
    "a matrix over the batch": (lambda t: torch.ones(t.shape[0], t.shape[0]) @ t.flatten(1), "contracts over the batch"),
    "amax over two dims": (lambda t: t - t.amax(dim=(1, 0), keepdim=True), "aten.amax"),
    "pairwise distances (aten._cdist_forward)": (lambda t: torch.cdist(t.flatten(1), t.flatten(1)).mean(-1),
                                                 "contracts samples"),
}


@pytest.mark.parametrize("name", list(PER_SAMPLE))
def test_per_sample_code_passes(name):
    assert mixing(PER_SAMPLE[name], torch.randn(8, 5, 16)) == ""


@pytest.mark.parametrize("name", list(MIXING))
def test_mixing_is_named(name):
    f, expected = MIXING[name]
    assert expected in mixing(f, torch.randn(8, 5, 16))


def test_repeat_along_the_batch():
    assert "repeats along the batch" in mixing(lambda t: t.repeat(2, 1, 1), torch.randn(8, 5, 16))


def test_code_that_depends_on_the_batch_size():
    assert "depends on the batch size" in mixing(lambda t: t * 2 if t.shape[0] > 4 else t + 1, torch.randn(8, 3))
