"""The SmartFRZ policy's own cost per training step (issue 11: under 1% of training time).

Two copies of one recipe of frzcompile.predictor.collect, in one process: `policy="manual"` and SmartFRZ with the
shipped predictor but a vote count no unit reaches (so nothing freezes and both do the same training work; the
difference is the policy's loss readings, weight samples, window features, predictor calls and safety
bookkeeping). Both first train until SmartFRZ's predictor has a full window (300 steps), so every measured
decision calls it; then blocks of 10 steps (one decision each), interleaved in a shuffled order each round; medians
after the first rounds (warm-up). The time inside SmartFRZ's `decide` is also timed on its own (the rest of its
cost, reading the loss each step, shows only in the ratio).

    python benchmarks/bench_policy_cost.py [--families mlp-digits,resnet-fashion,transformer-sst2] [--rounds 40]
                                           [--data PATH]
"""
import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import interleaved, print_table  # noqa: E402

from frzcompile.policies import SmartFRZ  # noqa: E402
from frzcompile.predictor import WINDOW  # noqa: E402
from frzcompile.predictor.collect import families, start_run, train_step  # noqa: E402

BLOCK = 10   # steps per measurement: one policy decision each
WARMUP = 5   # rounds left out of the medians


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="mlp-digits,resnet-fashion,transformer-sst2")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--data", default=None, help="data folder (default: ../shared/data or $FRZ_DATA)")
    args = parser.parse_args()
    print(f"machine: {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    makers = families(args.data)
    rows = []
    for family in args.families.split(","):
        runs = {}
        smartfrz = SmartFRZ(votes=10**9)
        for name, policy in (("manual", "manual"), ("smartfrz", smartfrz)):
            recipe = makers[family](0)
            runs[name] = start_run(recipe, 0, policy, recipe.steps)
            fm, opt, lr, stream = runs[name]
            for _ in range(WINDOW * smartfrz.interval):  # until the predictor judges
                train_step(fm, opt, lr, next(stream))
        decide, inside = smartfrz.decide, []

        def timed_decide(view):
            start = time.perf_counter()
            out = decide(view)
            inside.append(time.perf_counter() - start)
            return out
        smartfrz.decide = timed_decide

        def measure(name):
            fm, opt, lr, stream = runs[name]
            start = time.perf_counter()
            for _ in range(BLOCK):
                train_step(fm, opt, lr, next(stream))
            return (time.perf_counter() - start) / BLOCK

        times = interleaved(runs, args.rounds, measure)
        manual, smart = (statistics.median(times[n][WARMUP:]) for n in ("manual", "smartfrz"))
        assert not runs["smartfrz"][0].frozen and smartfrz.last_probabilities  # same training work; it judged
        blocks = [sum(inside[i:i + BLOCK]) for i in range(0, len(inside), BLOCK)]  # one decision per block
        decision = statistics.median(blocks[WARMUP:])
        rows.append((family, f"{1000 * manual:.2f}", f"{1000 * smart:.2f}", f"{smart / manual:.3f}x",
                     f"{1000 * decision:.2f}", f"{100 * decision / (BLOCK * manual):.2f}%"))
    print_table(("family", "manual ms/step", "SmartFRZ ms/step (nothing frozen)", "ratio",
                 "ms in decide per 10 steps", "share of manual time"), rows)


if __name__ == "__main__":
    main()
