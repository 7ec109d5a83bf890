"""Train the SmartFRZ predictor on recorded windows, validate on held-out families, ship the weights.

    python -m frzcompile.predictor.train --runs runs.pt [--out frzcompile/predictor/smartfrz.pt]

Validation is leave-one-family-out: for each model family, a predictor trained on the other families is scored
on that family's windows (AUC, accuracy, and precision/recall of the "converged" class: a false "converged"
freezes a unit too early, which is what costs accuracy). The shipped predictor is then trained on all families.
It writes the weights, and MODEL_CARD.md beside them with every figure (with `--outcome`, also the whole-run
validation of frzcompile.predictor.outcome).
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
from torch import nn

from . import WEIGHTS, WINDOW, FreezePredictor, features
from .collect import DESCRIPTIONS

VERSION = "1"
CONFIG = {"dim": 16, "heads": 2, "window": WINDOW}


def _stack(runs):
    """(tokens, statistics, labels) of the windows of `runs` whose weights moved at all: a unit outside the
    loss (an unused pooler) never moves while its input does, and would teach that stillness is not convergence."""
    z = torch.cat([r["z"].float() for r in runs])
    base = torch.cat([r["scalars"] for r in runs])
    y = torch.cat([r["label"] for r in runs])
    moved = base[:, 0] > -11.0  # log10 of the window's relative movement; -12 means none
    tokens, scalars = features(z[moved], base[moved])
    return tokens, scalars, y[moved]


def fit(z, s, y, epochs: int = 40, seed: int = 0) -> FreezePredictor:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: more threads only add synchronization
    try:
        return _fit(z, s, y, epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _fit(z, s, y, epochs, seed) -> FreezePredictor:
    torch.manual_seed(seed)
    model = FreezePredictor(**CONFIG)
    model.token_mean.copy_(z.mean((0, 1)))
    model.token_std.copy_(z.std((0, 1)).clamp(min=1e-6))
    model.scalar_mean.copy_(s.mean(0))
    model.scalar_std.copy_(s.std(0).clamp(min=1e-6))
    positives = y.sum().clamp(min=1.0)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=(len(y) - positives) / positives)  # balance the classes
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            loss = loss_fn(model(z[idx], s[idx]), y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()
    return model


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half)."""
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return float(greater + 0.5 * ties)


@torch.no_grad()
def evaluate(model, z, s, y) -> dict:
    p = torch.sigmoid(model(z, s))
    pred = p > 0.5
    truth = y > 0.5
    tp = (pred & truth).sum().item()
    return {
        "windows": len(y), "converged": int(truth.sum()),
        "auc": auc(p, y), "accuracy": float((pred == truth).float().mean()),
        "precision": tp / max(1, int(pred.sum())), "recall": tp / max(1, int(truth.sum())),
    }


def _card(path: Path, meta: dict, held_out: dict, train_all: dict, runs) -> None:
    rows = "\n".join(
        f"| {fam} | {m['windows']} | {m['converged']} | {m['auc']:.3f} | {100 * m['accuracy']:.1f}% | "
        f"{100 * m['precision']:.1f}% | {100 * m['recall']:.1f}% |" for fam, m in held_out.items())
    sources = "\n".join(
        f"| {r['family']} | {r['seed']} | {r.get('optimizer', 'see collect.py')}, {r.get('schedule', 'constant')} | "
        f"{r['steps']} | {', '.join(r['units'])} | {len(r['label'])} | {int(r['label'].sum())} | "
        f"{r['final_loss']:.3f} |" for r in runs)
    families = sorted({r["family"] for r in runs})
    described = "\n".join(f"| {fam} | {DESCRIPTIONS.get(fam, 'see collect.py')} |" for fam in families)
    threads = (f"Recorded with {meta['threads']} CPU thread(s). The labels depend on floating-point order: the same "
               "recipe recorded with another thread count can label a run quite differently (mlp-digits seed 0: "
               "85 converged windows with one thread, 48 with two), so reproduce with the same count."
               if meta.get("threads") else "")
    outcome = _outcome_section(meta.get("outcome"))
    path.write_text(f"""# SmartFRZ predictor: model card

Version {VERSION}, trained {meta['date']} by `python -m frzcompile.predictor.train` on windows recorded by
`python -m frzcompile.predictor.collect {meta['command']}` (both in this folder; rerun them to reproduce, with the
same thread count: see below).
File: `smartfrz.pt`
({meta['bytes']} bytes, {meta['params']} parameters), loaded by `frzcompile.predictor.load_default()`.

## What it predicts
For one unit, from its last {WINDOW} weight snapshots (a fixed random sample of up to 256 weights, taken every
{meta['interval']} optimizer steps), the probability that the unit has converged and can be frozen now. Each
snapshot becomes a token (its distance from the newest snapshot, the size of the step into it, the cosine with
the previous step, all relative to the weights' RMS); the newest token attends over the window, and six window
statistics (movement, net drift, straightness, last step, deceleration, mean step cosine) join the attention
output in a small MLP head. {meta['params']} parameters; one prediction costs well under a millisecond on a CPU.

## Source runs (real data, nothing frozen)
| family | seed | optimizer, schedule | steps | units recorded | windows | converged | final train loss |
|---|---|---|---|---|---|---|---|
{sources}

Units under 256 weights (a BatchNorm, a tiny stem convolution) yield no windows. Windows in which the sampled
weights did not move at all are dropped before training ({meta['dropped']} here: the MiniLM pooler, which the
classifier does not use, keeps its weights while its input changes, and would teach that stillness is not
convergence).

| family | model and data |
|---|---|
{described}

Units smaller than 256 weights and the last unit of each model are left out. {threads}

## Labelling rule
A unit counts as converged at snapshot t when the linear CKA between its output on a fixed probe batch of 256
held-out samples (eval mode) at t and at the end of the run is >= {meta['tau']}, and stays >= {meta['tau']} at every
later snapshot (SmartFRZ labels by representational similarity). Each window ending at t takes that label.

## Validation on held-out families (leave one family out)
Each row: a predictor trained on every other family, scored on this family's windows at threshold 0.5.
Precision of "converged" is the figure that matters most: a false "converged" freezes a unit too early.

| held-out family | windows | converged | AUC | accuracy | precision (converged) | recall (converged) |
|---|---|---|---|---|---|---|
{rows}

Shipped predictor (trained on all families), scored on its own training windows: AUC {train_all['auc']:.3f},
accuracy {100 * train_all['accuracy']:.1f}%.
{outcome}
## Limits
Trained on {len(runs)} short runs of {len(families)} small families on CPU; runs of other lengths, optimizers or
learning-rate schedules change what a converged window looks like. The policy adds hysteresis (several consecutive
votes) and freezes only the network's front by default. Retrain with more runs when a family matters to you.

It sees weight snapshots only, so it cannot tell a plateau before learning from convergence: on a CNN without
normalization trained from scratch it judged every convolution converged during such a plateau. Every decision
of the SmartFRZ policy also passes the safety rules of `frzcompile/safety.py`, which read the training loss (no
freeze before learning has started or while the loss still falls, one unit at a time, a rollback when the loss
rises after a freeze).
""")


