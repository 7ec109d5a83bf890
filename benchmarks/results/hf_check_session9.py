"""This session's changes on a tiny HF BERT from a config, with user habits (eval() on the user's own variable, a
forward hook, bf16 autocast, other batch shapes), against eager frozen by hand: conversions under
swap_module_params_on_conversion mid-run, the bounded loss history through a resume, and the default policy."""
import io

import torch

import frzcompile
from hf_habits import batch, bert_pair

torch.set_num_threads(1)
torch.__future__.set_swap_module_params_on_conversion(True)
model, ref = bert_pair()


fm = frzcompile.optimize(model, example_kwargs=batch(8, 12, 0))  # the default policy
frozen = ["bert.embeddings", "bert.encoder.layer.0"]
fm.freeze(*frozen)
for path in frozen:
    ref.get_submodule(path).requires_grad_(False)
calls = {"fm": 0, "ref": 0}
model.bert.encoder.layer[1].register_forward_hook(lambda *a: calls.__setitem__("fm", calls["fm"] + 1))
ref.bert.encoder.layer[1].register_forward_hook(lambda *a: calls.__setitem__("ref", calls["ref"] + 1))
worst, shapes = 0.0, [(8, 12), (5, 9), (3, 20)]
for step in range(12):
    if step == 6:  # a conversion mid-run, on fm and on the reference: both swap their parameters
        fm.double()
        ref.double()
    o1 = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], 0.05)
    o2 = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], 0.05)
    b, n = shapes[step % 3]
    kw = batch(b, n, step)
    amp = step % 3 == 2 and step < 6
    model.train(); ref.train()
    for path in frozen:
        ref.get_submodule(path).eval()
    for net, opt in ((fm, o1), (ref, o2)):
        torch.manual_seed(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = net(**kw)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    worst = max(worst, max((p - q).abs().max().item() for p, q in zip(model.parameters(), ref.parameters())))
    if step % 4 == 3:  # model.eval() on the user's own variable
        model.eval(); ref.eval()
        with torch.no_grad():
            x = batch(4, 7, 99)
            worst = max(worst, (fm(**x).logits - ref(**x).logits).abs().max().item())
print("dtype after the conversion:", model.bert.encoder.layer[1].output.dense.weight.dtype)
print("max difference over 12 steps (weights, eval logits):", worst, "hooks fm/ref:", calls)
state = io.BytesIO()
torch.save(fm.freeze_state_dict(), state)
state.seek(0)
loaded = torch.load(state, weights_only=True)
print("freeze state loads weights-only:", loaded["losses"]["history"]["length"] == len(fm.losses()),
      "losses kept:", sum(v is not None for v in fm.losses()), "of", len(fm.losses()))
