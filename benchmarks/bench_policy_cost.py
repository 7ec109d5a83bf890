"""The SmartFRZ policy's own cost per training step (issue 11: under 1% of training time).

Four copies of one recipe of frzcompile.predictor.collect, in one process: `policy="manual"`; SmartFRZ with the
shipped predictor and its safety rules, except that no freeze is admitted (all do the same training work; the
difference is the policy's loss readings, weight samples, safety checks and, where the rules would let a freeze
through, window features and predictor calls), as the default (which steps aside for the run when its decisions
cost more than max_cost=1% of the training time) and with max_cost=None (deciding whatever it costs); and the
latter with rules that never hold back ("judging"), the worst case, where the predictor judges the front unit at
every decision. All first train until the
predictor has a full window (300 steps); then blocks of 10 steps (one decision each), interleaved in a shuffled
order each round; medians after the first rounds (warm-up). The time inside SmartFRZ's
`decide` is also timed on its own (the rest of its cost, reading the loss each step, shows only in the ratio).
The recipes give the loss with `fm.observe_loss`; `--plain-loop` leaves it out, so the rules read the gradient
reaching the model's output (the cross-entropy worked out from it), as in a plain loop.

    python benchmarks/bench_policy_cost.py [--families mlp-digits,resnet-fashion,transformer-sst2] [--rounds 40]
                                           [--data PATH] [--plain-loop]
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
from frzcompile.predictor.collect import _first_tensor, families, start_run, train_step  # noqa: E402
from frzcompile.safety import Safeguard  # noqa: E402

BLOCK = 10   # steps per measurement: one policy decision each
WARMUP = 5   # rounds left out of the medians


class NeverFreezes(Safeguard):
    """The default rules, except that no freeze is admitted: the same training work as policy="manual"."""

    def admit(self, view, frozen, proposed, reason):
        return set(frozen)


class NeverHoldsBack(NeverFreezes):
    """As if every decision could freeze: the predictor judges the front unit at each one."""

    def closed(self, view, frozen):
        return False


def plain_step(fm, opt, lr, batch):
    """collect.train_step without fm.observe_loss: a plain loop's step."""
    *xb, yb = batch
    torch.nn.functional.cross_entropy(_first_tensor(fm(*xb)), yb).backward()
    opt.step()
    opt.zero_grad()
    lr.step()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="mlp-digits,resnet-fashion,transformer-sst2")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--data", default=None, help="data folder (default: ../shared/data or $FRZ_DATA)")
    parser.add_argument("--plain-loop", action="store_true",
                        help="no fm.observe_loss: the rules read the gradient reaching the model's output")
    args = parser.parse_args()
    step = plain_step if args.plain_loop else train_step
    print(f"machine: {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    makers = families(args.data)
    rows = []
    for family in args.families.split(","):
        runs, policies = {}, {"smartfrz": SmartFRZ(safeguard=NeverFreezes(min_gap=30)),
                               "deciding": SmartFRZ(safeguard=NeverFreezes(min_gap=30), max_cost=None),
                               "judging": SmartFRZ(safeguard=NeverHoldsBack(min_gap=30), max_cost=None)}
        for name, policy in (("manual", "manual"), *policies.items()):
            recipe = makers[family](0)
            runs[name] = start_run(recipe, 0, policy, recipe.steps)
            fm, opt, lr, stream = runs[name]
            for _ in range(WINDOW * 10):  # until the predictor has a full window (interval 10)
                step(fm, opt, lr, next(stream))
        inside = {name: [] for name in policies}
        for name, policy in policies.items():
            decide = policy.decide

            def timed_decide(view, decide=decide, into=inside[name]):
                start = time.perf_counter()
                out = decide(view)
                into.append(time.perf_counter() - start)
                return out
            policy.decide = timed_decide

        def measure(name):
            fm, opt, lr, stream = runs[name]
            start = time.perf_counter()
            for _ in range(BLOCK):
                step(fm, opt, lr, next(stream))
            return (time.perf_counter() - start) / BLOCK

        times = interleaved(runs, args.rounds, measure)
        manual = statistics.median(times["manual"][WARMUP:])
        assert not any(runs[n][0].frozen for n in policies) and policies["judging"].last_probabilities
        default = policies["smartfrz"]
        row = [family, f"{1000 * manual:.2f}"]
        for name in policies:
            per_step = statistics.median(times[name][WARMUP:])
            blocks = [sum(inside[name][i:i + BLOCK]) for i in range(0, len(inside[name]), BLOCK)]  # a decision each
            decision = statistics.median(blocks[WARMUP:])
            row += [f"{1000 * per_step:.2f} ({per_step / manual:.3f}x)", f"{1000 * decision:.2f} ({100 * decision / (BLOCK * manual):.2f}%)"]
        row.append("yes" if policies["deciding"].last_probabilities else "no")
        row.append(f"{'at step ' + str(default.stepped_aside) if default.stepped_aside else 'no'} "
                   f"(measured {100 * default.cost:.2f}%)")
        rows.append(tuple(row))
    print_table(("family", "manual ms/step", "SmartFRZ (default) ms/step (ratio)", "ms in decide per 10 steps (share)",
                 "SmartFRZ, max_cost=None: ms/step (ratio)", "ms in decide per 10 steps (share)",
                 "judging at every decision: ms/step (ratio)", "ms in decide per 10 steps (share)",
                 "the rules let the predictor judge (max_cost=None)", "the default stepped aside"), rows)


if __name__ == "__main__":
    main()
