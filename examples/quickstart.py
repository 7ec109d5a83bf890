"""Quickstart: train a small CNN on scikit-learn's digits, with and without frzcompile, side by side.

    python examples/quickstart.py [--epochs 30] [--policy smartfrz|linear|autofreeze|manual] [--cache]
                                  [--sparsity 0.8] [--compile]

Both runs start from the same weights and see the same batches; the frzcompile run lets a policy freeze a
growing prefix of the network. It prints time and test accuracy of both, then frzcompile.explain.
"""
import argparse
import copy
import time

import torch
from torch import nn
from tqdm import tqdm

import frzcompile
from frzcompile import data, zoo


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def train(model, x, y, epochs, batch_size, seed, label, fm_factory=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    net = fm_factory(model, opt) if fm_factory else model
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net.train()
    start = time.perf_counter()
    for _ in tqdm(range(epochs), desc=label, unit="epoch", leave=False):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
    return net, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--policy", default="smartfrz", choices=["smartfrz", "linear", "autofreeze", "manual"])
    parser.add_argument("--cache", action="store_true", help="serve the frozen prefix from the activation cache")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="also train sparse: MEST masks on this fraction of the conv weights, taken together")
    parser.add_argument("--compile", action="store_true", help="run through torch.compile(backend='frzcompile')")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    x_train, y_train, x_test, y_test = data.digits(seed=args.seed)
    print(f"digits: {len(x_train)} train / {len(x_test)} test images of 8x8")
    torch.manual_seed(args.seed)
    base = zoo.SmallCNN(width=32, dropout=0.1)
    steps = args.epochs * -(-len(x_train) // args.batch_size)

    plain, plain_s = train(copy.deepcopy(base), x_train, y_train, args.epochs, args.batch_size, args.seed, "plain")

    def make_fm(model, opt):
        policy = {"smartfrz": frzcompile.SmartFRZ(), "linear": frzcompile.Linear(total_steps=steps),
                  "autofreeze": frzcompile.AutoFreeze(interval=40), "manual": "manual"}[args.policy]
        sparsity = None
        if args.sparsity is not None:
            sparsity = frzcompile.SparsityConfig(args.sparsity, source="mest", update_interval=100)
        return frzcompile.optimize(model, (x_train[: args.batch_size],), optimizer=opt, policy=policy,
                                   total_steps=steps, cache=args.cache, sparsity=sparsity, compile=args.compile)

    fm, fm_s = train(copy.deepcopy(base), x_train, y_train, args.epochs, args.batch_size, args.seed,
                     "frzcompile", make_fm)

    print(f"\n{'run':<24}{'train time':>12}{'test accuracy':>15}")
    print(f"{'plain PyTorch':<24}{plain_s:>11.2f}s{100 * accuracy(plain, x_test, y_test):>14.2f}%")
    print(f"{'frzcompile ' + args.policy:<24}{fm_s:>11.2f}s{100 * accuracy(fm, x_test, y_test):>14.2f}%")
    print(f"speedup {plain_s / fm_s:.2f}x over {steps} steps\n")
    print(frzcompile.explain(fm))


if __name__ == "__main__":
    main()
