"""Validation by outcome: what the SmartFRZ policy's decisions do to whole training runs.

    python -m frzcompile.predictor.outcome --runs runs.pt --out outcome.json [--families ...] [--seeds 0]
        [--predictors held-out,shipped]
    python -m frzcompile.predictor.outcome --predictors shipped --out outcome.json [--families ...]  (no windows)

For each family, a predictor is trained on the recorded windows of every *other* family (leave one family out,
as `train` does for window AUC), then the family's own recipe (frzcompile.predictor.collect) is trained twice
from the same initial weights and data order: with nothing frozen, and under SmartFRZ with that held-out
predictor and its default safety rules. Each run reports the test accuracy at its end, training FLOPs
(torch.utils.flop_counter, on every SAMPLE-th step), wall time and the freeze decisions. `--predictors
held-out,shipped` also scores the shipped predictor against the same full run (not held out for the families it
was trained on).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from ..policies import SmartFRZ
from . import load_default
from .collect import _first_tensor, families, start_run, train_step
from .train import _stack, fit

SAMPLE = 10  # every SAMPLE-th step (offset 5, away from the policy's decision steps) counts FLOPs, untimed


def accuracy(fm, test, batch: int = 256) -> float:
    """Top-1 accuracy of `fm` on `test` (inputs..., labels), in eval mode; the training mode is restored."""
    *inputs, labels = test
    was_training = fm.training
    fm.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), batch):
            logits = _first_tensor(fm(*(t[i:i + batch] for t in inputs)))
            correct += int((logits.argmax(-1) == labels[i:i + batch]).sum())
    fm.train(was_training)
    return correct / len(labels)


def whole_run(recipe, seed: int, policy, progress: bool = True, steps: int | None = None) -> dict:
    """Train `recipe` (fresh from its factory) under `policy` ("manual" freezes nothing); its end result."""
    steps = recipe.steps if steps is None else steps
    fm, opt, lr, stream = start_run(recipe, seed, policy, steps)
    seconds, timed, flops, events = 0.0, 0, 0.0, []
    frozen = frozenset()
    for step in tqdm(range(steps), disable=not progress, leave=False):
        xb = next(stream)
        if step % SAMPLE == 5:
            with FlopCounterMode(display=False) as counter:
                train_step(fm, opt, lr, xb)
            flops += SAMPLE * counter.get_total_flops()
        else:
            start = time.perf_counter()
            train_step(fm, opt, lr, xb)
            seconds += time.perf_counter() - start
            timed += 1
        now = frozenset(fm.frozen)
        if now != frozen:
            events.append((step, sorted(now - frozen), sorted(frozen - now)))  # (step, frozen, thawed)
            frozen = now
    return {"accuracy": accuracy(fm, recipe.test), "train_flops": flops,
            "train_seconds": seconds * steps / max(timed, 1), "frozen_at_end": list(fm.frozen),
            "events": events, "units": list(fm.units)}


def compare(family: str, seed: int, make, predictors: dict, progress: bool = True, steps: int | None = None) -> list:
    """The family's recipe with nothing frozen, then under SmartFRZ with each of `predictors` (name -> model),
    side by side: one result per predictor."""
    full = whole_run(make(seed), seed, "manual", progress, steps)
    results = []
    for name, predictor in predictors.items():
        # (deciding whatever its decisions cost: the predictor's and the rules' outcome, the same on any machine)
        smart = whole_run(make(seed), seed, SmartFRZ(predictor=predictor, max_cost=None), progress, steps)
        results.append({"family": family, "seed": seed, "predictor": name, "full": full, "smartfrz": smart,
                        "accuracy_points": 100 * (smart["accuracy"] - full["accuracy"]),
                        "flops_reduction": full["train_flops"] / smart["train_flops"],
                        "time_ratio": full["train_seconds"] / smart["train_seconds"]})
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=None, help="windows written by frzcompile.predictor.collect (needed for "
                        "the held-out predictors; with --predictors shipped alone, every family runs by default)")
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--data", default=None,
                        help="data folder holding fashion-mnist/, sst2/ and sentence-classification/ (TREC)")
    parser.add_argument("--families", default=None, help="comma-separated (default: every recorded family)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds of the whole runs")
    parser.add_argument("--predictors", default="held-out",
                        help="comma-separated: held-out (trained on the other families' windows) and/or shipped")
    parser.add_argument("--epochs", type=int, default=40, help="predictor training epochs (as train's)")
    args = parser.parse_args()
    kinds = args.predictors.split(",")
    if not set(kinds) <= {"held-out", "shipped"}:
        raise SystemExit(f"--predictors takes held-out and/or shipped, not {args.predictors!r}")
    if args.runs is None and "held-out" in kinds:
        raise SystemExit("--predictors held-out trains on recorded windows: pass --runs (frzcompile.predictor.collect "
                         "writes them), or score the shipped predictor alone with --predictors shipped")
    runs = [] if args.runs is None else torch.load(args.runs, weights_only=False)["runs"]
    makers = families(args.data)
    names = args.families.split(",") if args.families else sorted({r["family"] for r in runs} if runs else makers)
    results = []
    for family in names:
        if family not in makers:
            raise SystemExit(f"unknown family {family!r}; choose from {', '.join(makers)}")
        predictors = {}
        if "held-out" in kinds:
            predictors["held-out"] = fit(*_stack([r for r in runs if r["family"] != family]), epochs=args.epochs)
        if "shipped" in kinds:
            predictors["shipped"] = load_default()
        for seed in (int(s) for s in args.seeds.split(",")):
            for r in compare(family, seed, makers[family], predictors):
                results.append(r)
                print(f"{family} seed {seed}, {r['predictor']} predictor: full {100 * r['full']['accuracy']:.2f}%, "
                      f"smartfrz {100 * r['smartfrz']['accuracy']:.2f}% ({r['accuracy_points']:+.2f} pt), FLOPs "
                      f"{r['flops_reduction']:.2f}x, time {r['time_ratio']:.2f}x, frozen "
                      f"{r['smartfrz']['frozen_at_end'] or 'nothing'} "
                      f"(decisions at steps {[e[0] for e in r['smartfrz']['events']]})", flush=True)
            with open(args.out, "w") as f:  # after every family, so that a long validation survives interruption
                json.dump({"threads": torch.get_num_threads(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
