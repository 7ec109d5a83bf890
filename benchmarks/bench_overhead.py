"""frzcompile's own cost per training step with nothing frozen: eager against `fm` (policy="manual") and `fm`
under the default policy (SmartFRZ, its rules holding every freeze back, as they do early in a run).

With nothing frozen, `fm` does the model's work plus its own Python per call and per optimizer step (the plan's
checks, a walk of the module tree for swapped submodules, the step hooks, the policy's loss reading and decisions).
On a GPU that Python runs on the host while the device works, so for models small enough to be bound by kernel
launches it adds to the step as it does here; this CPU benchmark measures it on small models, where it shows most:
a tiny MLP, a two-layer BERT and a twelve-layer narrow BERT (BERT-base's 231 modules and 201 parameters at width
64). Steps are timed in blocks, interleaved in a shuffled order round after round in one process: medians of
the blocks, and the time added as the median over rounds of each block minus eager's block of the same round.

    python benchmarks/bench_overhead.py [--rounds 30] [--block 20] [--out FILE.json]
"""
import argparse
import copy
import json
import platform
import statistics
import time

import torch
from torch import nn

import frzcompile
from common import interleaved, print_table

WARMUP = 5  # rounds left out of the medians


def workloads():
    import transformers

    def bert(layers):
        config = transformers.BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=layers,
                                         num_attention_heads=2, intermediate_size=128, max_position_embeddings=64)
        return transformers.BertForSequenceClassification(config)

    return {
        "MLP 64-128-128-10, batch 32": (
            lambda: nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)),
            lambda: torch.randn(32, 64)),
        "BERT 2 x 64, 8 x 32 tokens": (lambda: bert(2), lambda: torch.randint(0, 500, (8, 32))),
        "BERT 12 x 64, 8 x 32 tokens": (lambda: bert(12), lambda: torch.randint(0, 500, (8, 32))),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block", type=int, default=20, help="steps per timed block")
    parser.add_argument("--out", default=None, help="write the medians as JSON here")
    args = parser.parse_args()
    print(f"machine: {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    rows, record = [], {}
    for name, (make, batch) in workloads().items():
        torch.manual_seed(0)
        model, x = make(), batch()
        runs = {"eager": copy.deepcopy(model),
                "fm manual": frzcompile.optimize(copy.deepcopy(model), (x,), policy="manual"),
                "fm default": frzcompile.optimize(copy.deepcopy(model), (x,))}
        optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in runs.items()}

        def step(k):
            out = runs[k](x)
            out = out.logits if hasattr(out, "logits") else out
            out.float().square().mean().backward()
            optimizers[k].step()
            optimizers[k].zero_grad()

        for k in runs:  # past the capture's first calls, and SmartFRZ's first window
            for _ in range(3):
                step(k)

        def measure(k):
            start = time.perf_counter()
            for _ in range(args.block):
                step(k)
            return (time.perf_counter() - start) / args.block

        times = interleaved(runs, args.rounds, measure)
        med = {k: statistics.median(v[WARMUP:]) for k, v in times.items()}
        assert not runs["fm default"].frozen  # (the rules hold every freeze back this early)
        row = [name, f"{1000 * med['eager']:.3f}"]
        record[name] = {k: 1000 * v for k, v in med.items()}
        for k in ("fm manual", "fm default"):
            # the time added, per round against eager's block of the same round (the machine's speed drifts
            # between rounds more than frzcompile adds on the larger models)
            added = statistics.median(a - e for a, e in zip(times[k][WARMUP:], times["eager"][WARMUP:]))
            row.append(f"{1000 * med[k]:.3f} ({med['eager'] / (med['eager'] + added):.3f}x, {1e6 * added:+.0f} us)")
            record[name][k + " added us"] = 1e6 * added
        rows.append(row)
    print_table(("workload", "eager ms/step", "fm manual ms/step (speed vs eager, added per step)",
                 "fm default policy ms/step (speed vs eager, added per step)"), rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
