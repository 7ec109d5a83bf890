"""This session's changes on a tiny HF BERT from a config, with user habits, against eager frozen by hand."""
import copy, io
import torch
from torch import nn
import frzcompile
from frzcompile import CacheConfig
torch.set_num_threads(1)
from hf_habits import batch, bert_pair
model, ref = bert_pair()
fm = frzcompile.optimize(model, example_kwargs=batch(8, 12, 0), cache=CacheConfig(check_cost=False))  # default policy
frozen_paths = ["bert.embeddings", "bert.encoder.layer.0"]
fm.freeze(*frozen_paths)
for path in frozen_paths:
    ref.get_submodule(path).requires_grad_(False)
def by_hand_modes():
    for path in frozen_paths:
        ref.get_submodule(path).eval()
calls = {"fm": 0, "ref": 0}
model.bert.encoder.layer[1].register_forward_hook(lambda *a: calls.__setitem__("fm", calls["fm"] + 1))
ref.bert.encoder.layer[1].register_forward_hook(lambda *a: calls.__setitem__("ref", calls["ref"] + 1))
o1 = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-3)
o2 = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], 1e-3)
worst = 0.0
shapes = [(8, 12), (8, 12), (5, 9), (1, 12), (8, 12), (3, 20)]
for step in range(18):
    b, n = shapes[step % len(shapes)]
    kw = batch(b, n, step % 4)  # samples repeat: the cache serves
    amp = step % 3 == 2
    model.train(); ref.train(); by_hand_modes()
    torch.manual_seed(step)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = fm(**kw)
    torch.manual_seed(step)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        want = ref(**kw)
    out.loss.backward(); want.loss.backward()
    worst = max(worst, (out.logits.float() - want.logits.float()).abs().max().item())
    for (n_, p), q in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), n_
        if p.grad is not None:
            worst = max(worst, (p.grad - q.grad).abs().max().item())
    o1.step(); o2.step(); o1.zero_grad(); o2.zero_grad()
    if step % 6 == 5:  # model.eval() on the user's own variable
        model.eval(); ref.eval()
        with torch.no_grad():
            e1, e2 = model(**kw).logits, ref(**kw).logits
        worst = max(worst, (e1 - e2).abs().max().item())
print("max difference over 18 steps (grads, logits, eval):", worst, "hooks fm/ref:", calls)
print("cache:", {k: fm.cache.report()[k] for k in ("hits", "lookups")}, "steps aside:", fm.cache.report()["steps_aside"])
# a head swapped, then a freeze before any call
model.classifier = nn.Linear(32, 3); ref.classifier = copy.deepcopy(model.classifier)
fm.freeze("bert.encoder.layer.1")
print("new layer.1 frozen right away:", not any(p.requires_grad for p in model.bert.encoder.layer[1].parameters()))
e = frzcompile.explain(fm)
print("explain classifier FLOPs row present:", any(r["unit"] == "classifier" for r in e.rows), "stale note:",
      "structure changed" in str(e))
model.bert.encoder.layer[1]._forward_hooks.clear()
buf = io.BytesIO(); torch.save(model, buf); print("pickle mentions frzcompile classes:", b"frzcompile." in buf.getvalue())
