"""Sparse training with freezing and data sieving (SpFDE) and early-bird tickets, side by side, on real data.

Runs, all with the same seed, data order and cosine learning-rate schedule:
  dense               full training
  sparse 50/80/90     MEST sparse training at that sparsity (magnitude drop, random grow, every half epoch)
  sparse 80 +freeze   the same, with SmartFRZ freezing and the activation cache
  sparse 80 +freeze +sieve   and data sieving (keep ratio 0.8, 10 percent swapped per epoch)
  early-bird 80       dense until the early-bird ticket at 80 percent is found, then sparse on it
  sparse 80 gradual   (only with --runs) magnitude pruning ramped up cubically over the first half, no regrowth
Workloads: a ResNet-style CNN trained from scratch on Fashion-MNIST, and the pretrained all-MiniLM-L6-v2
fine-tuned on SST-2 (tested on the 872 labelled GLUE dev sentences).

Reported: test accuracy, training wall-clock (evaluation excluded), and training FLOPs counted by
torch.utils.flop_counter on every 20th step (times 20), twice: as executed (this CPU runs masked weights as
dense matmuls) and as a sparse kernel would run them: every matmul or convolution op (forward or backward)
that reads a masked weight is scaled by that weight's density. A Linear layer's weight-gradient matmul does
not read the weight and stays dense, so the sparse figure is conservative.

    python benchmarks/bench_sparse.py [--data PATH] [--only fashion|minilm] [--runs "dense,sparse 80"] [--out DIR]
"""
import json
import os
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import frzcompile
from bench_policies import accuracy, fashion, minilm
from common import fresh_run, print_table, workload_args
from frzcompile.sparsity import SieveSampler
from frzcompile.sparsity.training import EarlyBirdConfig, SparsityConfig

FLOP_SAMPLE = 20
RUNS = ("dense", "sparse 50", "sparse 80", "sparse 90", "sparse 80 +freeze", "sparse 80 +freeze +sieve",
        "early-bird 80")
OPTIONAL_RUNS = ("sparse 80 gradual",)


class SparseFlopCounter(FlopCounterMode):
    """FlopCounterMode that also sums FLOPs scaled by the density of a masked-weight operand.

    Overrides FlopCounterMode._count_flops (torch 2.13), which sees every op with its real arguments. The
    sparsify pass feeds ops `weight * mask`, a new tensor, so the density follows the product of a mul; the
    counter holds on to those products until it exits, so their memory cannot be reused by another tensor
    (which would then be mistaken for a masked weight) while it counts."""

    def __init__(self, densities):
        super().__init__(display=False)
        self.densities = densities  # storage pointer of a masked weight -> its density
        self.sparse_flops = 0
        self._products = []

    def _count_flops(self, func_packet, out, args, kwargs):
        if func_packet is torch.ops.aten.mul and isinstance(out, torch.Tensor) and isinstance(args[0], torch.Tensor):
            density = self.densities.get(args[0].untyped_storage().data_ptr())
            if density is not None:
                self.densities[out.untyped_storage().data_ptr()] = density
                self._products.append(out)
        if func_packet in self.flop_registry:
            flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            density = 1.0
            for a in args:
                if isinstance(a, torch.Tensor):
                    density = min(density, self.densities.get(a.untyped_storage().data_ptr(), 1.0))
            self.sparse_flops += flops * density
        return super()._count_flops(func_packet, out, args, kwargs)


