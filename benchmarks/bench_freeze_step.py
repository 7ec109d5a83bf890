"""Training-step time with a frozen prefix holding fraction f of forward FLOPs, against the FLOP-model ideal.

Without an activation cache a training step costs about F * (3 - 2f): the forward of everything (1), plus the
backward (2) of the trainable part only. So the ideal speedup over training everything is 3 / (3 - 2f).

For a ResNet and a transformer encoder, and f near 0, 0.25, 0.5 and 0.75 (the prefix of whole units closest
to it, by FLOPs counted with torch.utils.flop_counter), it times full training steps (forward, loss,
backward, SGD step) of:
  - eager:      the plain model, nothing frozen (the reference every speedup is relative to);
  - frzcompile: frzcompile.optimize(...) with the prefix frozen;
  - by hand:    the plain model with the prefix's requires_grad=False and its modules in eval().
All variants are timed interleaved, round after round, in one process; medians over rounds are reported.

    python benchmarks/bench_freeze_step.py [--rounds 9] [--steps 4] [--data PATH] [--out FILE.json]
"""
import argparse
import copy
import json
import platform
import statistics

import torch

import frzcompile
from common import choose_prefixes, interleaved, median_iqr, print_table, set_prefix, time_steps
from frzcompile import data, zoo

TARGETS = (0.0, 0.25, 0.5, 0.75)


def make_workloads(data_root):
    torch.manual_seed(0)
    try:
        x, y = data.fashion_mnist(data_root, "train")
        images, labels, source = x[:64], y[:64], "Fashion-MNIST"
    except FileNotFoundError:
        images, labels, source = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,)), "random"
    try:
        texts, sst_labels = data.sst2(data_root, "train")
        # hash words into the toy vocabulary: enough for timing, the content does not change the cost
        ids = torch.tensor([[hash(w) % 1000 for w in (t.split() + ["<pad>"] * 64)[:64]] for t in texts[:32]])
        tokens, token_labels, text_source = ids, sst_labels[:32], "SST-2 words hashed"
    except FileNotFoundError:
        tokens, token_labels, text_source = torch.randint(0, 1000, (32, 64)), torch.randint(0, 2, (32,)), "random"
    return [
        ("ResNet (3 stages x 2 BasicBlocks, width 16), batch 64 of 1x28x28 " + source,
         zoo.ResNet(depths=(2, 2, 2), width=16), images, labels),
        ("Transformer encoder (6 layers, d=128, 4 heads), batch 32 x 64 tokens " + text_source,
         zoo.TransformerClassifier(vocab=1000, d_model=128, nhead=4, layers=6, max_len=64, dropout=0.1),
         tokens, token_labels),
    ]


def set_by_hand(model, fm, prefix):
    """Plain-PyTorch freezing of the same units: requires_grad=False and eval() on their modules."""
    names = {id(p): n for n, p in fm.model.named_parameters()}
    params = dict(model.named_parameters())
    modules = {id(m): n for n, m in fm.model.named_modules()}
    own = dict(model.named_modules())
    frozen = {names[id(p)] for u in prefix for p in fm.unit_graph.units[u].params}
    for n, p in params.items():
        p.requires_grad_(n not in frozen)
    model.train()
    for u in prefix:
        for m in fm.unit_graph.units[u].modules:
            own[modules[id(m)]].eval()


def bench(label, model, x, y, rounds, steps):
    fm_model, hand_model, eager_model = model, copy.deepcopy(model), copy.deepcopy(model)
    fm_opt = torch.optim.SGD(fm_model.parameters(), lr=0.01, momentum=0.9)
    fm = frzcompile.optimize(fm_model, (x,), optimizer=fm_opt)
    hand_opt = torch.optim.SGD(hand_model.parameters(), lr=0.01, momentum=0.9)
    eager_opt = torch.optim.SGD(eager_model.parameters(), lr=0.01, momentum=0.9)
    picks = choose_prefixes(fm, TARGETS)
    batches = [(x, y)]
    jobs = [("eager", 0)] + [(variant, k) for _, k, _ in picks for variant in ("frzcompile", "by hand")]

    def measure(job):
        variant, k = job
        if variant == "eager":
            return time_steps(eager_model, eager_opt, batches, steps)
        if variant == "frzcompile":
            set_prefix(fm, k)
            return time_steps(fm, fm_opt, batches, steps)
        set_by_hand(hand_model, fm, fm.units[:k])
        return time_steps(hand_model, hand_opt, batches, steps)

    times = interleaved(jobs, rounds, measure)
    base = statistics.median(times[("eager", 0)])
    rows = []
    for target, k, share in picks:
        ideal = 3.0 / (3.0 - 2.0 * share)
        row = {"target_f": target, "units_frozen": k, "f": share, "ideal_speedup": ideal,
               "eager_ms": 1000 * base}
        for variant in ("frzcompile", "by hand"):
            med, q1, q3 = median_iqr(times[(variant, k)])
            row[variant] = {"ms": 1000 * med, "iqr_ms": (1000 * q1, 1000 * q3), "speedup": base / med,
                            "of_ideal": base / med / ideal}
        rows.append(row)
    return {"workload": label, "units": fm.units, "rows": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--data", default=None, help="data folder holding fashion-mnist/ and sst2/")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"machine: {machine}; {args.rounds} rounds x {args.steps} steps, medians\n")
    results = {"machine": machine, "rounds": args.rounds, "steps": args.steps, "workloads": []}
    for label, model, x, y in make_workloads(args.data):
        res = bench(label, model, x, y, args.rounds, args.steps)
        results["workloads"].append(res)
        print(f"### {label}\nunits: {', '.join(res['units'])}\n")
        print_table(
            ("target f", "frozen units", "f (FLOPs)", "ideal speedup", "eager ms", "frzcompile ms", "speedup",
             "of ideal", "by hand ms", "speedup", "of ideal"),
            [(f"{r['target_f']:.2f}", r["units_frozen"], f"{r['f']:.3f}", f"{r['ideal_speedup']:.2f}x",
              f"{r['eager_ms']:.1f}")
             + tuple(x for v in (r["frzcompile"], r["by hand"])
                     for x in (f"{v['ms']:.1f}", f"{v['speedup']:.2f}x", f"{100 * v['of_ideal']:.0f}%"))
             for r in res["rows"]])
        print()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
