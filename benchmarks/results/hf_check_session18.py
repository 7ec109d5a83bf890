"""Round-18 changes on HF models from configs, with user habits: the compile path (region order check) and the
sparsity reload; against eager with the same parameters frozen."""
import copy, warnings, torch, transformers, frzcompile
from frzcompile import backend
warnings.filterwarnings("ignore")
torch.manual_seed(0)
cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, num_labels=3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
for name, model in (("bert", transformers.BertForSequenceClassification(cfg)),
                    ("gpt2", transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
                        vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32, num_labels=3, pad_token_id=0)))):
    base = model.base_model
    frozen = [base.embeddings, base.encoder.layer[0]] if name == "bert" else [base.wte, base.wpe, base.h[0]]
    for m in frozen:
        m.requires_grad_(False)
    ref = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    calls = {"fm": 0, "ref": 0}
    (base.encoder.layer[1] if name == "bert" else base.h[1]).register_forward_hook(lambda *a: calls.__setitem__("fm", calls["fm"] + 1))
    (ref.base_model.encoder.layer[1] if name == "bert" else ref.base_model.h[1]).register_forward_hook(lambda *a: calls.__setitem__("ref", calls["ref"] + 1))
    torch._dynamo.reset()
    comp = torch.compile(model, backend="frzcompile", options={"inner": "aot_eager"})
    pc = torch.compile(plain, backend="aot_eager")
    worst, worst_amp_plain = 0.0, 0.0
    for step, (b, t, amp) in enumerate([(4, 10, False), (3, 7, True), (4, 10, False), (2, 12, True)]):
        ids = torch.randint(1, 100, (b, t)); labels = torch.randint(0, 3, (b,))
        if step == 2:
            model.eval(); ref.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            torch.manual_seed(step); out = comp(input_ids=ids, labels=labels)
            torch.manual_seed(step); r = ref(input_ids=ids, labels=labels)
            torch.manual_seed(step); pl = pc(input_ids=ids, labels=labels)
        out.loss.backward(); r.loss.backward(); pl.loss.backward()
        d = (out.logits - r.logits).abs().max().item()
        for p, q in zip(model.parameters(), ref.parameters()):
            if p.grad is not None or q.grad is not None:
                d = max(d, (p.grad - q.grad).abs().max().item())
        if amp:  # torch's own autocast rounding under aot_eager: frzcompile against plain torch.compile
            dp = (out.logits - pl.logits).abs().max().item()
            for p, q in zip(model.parameters(), plain.parameters()):
                if p.grad is not None or q.grad is not None:
                    dp = max(dp, (p.grad - q.grad).abs().max().item())
            worst_amp_plain = max(worst_amp_plain, dp)
        else:
            worst = max(worst, d)
        for m in (model, ref, plain):
            m.zero_grad(set_to_none=True)
        model.train(); ref.train(); plain.train()
    regions = [g.region_nodes for g in backend.graphs_for(model)]
    print(f"{name} compile: fp32 steps vs eager {worst:.3g}; bf16 steps vs plain torch.compile {worst_amp_plain:.3g}; hooks {calls}; region nodes per graph {regions}")

# sparsity: a dense checkpoint loaded into an optimized BERT, then eval and a training step
model = transformers.BertForSequenceClassification(cfg)
dense = copy.deepcopy(model.state_dict())
ids = torch.randint(1, 100, (4, 10))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
fm = frzcompile.optimize(model, example_kwargs={"input_ids": ids}, optimizer=opt, policy="manual", sparsity=0.5)
fm(input_ids=ids, labels=torch.zeros(4, dtype=torch.long)).loss.backward(); opt.step(); opt.zero_grad()
fm.load_state_dict(dense, strict=False)
model.eval()
with torch.no_grad():
    fm(input_ids=ids)
nonzero = sum(int(t.weight[~t.mask].ne(0).sum()) for t in fm.sparsity.targets.values())
print("sparsity: masked weights nonzero after a dense load and one eval call:", nonzero, "of", len(fm.sparsity.targets), "masked weights")
