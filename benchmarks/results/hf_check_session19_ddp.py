# frzcompile's DDP wrapper, 2 processes (gloo), tiny HF BERT from a config trained in eval mode (the user's
# model.eval() on their own variable, grad on), a forward hook, bf16 autocast on some steps, two batch shapes,
# layers frozen by hand mid-run on both ranks, a policy-free run: against 1-process eager frozen by hand.
# (2026-12-04, nineteenth round; run with the repo's .venv, 1-2 threads)
import os, sys, warnings
import torch
warnings.filterwarnings("ignore")


def tiny_bert(dropout=0.1, layers=3, seed=0, labels=3):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, num_labels=labels, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout, max_position_embeddings=64)
    return BertForSequenceClassification(cfg)


def freeze_by_hand(model, names):
    mods = dict(model.named_modules())
    for n in names:
        mods[n].requires_grad_(False)
        mods[n].eval()


def reeval(model, names):
    mods = dict(model.named_modules())
    for n in names:
        mods[n].eval()


def maxdiff(a, b):
    return (a.detach().float() - b.detach().float()).abs().max().item()
import datetime, tempfile, traceback
import torch.distributed as dist, torch.multiprocessing as mp
import frzcompile
STEPS = 10

def batch(s):
    g = torch.Generator().manual_seed(s)
    B, L = (8, 10) if s % 2 == 0 else (4, 7)
    return torch.randint(1, 100, (B, L), generator=g), torch.randint(0, 3, (B,), generator=g)

def loop(model, net, opt, rank, world, on_freeze, counts):
    model.eval()  # trained in eval mode, grad on
    losses = []
    for s in range(STEPS):
        if s == 4:
            on_freeze()
        x, y = batch(s)
        part = slice(rank * len(y) // world, (rank + 1) * len(y) // world)
        with torch.autocast("cpu", torch.bfloat16, enabled=s % 3 == 2 and not os.environ.get("NOAMP")):
            logits = net(input_ids=x[part]).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), y[part])
        loss.backward(); opt.step(); opt.zero_grad()
        losses.append(loss.item())
    return losses

def worker(rank, world, folder):
    try:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        torch.set_num_threads(1)
        from frzcompile.integrations.ddp import DistributedDataParallel
        model = tiny_bert(dropout=0.0, layers=3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        fm = frzcompile.optimize(model, (batch(0)[0],), optimizer=opt)
        counts = [0]
        model.bert.encoder.layer[1].register_forward_hook(lambda *a: counts.__setitem__(0, counts[0] + 1))
        net = DistributedDataParallel(fm)
        loop(model, net, opt, rank, world, lambda: fm.freeze("bert.embeddings", "bert.encoder.layer.0"), counts)
        if rank == 0:
            torch.save({"w": model.state_dict(), "hook": counts[0], "rebuilds": net.rebuilds}, f"{folder}/r.pt")
        dist.barrier(); sys.stdout.flush(); os._exit(0)
    except BaseException:
        open(f"{folder}/err{rank}.txt", "w").write(traceback.format_exc()); os._exit(1)

if __name__ == "__main__":
    ref = tiny_bert(dropout=0.0, layers=3)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    counts = [0]
    ref.bert.encoder.layer[1].register_forward_hook(lambda *a: counts.__setitem__(0, counts[0] + 1))
    loop(ref, ref, opt, 0, 1, lambda: freeze_by_hand(ref, ["bert.embeddings", "bert.encoder.layer.0"]), counts)
    with tempfile.TemporaryDirectory() as folder:
        ctx = mp.get_context("spawn")
        ps = [ctx.Process(target=worker, args=(r, 2, folder)) for r in range(2)]
        [p.start() for p in ps]; [p.join(180) for p in ps]
        errs = [open(os.path.join(folder, f)).read() for f in os.listdir(folder) if f.startswith("err")]
        if errs:
            print("ERROR", errs[0][-800:]); sys.exit(1)
        r = torch.load(f"{folder}/r.pt")
    sd = ref.state_dict()
    diffs = {k: maxdiff(r["w"][k], sd[k]) for k in sd if sd[k].is_floating_point()}
    frozen = [k for k in sd if k.startswith(("bert.embeddings", "bert.encoder.layer.0."))]
    print("max weight diff vs 1-process eager:", max(diffs.values()), "| frozen weights diff:",
          max(diffs[k] for k in frozen if k in diffs), "| hook calls per rank / eager:", r["hook"], counts[0],
          "| DDP rebuilds:", r["rebuilds"])
