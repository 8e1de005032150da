"""transformers.Trainer trains a deltatune LoRA on SmolLM2-135M-Instruct (the README's Trainer example), then shows
what the checkpoints hold and that resuming from one gives the uninterrupted run's delta.

    DELTATUNE_DATA=../shared/data OMP_NUM_THREADS=1 python examples/trainer_smollm2.py [--steps 6] [--out runs/trainer]

1. The README example: 32 E2E dev references (MR -> sentence), LoRA r=8, `DeltaTrainer`, a checkpoint every
   steps/2 steps, `save_model(OUT/delta)`.
2. Every file of every checkpoint with its size (no file holds base weights: the largest is the delta or Adam's
   two moments of it).
3. A fresh model resumed from the middle checkpoint, trained to the end: its delta against the uninterrupted one
   (bitwise equal, or the largest difference).
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

import deltatune
from deltatune.integrations.trainer import DeltaTrainer
from deltatune.models import resolve_model_path


def e2e_texts(rows: int) -> list[str]:
    with open(Path(os.environ.get("DELTATUNE_DATA", "../shared/data")) / "e2e" / "devset.csv") as handle:
        return [f"{row['mr']} => {row['ref']}" for row, _ in zip(csv.DictReader(handle), range(rows), strict=False)]


def train(out: Path, steps: int, resume: str | None = None) -> deltatune.DeltaModel:
    # ---- the README example ----
    path = resolve_model_path("smollm2")
    tokenizer, base = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    model = deltatune.attach(base, deltatune.LoRA(r=8), task="e2e")
    encoded = tokenizer(e2e_texts(32), padding="max_length", truncation=True, max_length=48)
    labels = [[t if m else -100 for t, m in zip(ids, mask)] for ids, mask in
              zip(encoded["input_ids"], encoded["attention_mask"])]
    data = Dataset.from_dict({**encoded, "labels": labels})
    args = TrainingArguments(str(out), max_steps=steps, save_steps=steps // 2, per_device_train_batch_size=4,
                             learning_rate=2e-4, report_to=[], logging_steps=1, seed=0)
    trainer = DeltaTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(out / "delta"))  # delta.safetensors + delta.json: load_delta, deltatune eval/serve
    # ----
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default="runs/trainer")
    options = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(options.out)
    whole = train(out / "uninterrupted", options.steps)
    for folder in sorted((out / "uninterrupted").glob("checkpoint-*")) + [out / "uninterrupted" / "delta"]:
        sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
        print(f"{folder}: {sum(sizes.values()) / 1e6:.2f} MB in {len(sizes)} files; "
              + ", ".join(f"{name} {size / 1e6:.2f} MB" for name, size in sizes.items() if size > 10_000))
    middle = out / "uninterrupted" / f"checkpoint-{options.steps // 2}"
    resumed = train(out / "resumed", options.steps, resume=str(middle))
    a, b = whole.task_parameters(), resumed.task_parameters()
    equal = all(torch.equal(a[k], b[k]) for k in a)
    largest = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"resumed from {middle.name} vs uninterrupted, {len(a)} tensors: "
          f"{'bitwise equal' if equal else 'NOT bitwise equal'}; largest difference {largest:.3g}")


if __name__ == "__main__":
    main()
