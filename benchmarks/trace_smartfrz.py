"""What SmartFRZ's predictor and safety rules would say over one whole run with nothing frozen.

    python benchmarks/trace_smartfrz.py --family minilm-trec [--seed 0] [--data PATH] [--out DIR]

Trains one recipe of frzcompile.predictor.collect (the predictor's source runs) with nothing frozen and, every
5 steps, records the shipped predictor's probability for every unit it would judge, from windows of WINDOW
snapshots taken every 10 steps (the policy's default interval) and every 5 steps (a window half as long), and
the safety rules' verdict on the loss so far (`Safeguard.learning_slowed_steadily`: "ok", or the first words of why a
freeze would be held back). A diagnostic, not a timing: it shows which of the two holds a freeze back when.
Writes `trace_<family>_seed<S>.json` (rows of step, learning rate, mean loss of the last 10 steps, verdict,
probabilities) and prints every 20th step.
"""
import argparse
import json
import os
import zlib

import torch
from tqdm.auto import tqdm

from frzcompile.policies import TrainingView
from frzcompile.predictor import WINDOW, load_default, sample_indices
from frzcompile.predictor.collect import families, start_run, train_step
from frzcompile.safety import Safeguard

INTERVALS = (10, 5)


def trace(family: str, seed: int, root=None) -> dict:
    recipe = families(root)[family](seed)
    fm, opt, schedule, stream = start_run(recipe, seed, "manual", recipe.steps)
    view = TrainingView(fm)
    predictor = load_default()
    units = [u for u in view.freezable if view.numel(u) >= 256]  # SmartFRZ's min_weights
    indices = {u: sample_indices(view.numel(u), seed=zlib.crc32(u.encode())) for u in units}
    windows = {interval: {u: [] for u in units} for interval in INTERVALS}
    rules, losses, rows = Safeguard(), [], []
    for step in tqdm(range(1, recipe.steps + 1), desc=f"{family} seed {seed}"):
        losses.append(float(train_step(fm, opt, schedule, next(stream))))
        if step % min(INTERVALS):
            continue
        sample = view.weight_samples(indices)
        ok, why = rules.learning_slowed_steadily(losses)  # the "manual" policy reads no loss: the rules get ours
        row = {"step": step, "lr": opt.param_groups[0]["lr"], "loss": sum(losses[-10:]) / len(losses[-10:]),
               "rules": "ok" if ok else why.split(":")[0]}
        for interval in INTERVALS:
            if step % interval:
                continue
            probabilities = {}
            for u in units:
                history = windows[interval][u]
                history.append(sample[u])
                del history[:-WINDOW]
                if len(history) == WINDOW:
                    probabilities[u] = predictor.probability(torch.stack(history))
            row[f"every {interval}"] = probabilities
        rows.append(row)
    return {"family": family, "seed": seed, "units": units, "window": WINDOW, "rows": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, help=f"one of: {', '.join(families(None))}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None, help="data folder (default: ../shared/data or $FRZ_DATA)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    result = trace(args.family, args.seed, args.data)
    with open(os.path.join(args.out, f"trace_{args.family}_seed{args.seed}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"step, mean loss, rules, predictor p per unit ({', '.join(result['units'])}): windows of snapshots "
          f"every {' | every '.join(str(i) for i in INTERVALS)} steps")
    for row in result["rows"]:
        if row["step"] % 20 == 0:
            cols = " | ".join(" ".join(f"{p:.2f}" for p in row.get(f"every {i}", {}).values()) or "-"
                              for i in INTERVALS)
            print(f"{row['step']:5d} {row['loss']:.3f} {row['rules'][:32]:32s} {cols}")


if __name__ == "__main__":
    main()
