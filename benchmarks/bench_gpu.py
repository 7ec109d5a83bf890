"""frzcompile against what a user would do instead, side by side in one process: training-step time and peak memory.

For each workload, every variant starts from the same weights and trains on the same batch (AdamW, bf16 autocast
on a GPU, fp32 on a CPU). All variants are built and warmed up (compiled), then timed in --rounds rounds, each
round running every variant for --steps steps in a fresh random order, so that drift of the machine spreads
over all of them; the median step and the quartiles are reported. Memory: on a GPU the peak of a step, counted
as the variant's own resident tensors (parameters, optimizer state) plus what its step allocates beyond the
memory in use when it starts; everywhere, the bytes autograd saves for backward in one step.
  eager            the plain model, nothing frozen
  fm none          frzcompile.optimize(model), nothing frozen
  by hand          the first half of the units frozen the plain-PyTorch way: requires_grad=False, their modules
                   in eval(), AdamW over the trainable parameters only
  fm half          frzcompile with the same units frozen (fm.freeze)
  fm half+cache    the same with cache=True, cycling over --cache-batches batches (warm: every sample a hit)
  compile by hand  torch.compile of the by-hand model
  fm compile       frzcompile.optimize(..., compile=True) with the same units frozen

Aims (issue 10): fm none >= 0.97x eager and peak memory <= eager; fm half >= by hand in time and memory;
fm compile >= compile by hand.

    python benchmarks/bench_gpu.py                       # a GPU: ResNet-50, BERT-base, ViT-B/16, GPT-2 small
    python benchmarks/bench_gpu.py --device cpu          # the CPU preset (a BERT-base-sized model among them)
    python benchmarks/bench_gpu.py --tiny                # smoke test of every path on tiny models (CI; not timed)
    options: --only bert,gpt  --rounds 4 --steps 5  --no-compile  --out results/gpu.json
"""
import argparse
import copy
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import frzcompile  # noqa: E402
from common import print_table  # noqa: E402

VARIANTS = ["eager", "fm none", "by hand", "fm half", "fm half+cache", "compile by hand", "fm compile"]


class Workload:
    """A model factory, a batch maker and the loss; `units` overrides frzcompile's automatic units."""

    def __init__(self, name, make, batch, loss, units=None):
        self.name, self.make, self.batch, self.loss, self.units = name, make, batch, loss, units


def _hf_loss(model, batch):
    return model(**batch).loss


def _ce_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def workloads(preset):
    """The workloads of a preset: "gpu" (the issue's sizes), "cpu" (what 2 CPU cores time in minutes), "tiny"."""
    import transformers as tf

    from frzcompile import zoo

    g = torch.Generator().manual_seed(0)

    def tokens(b, n, vocab, labels):
        ids = torch.randint(0, vocab, (b, n), generator=g)
        if labels == "lm":  # training a decoder: no key/value cache wanted (the activation cache refuses one)
            return {"input_ids": ids, "labels": ids, "use_cache": False}
        return {"input_ids": ids, "attention_mask": torch.ones(b, n, dtype=torch.long),
                "labels": torch.randint(0, labels, (b,), generator=g)}

    def images(b, size, classes):
        return torch.randn(b, 3, size, size, generator=g), torch.randint(0, classes, (b,), generator=g)

    def gpt2_units(layers):
        return ["transformer.wte", "transformer.wpe"] + [f"transformer.h.{i}" for i in range(layers)] + [
            "transformer.ln_f"]  # the tied lm_head reads wte's weight: no unit of its own

    if preset == "gpu":
        import torchvision

        return [
            Workload("ResNet-50, 64 x 3x224x224", lambda: torchvision.models.resnet50(), lambda: images(64, 224, 1000),
                     _ce_loss),
            Workload("BERT-base, 32 x 128 tokens", lambda: tf.BertForSequenceClassification(tf.BertConfig()),
                     lambda: tokens(32, 128, 30522, 2), _hf_loss),
            Workload("ViT-B/16, 64 x 3x224x224", lambda: tf.ViTForImageClassification(tf.ViTConfig(num_labels=1000)),
                     lambda: dict(zip(("pixel_values", "labels"), images(64, 224, 1000))), _hf_loss),
            Workload("GPT-2 small, 16 x 256 tokens", lambda: tf.GPT2LMHeadModel(tf.GPT2Config()),
                     lambda: tokens(16, 256, 50257, "lm"), _hf_loss, units=gpt2_units(12)),
        ]
    if preset == "cpu":
        return [
            Workload("ResNet (3x2 BasicBlocks, width 16), 64 x 1x28x28", lambda: zoo.ResNet(depths=(2, 2, 2), width=16),
                     lambda: (torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)),
                     _ce_loss),
            Workload("BERT-base (12 x 768), 4 x 64 tokens", lambda: tf.BertForSequenceClassification(tf.BertConfig()),
                     lambda: tokens(4, 64, 30522, 2), _hf_loss),
            Workload("ViT (6 x 256, patch 8), 16 x 3x64x64", lambda: tf.ViTForImageClassification(tf.ViTConfig(
                image_size=64, patch_size=8, hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
                intermediate_size=1024, num_labels=10)),
                lambda: dict(zip(("pixel_values", "labels"), images(16, 64, 10))), _hf_loss),
            Workload("GPT-2 (6 x 384), 4 x 128 tokens", lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
                n_embd=384, n_layer=6, n_head=6)), lambda: tokens(4, 128, 50257, "lm"), _hf_loss, units=gpt2_units(6)),
        ]
    return [
        Workload("tiny ResNet", lambda: zoo.ResNet(depths=(1, 1, 1), width=4),
                 lambda: (torch.randn(8, 1, 12, 12, generator=g), torch.randint(0, 10, (8,), generator=g)), _ce_loss),
        Workload("tiny BERT", lambda: tf.BertForSequenceClassification(tf.BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)),
            lambda: tokens(4, 16, 100, 2), _hf_loss),
        Workload("tiny ViT", lambda: tf.ViTForImageClassification(tf.ViTConfig(
            image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, num_labels=10)), lambda: dict(zip(("pixel_values", "labels"), images(4, 16, 10))),
            _hf_loss),
        Workload("tiny GPT-2", lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
            vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)),
            lambda: tokens(4, 16, 100, "lm"), _hf_loss, units=gpt2_units(2)),
    ]


