"""Data-parallel training with a frozen first half: time per step and bytes all-reduced per step, side by side in
one run, for what a user can do with torch's DDP and for frzcompile's DistributedDataParallel.

Variants (2 processes, gloo on CPU by default; the same MLP, the first half of its blocks frozen mid-run):
  - ddp, nothing frozen: the baseline;
  - ddp + find_unused_parameters, half frozen: what torch DDP needs to survive a freeze after wrapping;
  - ddp re-wrapped by hand, half frozen: freeze, then build a new DDP (the by-hand ideal);
  - frzcompile ddp, half frozen: fm.freeze mid-run under frzcompile.integrations.ddp.DistributedDataParallel.
Bytes are counted by a comm hook around DDP's default all-reduce (the same hook in every variant).

    python benchmarks/bench_ddp.py [--width 1024 --blocks 8 --steps 20 --rounds 3]
"""
import argparse
import datetime
import os
import platform
import random
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

VARIANTS = ["ddp, nothing frozen", "ddp + find_unused_parameters, half frozen", "ddp re-wrapped by hand, half frozen",
            "frzcompile ddp, half frozen"]


def make_model(width, blocks):
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(blocks)]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def run_variant(variant, args, rank, world):
    import frzcompile
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    from frzcompile.integrations.ddp import DistributedDataParallel

    model = make_model(args.width, args.blocks)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    half = [str(i) for i in range(args.blocks // 2)]
    sent = []

    def hook(state, bucket):
        sent[-1] += bucket.buffer().numel() * bucket.buffer().element_size()
        return default_hooks.allreduce_hook(None, bucket)

    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, args.width, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    fm = None
    if variant.startswith("frzcompile"):
        fm = frzcompile.optimize(model, (x[:2],), optimizer=opt, policy="manual")
        net = DistributedDataParallel(fm)
    else:
        net = DDP(model, find_unused_parameters="find_unused" in variant)
    net.register_comm_hook(None, hook)

    def step():
        sent.append(0)
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()

    step()  # one step with nothing frozen, then the freeze
    if "half frozen" in variant:
        if fm is not None:
            fm.freeze(*half)
        else:
            for i in half:
                for p in model[int(i)].parameters():
                    p.requires_grad_(False)
                    opt.state.pop(p, None)
            if "re-wrapped" in variant:
                net = DDP(model, init_sync=False)
                net.register_comm_hook(None, hook)
    for _ in range(args.warmup):
        step()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    dist.barrier()
    return (time.perf_counter() - start) / args.steps, statistics.median(sent[-args.steps:])


def worker(rank, world, folder, args):
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    results = {v: [] for v in VARIANTS}
    order = list(VARIANTS)
    rng = random.Random(0)  # the same order on every rank
    for _ in range(args.rounds):
        rng.shuffle(order)
        for variant in order:
            results[variant].append(run_variant(variant, args, rank, world))
    if rank == 0:
        torch.save(results, f"{folder}/results.pt")
    dist.barrier()
    os._exit(0)  # gloo's threads can abort the interpreter's teardown; the results are written


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32, help="per process")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()
    folder = tempfile.mkdtemp()
    mp.get_context("spawn")
    mp.spawn(worker, args=(2, folder, args), nprocs=2, join=True)
    results = torch.load(os.path.join(folder, "results.pt"))
    print(f"machine: {platform.machine()} CPU ({os.cpu_count()} cores), 2 processes x {args.threads} thread, gloo, "
          f"torch {torch.__version__}; MLP {args.blocks} x Linear({args.width}, {args.width}), batch {args.batch} "
          f"per process, {args.steps} steps x {args.rounds} rounds\n")
    base = statistics.median(t for t, _ in results[VARIANTS[0]])
    print("| variant | ms / step (median of rounds) | vs nothing frozen | MB all-reduced / step |")
    print("|---|---|---|---|")
    for v in VARIANTS:
        t = statistics.median(t for t, _ in results[v])
        mb = statistics.median(b for _, b in results[v]) / 1e6
        print(f"| {v} | {t * 1e3:.1f} | {base / t:.2f}x | {mb:.1f} |")


if __name__ == "__main__":
    main()
