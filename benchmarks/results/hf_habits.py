"""The tiny Hugging Face BERT the HF habits checks (`hf_check_session*.py`) train, and its batches: a model from a
config (3 layers, width 32, dropout on), an untouched deep copy to freeze by hand, and seeded batches of any
shape."""
import copy

import torch
import transformers as T


def bert_pair(seed: int = 0):
    """(the model, its deep copy), made after torch.manual_seed(seed)."""
    cfg = T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                       intermediate_size=64, num_labels=3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    torch.manual_seed(seed)
    model = T.BertForSequenceClassification(cfg)
    return model, copy.deepcopy(model)


def batch(b, n, seed):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 64, (b, n), generator=g), "attention_mask": torch.ones(b, n, dtype=torch.long),
            "labels": torch.randint(0, 3, (b,), generator=g)}
