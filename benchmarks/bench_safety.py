"""SmartFRZ's safety rules on runs that learn late: full training, SmartFRZ without the rules, SmartFRZ with them
(the default), side by side on the same initial weights and data order, on scikit-learn's digits.

Workloads: a plain CNN (six 3x3 convolutions with ReLU and pooling, no normalization, Kaiming init, linear head)
trained from scratch with SGD + momentum at learning rates 0.001 / 0.002 / 0.003 (750 steps, batch 32; its loss
stays flat for 150-300 steps before it falls), and the quickstart's SmallCNN with BatchNorm (690 steps, batch 64).

    python benchmarks/bench_safety.py
"""
import argparse
import platform
import time

import torch
from torch import nn

import frzcompile
from frzcompile import data, zoo


def plain_cnn():
    torch.manual_seed(0)
    return zoo.plain_cnn()


def small_cnn():
    torch.manual_seed(0)
    return zoo.SmallCNN(width=32, dropout=0.1)


WORKLOADS = {
    "plain CNN, lr 0.001": (plain_cnn, dict(lr=0.001, momentum=0.9), 32, 750),
    "plain CNN, lr 0.002": (plain_cnn, dict(lr=0.002, momentum=0.9), 32, 750),
    "plain CNN, lr 0.003": (plain_cnn, dict(lr=0.003, momentum=0.9), 32, 750),
    "demo SmallCNN": (small_cnn, dict(lr=0.05, momentum=0.9, weight_decay=5e-4), 64, 690),
}
VARIANTS = {"full": None, "SmartFRZ without the rules": lambda: frzcompile.SmartFRZ(safeguard=None),
            "SmartFRZ with the rules (default)": lambda: frzcompile.SmartFRZ()}


def run(workload, policy, digits):
    x, y, xt, yt = digits
    make, opt_args, batch, steps = WORKLOADS[workload]
    model = make()
    opt = torch.optim.SGD(model.parameters(), **opt_args)
    net = model if policy is None else frzcompile.optimize(model, (x[:batch],), optimizer=opt, policy=policy())
    g, step = torch.Generator().manual_seed(0), 0
    torch.manual_seed(0)
    net.train()
    start = time.perf_counter()
    while step < steps:
        for idx in torch.randperm(len(x), generator=g).split(batch):
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
            opt.zero_grad()
            step += 1
            if step == steps:
                break
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        acc = 100 * (model(xt).argmax(1) == yt).float().mean().item()
    changes = [] if policy is None else [s for s, *_ in net.plan.changes]
    return acc, seconds, changes


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    digits = data.digits(seed=0)
    print(f"machine: {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"digits {len(digits[0])} train / {len(digits[2])} test\n")
    print("| workload | " + " | ".join(VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    for workload in WORKLOADS:
        cells, full = [], None
        for policy in VARIANTS.values():
            acc, seconds, changes = run(workload, policy, digits)
            full = acc if full is None else full
            steps = f", plan changes at steps {changes[0]}-{changes[-1]}" if changes else ""
            delta = "" if policy is None else f" ({acc - full:+.1f})"
            cells.append(f"{acc:.1f}%{delta}, {seconds:.1f} s{steps}")
        print(f"| {workload} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