def to_device(batch, device):
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return tuple(t.to(device) for t in batch)


def call_model(model, batch):
    return model(**batch) if isinstance(batch, dict) else model(batch[0])


def optimize_kwargs(batch):
    return {"example_kwargs": batch} if isinstance(batch, dict) else {"example_inputs": (batch[0],)}


def frozen_units(w, base, batch):
    """The first half of frzcompile's units for this model (also the ones frozen by hand)."""
    fm = frzcompile.optimize(copy.deepcopy(base), policy="manual", units=w.units, **optimize_kwargs(batch))
    half = fm.units[: len(fm.units) // 2]
    return half, [path for u in half for path in fm.unit_graph.paths(u)]


def build(variant, w, base, batch, paths, half, args):
    """(callable model, optimizer, the FrozenModule or None) for one variant, on args.device."""
    model = copy.deepcopy(base).to(args.device)
    model.train()
    compile_inner = "aot_eager" if args.tiny else "inductor"
    if variant == "eager":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-5), None
    if variant in ("by hand", "compile by hand"):
        for path in paths:
            module = model.get_submodule(path)
            for p in module.parameters():
                p.requires_grad_(False)
            module.eval()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        if variant == "compile by hand":
            return torch.compile(model, backend=compile_inner), opt, None
        return model, opt, None
    cache = frzcompile.CacheConfig(check_cost=False) if variant == "fm half+cache" else False
    compile = frzcompile.CompileConfig(inner=compile_inner) if variant == "fm compile" else False
    fm = frzcompile.optimize(model, policy="manual", units=w.units, cache=cache, compile=compile,
                             **optimize_kwargs(batch))
    if variant != "fm none":
        fm.freeze(*half)
    return fm, torch.optim.AdamW(model.parameters(), lr=1e-5), fm


