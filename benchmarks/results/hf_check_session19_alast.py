# ALaST(k=2) on a tiny HF BERT from a config, with user habits, against eager training the same drawn layers by
# hand: a freeze by hand between steps, then a second-phase optimizer over what requires grad (the fix), an
# eval pass through model.eval() on the user's variable, a forward hook, bf16 autocast, two batch shapes.
# (2026-12-04, nineteenth round; run with the repo's .venv, 1-2 threads)
import copy, warnings
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
import frzcompile

def batch(s):
    g = torch.Generator().manual_seed(s)
    B, L = (8, 10) if s % 2 == 0 else (5, 7)
    return torch.randint(1, 100, (B, L), generator=g), torch.randint(0, 3, (B,), generator=g)

ref = tiny_bert(dropout=0.1, layers=4)
m = copy.deepcopy(ref)
opt_m = torch.optim.AdamW(m.parameters(), 1e-3)
opt_r = torch.optim.AdamW(ref.parameters(), 1e-3)
fm = frzcompile.optimize(m, example_inputs=(batch(0)[0],), optimizer=opt_m,
                         policy=frzcompile.ALaST(budget=1.0, k=2))
svc = [s for s in fm.services if s.name == "alast"][0]
layers = svc.layers
calls = {"fm": [], "ref": []}
m.bert.encoder.layer[1].register_forward_hook(lambda mod, i, o: calls["fm"].append(float(o[0].float().sum())))
ref.bert.encoder.layer[1].register_forward_hook(lambda mod, i, o: calls["ref"].append(float(o[0].float().sum())))
P_r = dict(ref.named_parameters())
frozen_ref, worst = set(), 0.0
for step in range(12):
    x, y = batch(step)
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
