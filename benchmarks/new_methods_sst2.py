"""Adapters and prompt tuning on real data: MiniLM on 2,000 SST-2 sentences, one epoch each.

    python benchmarks/new_methods_sst2.py [--train 2000] [--data $DELTATUNE_DATA/glue/sst2]

Prints the training loss every 10 steps and the accuracy on the 872 dev sentences before and after
(the classification head is new, so "before" is chance). Batch 32, max length 64, AdamW.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import deltatune
from deltatune.models import load_model, load_tokenizer

# like the tests: $DELTATUNE_DATA, else ../shared/data beside the checkout
DATA_ROOT = os.environ.get("DELTATUNE_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
DATA = Path(DATA_ROOT) / "glue" / "sst2"
RUNS = [  # (label, method config, learning rate)
    ("adapter (bottleneck 64, houlsby)", deltatune.Adapter(bottleneck=64), 1e-3),
    ("prompt tuning (length 20, random)", deltatune.PromptTuning(length=20), 3e-2),
]


def read_tsv(path: Path, limit: int | None = None) -> list[tuple[str, int]]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(row["sentence"], int(row["label"])) for row in rows[:limit]]


def batches(rows: list[tuple[str, int]], tokenizer, size: int, max_length: int):
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        encoded = tokenizer([text for text, _ in chunk], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
        yield dict(encoded), torch.tensor([label for _, label in chunk])


@torch.no_grad()
def accuracy(model, rows, tokenizer, max_length: int) -> float:
    model.eval()
    correct = 0
    for inputs, labels in batches(rows, tokenizer, 128, max_length):
        correct += (model(**inputs).logits.argmax(-1) == labels).sum().item()
    return correct / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)

    tokenizer = load_tokenizer("minilm")
    train_rows = read_tsv(args.data / "train.tsv", args.train)
    dev_rows = read_tsv(args.data / "dev.tsv")
    random.Random(0).shuffle(train_rows)
    print(f"MiniLM on SST-2: {len(train_rows)} training sentences, {len(dev_rows)} dev sentences, "
          f"batch {args.batch}, max length {args.max_length}, one epoch")
    for label, config, lr in RUNS:
        torch.manual_seed(0)
        model = deltatune.attach(load_model("minilm", "classification", num_labels=2), config, task="sst2")
        report = model.report(print_table=False)
        print(f"\n== {label}, AdamW lr {lr}: {report.method_parameters:,} method + {report.norm_parameters:,} "
              f"norm + {report.head_parameters:,} head parameters trained ({report.percent:.2f}% of the model)")
        print(f"dev accuracy before: {accuracy(model, dev_rows, tokenizer, args.max_length):.4f}")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        started, window = time.perf_counter(), []
        model.train()
        for step, (inputs, labels) in enumerate(batches(train_rows, tokenizer, args.batch, args.max_length), 1):
            loss = F.cross_entropy(model(**inputs).logits, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            window.append(loss.item())
            if step % 10 == 0:
                print(f"step {step:3d}  loss {sum(window) / len(window):.4f}")
                window = []
        seconds = time.perf_counter() - started
        print(f"dev accuracy after:  {accuracy(model, dev_rows, tokenizer, args.max_length):.4f}  "
              f"({step} steps, {seconds:.0f} s)")


if __name__ == "__main__":
    main()