class Runner:
    """One variant, built and warmed up, timed step by step."""

    def __init__(self, variant, w, base, batches, paths, half, args):
        self.variant, self.w = variant, w
        self.cuda = torch.device(args.device).type == "cuda"
        self.net, self.opt, self.fm = build(variant, w, base, batches[0], paths, half, args)
        self.cycle = batches if variant == "fm half+cache" else batches[:1]
        self.times, self.peak, self.saved, self.i = [], 0, 0, 0
        start = time.perf_counter()
        for _ in range(max(args.warmup, 2 * len(self.cycle)) if variant == "fm half+cache" else args.warmup):
            self.step()
        self.warmup_s = time.perf_counter() - start
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self.step()
        self.saved = saved[0]

    def resident(self) -> int:
        """Bytes of this variant's own long-lived tensors: parameters and optimizer state."""
        model = self.fm.model if self.fm is not None else getattr(self.net, "_orig_mod", self.net)
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        for state in self.opt.state.values():
            total += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
        return total

    def step(self):
        batch = self.cycle[self.i % len(self.cycle)]
        self.i += 1
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else torch.autocast("cpu", enabled=False)
        with amp:
            loss = self.w.loss(self.net, batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def timed(self, steps):
        for _ in range(steps):
            if self.cuda:
                torch.cuda.synchronize()
                resting = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            self.step()
            if self.cuda:
                torch.cuda.synchronize()
                self.peak = max(self.peak, self.resident() + torch.cuda.max_memory_allocated() - resting)
            self.times.append(time.perf_counter() - start)

    def result(self):
        q1, med, q3 = statistics.quantiles(self.times, n=4) if len(self.times) > 1 else [self.times[0]] * 3
        out = {"ms": 1000 * med, "iqr_ms": [1000 * q1, 1000 * q3], "saved_mb": self.saved / 2**20,
               "warmup_s": self.warmup_s}
        if self.cuda:
            out["peak_gib"] = self.peak / 2**30
        if self.fm is not None and self.fm.cache is not None:
            report = self.fm.cache.report()
            out["cache"] = {"decision": report["decision"], "hit_rate": report["hit_rate"]}
        return out


def measure_workload(w, variants, args):
    torch.manual_seed(0)
    base = w.make()
    batches = [to_device(w.batch(), args.device) for _ in range(args.cache_batches)]
    half, paths = frozen_units(w, copy.deepcopy(base).to(args.device), batches[0])
    torch._dynamo.reset()
    runners = {v: Runner(v, w, base, batches, paths, half, args) for v in variants}
    rng = random.Random(0)
    order = list(variants)
    for _ in range(args.rounds):
        rng.shuffle(order)
        for v in order:
            runners[v].timed(args.steps)
    row = {"workload": w.name, "frozen_units": half, **{v: runners[v].result() for v in variants}}
    del runners
    gc.collect()
    if torch.device(args.device).type == "cuda":
        torch.cuda.empty_cache()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny models, few steps: a smoke test of every path")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 4, tiny 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant and round (default 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, tiny 1)")
    parser.add_argument("--cache-batches", type=int, default=4)
    parser.add_argument("--only", default=None, help="comma-separated workload name prefixes (e.g. bert,gpt)")
    parser.add_argument("--no-compile", action="store_true", help="skip the two torch.compile variants")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.tiny else 4)
    args.steps = args.steps or (2 if args.tiny else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    preset = "tiny" if args.tiny else ("gpu" if args.device.startswith("cuda") else "cpu")
    warnings.filterwarnings("ignore", message=".*loss_type=None.*")
    if torch.device(args.device).type == "cuda":
        machine = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 autocast"
    else:
        machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, fp32"
    print(f"machine: {machine}; preset {preset}; {args.rounds} interleaved rounds x {args.steps} steps after "
          f"{args.warmup} warm-up steps, medians\n")
    variants = [v for v in VARIANTS if not (args.no_compile and "compile" in v)]
    started = time.perf_counter()
    results = {"machine": machine, "preset": preset, "rounds": args.rounds, "steps": args.steps, "workloads": []}
    for w in workloads(preset):
        if args.only and not any(w.name.lower().startswith(p.strip().lower()) for p in args.only.split(",")):
            continue
        row = measure_workload(w, variants, args)
        results["workloads"].append(row)
        half = row["frozen_units"]
        print(f"{w.name}: {len(half)} units frozen ({half[0]} .. {half[-1]}); "
              f"{time.perf_counter() - started:.0f} s elapsed")
    report(results, variants)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


def report(results, variants):
    cuda = "peak_gib" in results["workloads"][0]["eager"] if results["workloads"] else False
    mem = "peak_gib" if cuda else "saved_mb"
    unit = "GiB" if cuda else "MB saved"
    print(f"\nstep time (ms, median) and memory ({'peak allocated' if cuda else 'saved for backward per step'})\n")
    print_table(["workload"] + variants,
                [[r["workload"]] + [f"{r[v]['ms']:.1f} ms ({r[v]['iqr_ms'][0]:.1f}-{r[v]['iqr_ms'][1]:.1f}), "
                                    f"{r[v][mem]:.2f} {unit}" for v in variants]
                 for r in results["workloads"]])
    pairs = [("fm none", "eager", "fm none / eager"), ("fm half", "by hand", "fm half / by hand"),
             ("fm half+cache", "by hand", "cached / by hand"), ("fm compile", "compile by hand",
                                                                "fm compile / compile by hand")]
    pairs = [p for p in pairs if p[0] in variants and p[1] in variants]
    print("\nspeed ratios (> 1: frzcompile faster) and memory ratios (< 1: frzcompile smaller)\n")
    rows = []
    for r in results["workloads"]:
        cells = [r["workload"]]
        for a, b, _ in pairs:
            cells.append(f"{r[b]['ms'] / r[a]['ms']:.2f}x time, {r[a][mem] / max(r[b][mem], 1e-9):.2f}x mem")
        rows.append(cells)
    print_table(["workload"] + [label for _, _, label in pairs], rows)
    if "fm compile" in variants:
        print("\nwarm-up (compile) seconds: " + "; ".join(
            f"{r['workload']}: compile by hand {r['compile by hand']['warmup_s']:.0f}, fm compile "
            f"{r['fm compile']['warmup_s']:.0f}" for r in results["workloads"]))
    for r in results["workloads"]:
        if "fm half+cache" in r and "cache" in r["fm half+cache"]:
            c = r["fm half+cache"]["cache"]
            print(f"\n{r['workload']} cache: {c['decision']}; hit rate {100 * c['hit_rate']:.0f}%")


if __name__ == "__main__":
    main()