def sparsity_config(name, steps_per_epoch, sieve):
    if name == "dense":
        return None
    if name.startswith("early-bird"):
        return SparsityConfig(0.8, early_bird=EarlyBirdConfig(interval=max(1, steps_per_epoch // 10)))
    level = int(name.split()[1]) / 100
    if "gradual" in name:
        return SparsityConfig(level, schedule="gradual", ramp=(0.0, 0.5), update_interval=max(1, steps_per_epoch // 4))
    return SparsityConfig(level, source="mest", update_interval=max(1, steps_per_epoch // 2), sieve=sieve)


def run(name, base, train, test, epochs, batch, make_opt, seed=0):
    model, inputs, labels, steps_per_epoch, total, opt, schedule = fresh_run(base, train, epochs, batch, make_opt)
    n = len(labels)
    freezing = "+freeze" in name
    sieve = SieveSampler(n, keep_ratio=0.8, refresh=0.1, seed=seed) if "+sieve" in name else None
    fm = frzcompile.optimize(model, tuple(t[:batch] for t in inputs), optimizer=opt,
                             policy="smartfrz" if freezing else "manual", cache=freezing, total_steps=total,
                             sparsity=sparsity_config(name, steps_per_epoch, sieve))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    train_seconds, flops, sparse_flops, curve, step = 0.0, 0, 0.0, [], 0
    for epoch in range(epochs):
        if sieve is not None:
            sieve.set_epoch(epoch)
            order = torch.tensor(list(sieve))
        else:
            order = torch.randperm(n, generator=g)
        start = time.perf_counter()
        for b in range(len(order) // batch):
            idx = order[b * batch:(b + 1) * batch]
            xs, y = [t[idx] for t in inputs], labels[idx]
            counter = None
            if step % FLOP_SAMPLE == 0:
                densities = {}
                if fm.sparsity is not None:
                    densities = {t.weight.untyped_storage().data_ptr(): float(t.mask.float().mean())
                                 for t in fm.sparsity.targets.values()}
                counter = SparseFlopCounter(densities)
                counter.__enter__()
            logits = fm(*xs)
            loss = nn.functional.cross_entropy(logits, y)
            loss.backward()
            if counter is not None:
                counter.__exit__(None, None, None)
                flops += FLOP_SAMPLE * counter.get_total_flops()
                sparse_flops += FLOP_SAMPLE * counter.sparse_flops
            opt.step()
            opt.zero_grad()
            schedule.step()
            if sieve is not None:
                sieve.record(idx, logits.argmax(1) == y)
            step += 1
        train_seconds += time.perf_counter() - start
        curve.append((step, train_seconds, accuracy(fm, test)))
        print(f"    {name} epoch {epoch + 1}: acc {100 * curve[-1][2]:.2f}% after {train_seconds:.0f}s", flush=True)
    report = fm.sparsity.report() if fm.sparsity is not None else None
    eb = report["early_bird"] if report else None
    return {"run": name, "steps": step, "steps_per_epoch": steps_per_epoch, "train_seconds": train_seconds,
            "accuracy": curve[-1][2], "curve": curve, "train_flops": flops, "sparse_flops": sparse_flops,
            "sparsity": report["sparsity"] if report else 0.0,
            "early_bird_step": eb["found_at"] if eb and eb["found"] else None,
            "frozen_at_end": len(fm.frozen), "units": len(fm.units),
            "sieve": sieve.summary() if sieve is not None else None}


def main():
    def runs_option(parser):
        parser.add_argument("--runs", default=",".join(RUNS),
                            help=f"comma-separated runs, the first is the reference; from {RUNS + OPTIONAL_RUNS}")

    args = workload_args(__doc__, runs_option)
    runs = [r.strip() for r in args.runs.split(",")]
    unknown = set(runs) - set(RUNS + OPTIONAL_RUNS)
    if unknown:
        raise SystemExit(f"unknown runs {sorted(unknown)}; choose from {RUNS + OPTIONAL_RUNS}")
    everything = {"machine": args.machine, "workloads": []}
    for key, load in (("fashion", fashion), ("minilm", minilm)):
        if args.only and key != args.only:
            continue
        label, base, train, test, epochs, batch, make_opt = load(args.data, args.seed)
        results = []
        for name in runs:
            r = run(name, base, train, test, epochs, batch, make_opt, seed=args.seed)
            results.append(r)
            print(f"  {key} {name}: acc {100 * r['accuracy']:.2f}% in {r['train_seconds']:.1f}s", flush=True)
        dense = results[0]  # the reference run
        print(f"\n### {label}\n")
        rows = []
        for r in results:
            eb = "-"
            if r["early_bird_step"] is not None:
                found = r["early_bird_step"]
                eb = f"step {found} (epoch {found / r['steps_per_epoch']:.2f} of {epochs})"
            elif r["run"].startswith("early-bird"):
                eb = "not found"
            rows.append((r["run"], f"{100 * r['sparsity']:.1f}%", f"{100 * r['accuracy']:.2f}%",
                         f"{100 * (r['accuracy'] - dense['accuracy']):+.2f}", f"{r['train_seconds']:.1f}",
                         f"{dense['train_seconds'] / r['train_seconds']:.2f}x",
                         f"{r['train_flops'] / 1e12:.2f} T", f"{r['sparse_flops'] / 1e12:.2f} T",
                         f"{dense['train_flops'] / r['sparse_flops']:.2f}x",
                         f"{r['frozen_at_end']}/{r['units']}", eb))
        print_table(("run", "weight sparsity", "test accuracy", "vs dense (pt)", "train time s", "speedup",
                     "executed FLOPs", "sparse FLOPs", "FLOPs reduction (sparse)", "units frozen at end",
                     "early-bird ticket"), rows)
        print()
        everything["workloads"].append({"workload": label, "results": results})
    name = "sparse" + ("" if args.seed == 0 else f"_seed{args.seed}") + ("" if runs == list(RUNS) else "_subset")
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump(everything, f, indent=1, default=str)


if __name__ == "__main__":
    main()
