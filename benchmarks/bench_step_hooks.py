"""frzcompile's per-optimizer-step bookkeeping under optimizer-in-backward, against eager frozen by hand.

torchtune's `optimizer_in_bwd` pattern: one optimizer per parameter, stepped from the parameter's
`register_post_accumulate_grad_hook`, so an iteration makes as many optimizer steps as there are trainable
parameter tensors. frzcompile hears every optimizer step (torch's global step hooks); what it does there must
not grow with the number of parameters or optimizers, or a deep model pays it quadratically.

For deep, narrow MLPs (depth L: 2L + 2 parameter tensors) with the first half of the blocks frozen, it times
training iterations (forward, loss, backward with the steps inside it) of:
  - by hand:    the plain model, the same blocks requires_grad=False and in eval();
  - frzcompile: frzcompile.optimize(model, policy="manual") with the same blocks frozen.
Both are timed interleaved, round after round, in one process; medians over rounds are reported.

    python benchmarks/bench_step_hooks.py [--depths 16 64 160] [--rounds 7] [--iters 10] [--out FILE.json]
"""
import argparse
import copy
import json
import platform
import time

import torch
from torch import nn

import frzcompile
from common import interleaved, median_iqr, print_table


def deep_mlp(depth, width=16):
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)],
                         nn.Linear(width, 4))


def optimizer_in_backward(model):
    optimizers = {}
    for p in model.parameters():
        if p.requires_grad:
            optimizers[p] = torch.optim.SGD([p], lr=1e-3)

            def step(param):
                optimizers[param].step()
                optimizers[param].zero_grad()
            p.register_post_accumulate_grad_hook(step)
    return optimizers


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[16, 64, 160])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)"
    rows, records = [], []
    for depth in args.depths:
        model = deep_mlp(depth)
        by_hand = copy.deepcopy(model)
        frozen = [str(i) for i in range(depth // 2)]
        fm = frzcompile.optimize(model, (x,), policy="manual")
        fm.freeze(*frozen)
        for name in frozen:
            by_hand[int(name)].requires_grad_(False)
            by_hand[int(name)].eval()
        keep = (optimizer_in_backward(model), optimizer_in_backward(by_hand))
        nets = {"by hand": by_hand, "frzcompile": fm}

        def measure(job):
            net = nets[job]
            start = time.perf_counter()
            for _ in range(args.iters):
                nn.functional.cross_entropy(net(x), y).backward()
            return (time.perf_counter() - start) / args.iters * 1e3

        for job in nets:  # warm-up
            measure(job)
        times = interleaved(nets, args.rounds, measure)
        med = {job: median_iqr(values)[0] for job, values in times.items()}
        params = sum(1 for _ in model.parameters())
        trainable = sum(p.requires_grad for p in model.parameters())
        rows.append((depth, f"{params} ({trainable})", f"{med['by hand']:.2f}", f"{med['frzcompile']:.2f}",
                     f"{med['frzcompile'] / med['by hand']:.2f}x"))
        records.append({"depth": depth, "parameters": params, "trainable": trainable, "ms": times,
                        "median_ms": med, "steps_per_iteration": len(keep[0])})
        del fm, keep
    print(f"machine: {machine}; batch 8, width 16, first half of the blocks frozen, medians of {args.rounds} "
          f"rounds of {args.iters} iterations")
    print_table(("depth", "parameter tensors (trainable)", "by hand ms/iter", "frzcompile ms/iter",
                 "frzcompile / by hand"), rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "results": records}, f, indent=1)


if __name__ == "__main__":
    main()
