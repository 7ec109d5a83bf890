# The nineteenth round's two fixes on a tiny Hugging Face BERT from a config, with a user's habits, against eager
# PyTorch frozen by hand (2026-12-04; run with the repo's .venv, 1-2 threads):
# 1. ALaST(k=2) mirrored layer by layer: a freeze by hand between steps, then a second phase's optimizer over what
#    requires grad (the fix), model.eval()/train() on the user's variable, a forward hook, bf16 autocast, two
#    batch shapes.
# 2. frzcompile's DDP wrapper, 2 processes (gloo), the model trained in eval mode (grad on), a forward hook, two
#    batch shapes, layers frozen by hand mid-run on both ranks; with bf16 autocast on some steps, then in fp32.
import copy
import datetime
import os
import sys
import tempfile
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import frzcompile

warnings.filterwarnings("ignore")
STEPS = 10
AMP = [True]


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


def alast_batch(s):
    g = torch.Generator().manual_seed(s)
    B, L = (8, 10) if s % 2 == 0 else (5, 7)
    return torch.randint(1, 100, (B, L), generator=g), torch.randint(0, 3, (B,), generator=g)


def alast_check():
    ref = tiny_bert(dropout=0.1, layers=4)
    m = copy.deepcopy(ref)
    opt_m = torch.optim.AdamW(m.parameters(), 1e-3)
    opt_r = torch.optim.AdamW(ref.parameters(), 1e-3)
    fm = frzcompile.optimize(m, example_inputs=(alast_batch(0)[0],), optimizer=opt_m,
                             policy=frzcompile.ALaST(budget=1.0, k=2))
    svc = [s for s in fm.services if s.name == "alast"][0]
    layers = svc.layers
    calls = {"fm": [], "ref": []}
    m.bert.encoder.layer[1].register_forward_hook(lambda mod, i, o: calls["fm"].append(float(o[0].float().sum())))
    ref.bert.encoder.layer[1].register_forward_hook(lambda mod, i, o: calls["ref"].append(float(o[0].float().sum())))
    P_r = dict(ref.named_parameters())
    frozen_ref, worst = set(), 0.0
    for step in range(12):
        x, y = alast_batch(step)
        amp = step % 3 == 2
        if step == 4:  # between steps: freeze by hand, then a second phase's optimizer over what requires grad
            fm.freeze("bert.encoder.layer.3")
            frozen_ref.add("bert.encoder.layer.3")
            freeze_by_hand(ref, ["bert.encoder.layer.3"])
            flags = ([n for n, p in m.named_parameters() if not p.requires_grad],
                     [n for n, p in ref.named_parameters() if not p.requires_grad])
            print("flags equal after the freeze between steps:", flags[0] == flags[1], len(flags[0]))
            opt_m = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], 1e-3)
            opt_r = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], 1e-3)
        if step == 9:
            fm.unfreeze("bert.encoder.layer.3")
            frozen_ref.discard("bert.encoder.layer.3")
            for p in ref.bert.encoder.layer[3].parameters():
                p.requires_grad_(True)
            ref.bert.encoder.layer[3].train()
            print("flags equal after the thaw:", [p.requires_grad for p in m.parameters()] ==
                  [p.requires_grad for p in ref.parameters()])
        m.train(); ref.train(); reeval(ref, frozen_ref)
        torch.manual_seed(100 + step)
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            lm = fm(input_ids=x, labels=y).loss
        trained = {layers[i] for i in svc.trained}
        saved = {}
        for L in layers:
            if L not in trained and L not in frozen_ref:
                for n, p in ref.named_parameters():
                    if n.startswith(L + ".") and p.requires_grad:
                        saved[n] = True; p.requires_grad_(False)
        torch.manual_seed(100 + step)
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            lr = ref(input_ids=x, labels=y).loss
        lm.backward(); lr.backward()
        opt_m.step(); opt_r.step(); opt_m.zero_grad(); opt_r.zero_grad()
        for n in saved:
            P_r[n].requires_grad_(True)
        worst = max(worst, abs(lm.item() - lr.item()))
        if step % 4 == 3:  # the user's own eval pass on their variable
            m.eval(); ref.eval()
            with torch.no_grad():
                e = maxdiff(fm(input_ids=x).logits, ref(input_ids=x).logits)
            print(step, "eval logits diff", e)
            m.train(); ref.train()
    print("max loss diff over 12 steps:", worst, "| hook calls fm/ref:", len(calls["fm"]), len(calls["ref"]),
          "| hook outputs diff:", max(abs(a - b) for a, b in zip(calls["fm"], calls["ref"])))
    print("weights max diff:", max(maxdiff(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values())
                                  if a.is_floating_point()))


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
        with torch.autocast("cpu", torch.bfloat16, enabled=s % 3 == 2 and AMP[0]):
            logits = net(input_ids=x[part]).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), y[part])
        loss.backward(); opt.step(); opt.zero_grad()
        losses.append(loss.item())
    return losses

def worker(rank, world, folder, amp):
    AMP[0] = amp
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


def ddp_check(amp):
    AMP[0] = amp
    ref = tiny_bert(dropout=0.0, layers=3)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    counts = [0]
    ref.bert.encoder.layer[1].register_forward_hook(lambda *a: counts.__setitem__(0, counts[0] + 1))
    loop(ref, ref, opt, 0, 1, lambda: freeze_by_hand(ref, ["bert.embeddings", "bert.encoder.layer.0"]), counts)
    with tempfile.TemporaryDirectory() as folder:
        ctx = mp.get_context("spawn")
        ps = [ctx.Process(target=worker, args=(r, 2, folder, amp)) for r in range(2)]
        [p.start() for p in ps]; [p.join(180) for p in ps]
        errs = [open(os.path.join(folder, f)).read() for f in os.listdir(folder) if f.startswith("err")]
        if errs:
            print("ERROR", errs[0][-800:]); sys.exit(1)
        r = torch.load(f"{folder}/r.pt")
    sd = ref.state_dict()
    diffs = {k: maxdiff(r["w"][k], sd[k]) for k in sd if sd[k].is_floating_point()}
    frozen = [k for k in sd if k.startswith(("bert.embeddings", "bert.encoder.layer.0."))]
    print("bf16 on 3 of 10 steps:" if amp else "fp32:", "max weight diff vs 1-process eager:", max(diffs.values()), "| frozen weights diff:",
          max(diffs[k] for k in frozen if k in diffs), "| hook calls per rank / eager:", r["hook"], counts[0],
          "| DDP rebuilds:", r["rebuilds"])


if __name__ == "__main__":
    alast_check()
    ddp_check(True)
    ddp_check(False)
