"""The SmartFRZ policy's own cost per training step (issue 11: under 1% of training time).

Two copies of one recipe of frzcompile.predictor.collect, in one process: `policy="manual"` and SmartFRZ with a
predictor that never says converged (so nothing freezes and both do the same training work; the difference is
the policy's weight samples, window features, predictor calls and safety bookkeeping). Blocks of 10 steps,
interleaved in a shuffled order each round; medians after the first rounds (warm-up).

    python benchmarks/bench_policy_cost.py [--families mlp-digits,transformer-sst2] [--rounds 40] [--data PATH]
"""
import argparse
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import interleaved, print_table  # noqa: E402

from frzcompile.policies import SmartFRZ  # noqa: E402
from frzcompile.predictor.collect import families, start_run, train_step  # noqa: E402

BLOCK = 10   # steps per measurement: one policy decision each
WARMUP = 5   # rounds left out of the medians


class NeverConverged(nn.Module):
    """A predictor whose every answer is "not converged"."""

    def forward(self, tokens, scalars):
        return torch.full((len(tokens),), -10.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="mlp-digits,transformer-sst2")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--data", default=None, help="data folder (default: ../shared/data or $FRZ_DATA)")
    args = parser.parse_args()
    print(f"machine: {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    makers = families(args.data)
    rows = []
    for family in args.families.split(","):
        runs = {}
        for name, policy in (("manual", "manual"), ("smartfrz", SmartFRZ(predictor=NeverConverged()))):
            recipe = makers[family](0)
            runs[name] = start_run(recipe, 0, policy, recipe.steps)

        def measure(name):
            fm, opt, lr, stream = runs[name]
            start = time.perf_counter()
            for _ in range(BLOCK):
                train_step(fm, opt, lr, next(stream))
            return (time.perf_counter() - start) / BLOCK

        times = interleaved(runs, args.rounds, measure)
        manual, smart = (statistics.median(times[n][WARMUP:]) for n in ("manual", "smartfrz"))
        assert not runs["smartfrz"][0].frozen  # the same training work in both
        rows.append((family, f"{1000 * manual:.2f}", f"{1000 * smart:.2f}", f"{smart / manual:.3f}x"))
    print_table(("family", "manual ms/step", "SmartFRZ ms/step (nothing frozen)", "ratio"), rows)


if __name__ == "__main__":
    main()