def _decisions(events) -> str:
    """A run's freezes as unit@step, and the units thawed again."""
    frozen = ", ".join(f"{u}@{step}" for step, new, _ in events for u in new) or "nothing"
    thawed = [u for _, _, gone in events for u in gone]
    return frozen + (f" (thawed: {', '.join(thawed)})" if thawed else "")


def _outcome_section(paths) -> str:
    """The card's whole-run table from frzcompile.predictor.outcome's JSON files (comma-separated; none: empty)."""
    if not paths:
        return ""
    results = [r for path in paths.split(",") for r in json.loads(Path(path).read_text())["results"]
               if r.get("predictor", "held-out") == "held-out"]
    rows = "\n".join(
        f"| {r['family']} | {r['seed']} | {100 * r['full']['accuracy']:.2f}% | {100 * r['smartfrz']['accuracy']:.2f}% | "
        f"{r['accuracy_points']:+.2f} | {r['flops_reduction']:.2f}x | {r['time_ratio']:.2f}x | "
        f"{_decisions(r['smartfrz']['events'])} |" for r in results)
    return f"""
## Validation by outcome (whole runs, leave one family out)
Each row: the family's recipe trained twice from the same weights and data order, with nothing frozen and under
the SmartFRZ policy (default threshold, votes and safety rules) with a predictor trained on every *other*
family's windows; test accuracy at the end of the run (`python -m frzcompile.predictor.outcome`). FLOPs are
training FLOPs (torch.utils.flop_counter); time is this CPU's and noisy, with no activation cache.

| held-out family | seed | full | SmartFRZ | points | FLOPs reduction | time | frozen (unit@step) |
|---|---|---|---|---|---|---|---|
{rows}
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="windows written by frzcompile.predictor.collect")
    parser.add_argument("--out", default=str(WEIGHTS))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--outcome", default=None,
                        help="JSON file(s) from frzcompile.predictor.outcome, comma-separated, for the card's "
                             "whole-run table")
    args = parser.parse_args()
    recorded = torch.load(args.runs, weights_only=False)
    runs = recorded["runs"]
    families = sorted({r["family"] for r in runs})
    held_out = {}
    for fam in families:
        train = [r for r in runs if r["family"] != fam]
        test = [r for r in runs if r["family"] == fam]
        model = fit(*_stack(train), epochs=args.epochs)
        held_out[fam] = evaluate(model, *_stack(test))
        m = held_out[fam]
        print(f"held out {fam}: AUC {m['auc']:.3f}, accuracy {100 * m['accuracy']:.1f}%, "
              f"precision {100 * m['precision']:.1f}%, recall {100 * m['recall']:.1f}% ({m['windows']} windows)")
    z, s, y = _stack(runs)
    model = fit(z, s, y, epochs=args.epochs)
    train_all = evaluate(model, z, s, y)
    out = Path(args.out)
    torch.save({"config": CONFIG, "model": model.state_dict(), "version": VERSION, "held_out": held_out,
                "tau": recorded["tau"], "interval": recorded["interval"]}, out)
    recorded_windows = sum(len(r["label"]) for r in runs)
    meta = {"date": datetime.date.today().isoformat(), "bytes": out.stat().st_size,
            "dropped": recorded_windows - len(y),
            "params": sum(p.numel() for p in model.parameters()), "tau": recorded["tau"],
            "interval": recorded["interval"], "command": recorded.get("command", ""),
            "threads": recorded.get("threads"), "outcome": args.outcome}
    _card(out.with_name("MODEL_CARD.md"), meta, held_out, train_all, runs)
    print(f"wrote {out} ({meta['bytes']} bytes) and {out.with_name('MODEL_CARD.md')}")


if __name__ == "__main__":
    main()
