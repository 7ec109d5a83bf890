"""Lightning + frzcompile: a small CNN on scikit-learn's digits (real 8x8 handwritten digits, bundled with
scikit-learn), trained by `lightning.Trainer` once as is and once with `callbacks=[FreezeCallback(...)]`. The
LightningModule is unchanged; same weights, same data order. Prints time and test accuracy of both, then
frzcompile.explain.

    pip install -e ".[bench]"
    python examples/lightning_digits.py [--epochs 30] [--policy smartfrz|linear|autofreeze] [--cache]
"""
import argparse
import logging
import time
import warnings

import lightning.pytorch as pl
import torch
from torch import nn

import frzcompile
from frzcompile import data, zoo
from frzcompile.integrations.lightning import FreezeCallback


class DigitsClassifier(pl.LightningModule):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.model = zoo.SmallCNN(width=32, dropout=0.1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def run(args, train, test, callbacks):
    module = DigitsClassifier(args.seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train), batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(module, loader)
    seconds = time.perf_counter() - start
    module.eval()
    with torch.no_grad():
        acc = (module.model(test[0]).argmax(1) == test[1]).float().mean().item()
    return seconds, acc


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--policy", default="smartfrz")
    parser.add_argument("--cache", action="store_true", help="serve the frozen prefix from the activation cache")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")  # its notes on num_workers for a CPU-only toy loader

    x_train, y_train, x_test, y_test = data.digits(seed=args.seed)
    print(f"digits: {len(x_train)} train / {len(x_test)} test images; SmallCNN, {args.epochs} epochs, Lightning")
    full = run(args, (x_train, y_train), (x_test, y_test), [])
    callback = FreezeCallback(policy=args.policy, module="model", cache=args.cache)
    ours = run(args, (x_train, y_train), (x_test, y_test), [callback])

    print("\n| run | train time (s) | test accuracy |\n|---|---|---|")
    print(f"| Lightning as is | {full[0]:.2f} | {full[1] * 100:.2f}% |")
    print(f"| + FreezeCallback(policy={args.policy!r}{', cache=True' if args.cache else ''}) | {ours[0]:.2f} | "
          f"{ours[1] * 100:.2f}% |")
    print(f"\nspeedup {full[0] / ours[0]:.2f}x, accuracy {(ours[1] - full[1]) * 100:+.2f} points\n")
    print(frzcompile.explain(callback.fm))


if __name__ == "__main__":
    main()
