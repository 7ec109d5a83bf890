"""Real data for the examples and benchmarks: scikit-learn's bundled digits, Fashion-MNIST, MNIST's test images, SST-2
and TREC files.

Paths are arguments. The default data folder is `$FRZ_DATA` if set, else a `shared/data` folder beside the
checkout (this workplace's layout) when one exists; nothing is ever downloaded.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError


def default_data_root() -> Path | None:
    candidates = []
    if os.environ.get("FRZ_DATA"):
        candidates.append(Path(os.environ["FRZ_DATA"]))
    candidates += [Path(__file__).resolve().parents[2] / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), None)


def _resolve(root, sub: str) -> Path:
    base = Path(root) if root is not None else default_data_root()
    if base is None:
        raise FileNotFoundError(
            f"no data folder: pass its path (e.g. --data /path/to/data holding {sub}/) or set FRZ_DATA"
        )
    path = base / sub if (base / sub).is_dir() else base
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    return path


def digits(test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's 8x8 digits (1,797 images, bundled with scikit-learn) as (x_train, y_train, x_test, y_test),
    images scaled to [0, 1] with shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def _idx(path: Path) -> np.ndarray:
    raw = gzip.open(path).read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(root=None, split: str = "train"):
    """Fashion-MNIST from the original idx .gz files as (images float (N, 1, 28, 28) in [0, 1], labels)."""
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', not {split!r}")
    folder = _resolve(root, "fashion-mnist")
    prefix = "train" if split == "train" else "t10k"
    images = _idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = _idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    x = torch.from_numpy(images.copy()).float().div_(255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def mnist(root=None, split: str = "test"):
    """MNIST from the original idx .gz files as (images float (N, 1, 28, 28) in [0, 1], labels). This data folder
    holds only the 10,000 test images (see its README), so only split="test" exists here."""
    if split != "test":
        raise ConfigError("only MNIST's test split (10,000 images) is in this data folder; split it yourself")
    folder = _resolve(root, "mnist")
    x = torch.from_numpy(_idx(folder / "t10k-images-idx3-ubyte.gz").copy()).float().div_(255.0).unsqueeze(1)
    return x, torch.from_numpy(_idx(folder / "t10k-labels-idx1-ubyte.gz").astype(np.int64))


def sst2(root=None, split: str = "train"):
    """SST-2 sentences and labels from the GLUE-style TSV files (`sentence<TAB>label`)."""
    if split not in ("train", "dev", "test"):
        raise ConfigError(f"split must be 'train', 'dev' or 'test', not {split!r}")
    folder = _resolve(root, "sst2")
    texts, labels = [], []
    with open(folder / f"{split}.tsv", encoding="utf-8") as f:
        next(f)  # header
        for line in f:
            text, label = line.rstrip("\n").rsplit("\t", 1)
            texts.append(text.strip())
            labels.append(int(label))
    return texts, torch.tensor(labels)


def trec(root=None, split: str = "train"):
    """TREC question classification (6 classes; 5,452 train / 500 test) from the `sentence-classification`
    folder (Kim 2014 preprocessing: `label sentence` per line)."""
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', not {split!r}")
    folder = _resolve(root, "sentence-classification")
    texts, labels = [], []
    with open(folder / f"TREC.{split}.all", encoding="latin-1") as f:
        for line in f:
            label, text = line.rstrip("\n").split(" ", 1)
            texts.append(text.strip())
            labels.append(int(label))
    return texts, torch.tensor(labels)
