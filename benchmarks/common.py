"""Helpers shared by the benchmarks: prefix choice by FLOP share, plan switching, timed training steps."""
import argparse
import copy
import os
import platform
import random
import statistics
import time

from torch import nn


def choose_prefixes(fm, targets):
    """For each target FLOP share, the number k of leading units whose share is closest (last unit excluded)."""
    flops = fm.unit_flops()
    total = sum(flops.values())
    cumulative, shares = 0.0, [0.0]
    for u in fm.units[:-1]:
        cumulative += flops[u] / total
        shares.append(cumulative)
    picks = []
    for f in targets:
        k = min(range(len(shares)), key=lambda i: abs(shares[i] - f))
        picks.append((f, k, shares[k]))
    return picks


def set_prefix(fm, k):
    """Freeze exactly the first k units, touching only the units that change (so a deepening prefix keeps
    the activation cache of the shallower one)."""
    target = set(fm.units[:k])
    thaw = [u for u in fm.frozen if u not in target]
    if thaw:
        fm.unfreeze(*thaw)
    more = [u for u in fm.units[:k] if u not in fm.frozen]
    if more:
        fm.freeze(*more)


def train_step(net, opt, batch):
    *inputs, y = batch
    loss = nn.functional.cross_entropy(net(*inputs), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


def time_steps(net, opt, batches, steps, warmup=1):
    """Mean seconds per training step over `steps` steps (after `warmup` untimed ones), cycling `batches`."""
    for i in range(warmup):
        train_step(net, opt, batches[i % len(batches)])
    start = time.perf_counter()
    for i in range(steps):
        train_step(net, opt, batches[i % len(batches)])
    return (time.perf_counter() - start) / steps


def median_iqr(values):
    q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return statistics.median(values), q1, q3


def interleaved(jobs, rounds, measure, seed=0):
    """`measure(job)` for every job, round after round, in a fresh shuffled order each round (so drift in a
    shared machine's speed spreads over all jobs); returns job -> list of measurements."""
    jobs = list(jobs)
    results = {job: [] for job in jobs}
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(jobs)
        for job in jobs:
            results[job].append(measure(job))
    return results


def print_table(header, rows):
    """Print a Markdown table (the format RESULTS.md keeps)."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


def workload_args(doc, add_arguments=None, workloads=("fashion", "minilm")):
    """Command line of the benchmarks that train on real workloads (Fashion-MNIST, SST-2); prints the machine.
    `add_arguments(parser)` adds a benchmark's own options."""
    import torch

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="data folder (default: ../shared/data or $FRZ_DATA)")
    parser.add_argument("--only", choices=list(workloads), default=None)
    parser.add_argument("--seed", type=int, default=0,
                        help="initial weights (the new head's, for MiniLM) and data order")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    args.machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"machine: {args.machine}; seed {args.seed}\n")
    return args


def fresh_run(base, train, epochs, batch, make_opt):
    """A copy of `base` with its optimizer and a cosine schedule over the whole run, for one training run of a
    workload: (model, inputs, labels, steps_per_epoch, total_steps, optimizer, schedule)."""
    import torch

    model = copy.deepcopy(base)
    *inputs, labels = train
    steps_per_epoch = len(labels) // batch
    total = epochs * steps_per_epoch
    opt = make_opt(model.parameters())
    return model, inputs, labels, steps_per_epoch, total, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
