"""The reference for "time to 86% SST-2": a plain Hugging Face `Trainer` + `peft` LoRA script.

    python benchmarks/tta_trainer_peft.py [--eval-every 100] [--seed 0] [--bf16] [--out runs/tta-trainer]

MiniLM-L6 + LoRA r=8 (alpha 16, no dropout, on `query` and `value`, the classifier trained), SST-2 train
(67,349) -> GLUE dev (872): lr 5e-4, batch 32, linear schedule with 6% warmup, weight decay 0.01, dynamic
padding (`DataCollatorWithPadding`), one epoch, fp32 unless `--bf16` -- what an engineer writes from the
peft and Trainer docs, with the same data and LoRA configuration `deltatune train` uses by default.
Tokenisation happens before the clock starts (as `datasets.map` would). Writes `metrics.jsonl` in
deltatune's layout (one line per evaluation: step, accuracy, seconds since training began, evaluations'
own seconds so far) so `benchmarks/time_to_accuracy.py` reads both runs the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from deltatune.models import resolve_model_path
from deltatune.tasks import get_task


class TimedTrainer(Trainer):
    """`Trainer` that appends each evaluation, with the wall time since training began, to `metrics.jsonl`."""

    def __init__(self, *args, metrics_path: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.metrics_path, self.train_started, self.eval_seconds = metrics_path, time.perf_counter(), 0.0
        metrics_path.write_text("")

    def train(self, *args, **kwargs):
        self.train_started = time.perf_counter()
        return super().train(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        started = time.perf_counter()
        metrics = super().evaluate(*args, **kwargs)
        now = time.perf_counter()
        self.eval_seconds += now - started
        record = {"step": self.state.global_step, "eval": {"accuracy": metrics["eval_accuracy"]},
                  "seconds": round(now - self.train_started, 2), "eval_seconds": round(self.eval_seconds, 2)}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (Trainer's bf16=True)")
    parser.add_argument("--train-limit", type=int)
    parser.add_argument("--out", default="runs/tta-trainer")
    parser.add_argument("--data-dir", default=os.environ.get("DELTATUNE_DATA", "../shared/data"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    path = resolve_model_path("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    task = get_task("sst2")

    def encode(split: str, limit: int | None = None) -> list[dict]:
        rows = task.load(split, data_dir=args.data_dir, limit=limit)
        return [{**tokenizer(r["text"], truncation=True, max_length=128), "labels": r["label"]} for r in rows]

    train_set, dev_set = encode("train", args.train_limit), encode("dev")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["query", "value"]))

    def accuracy(prediction) -> dict:
        return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}

    training_args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=32, per_device_eval_batch_size=64,
        learning_rate=5e-4, num_train_epochs=1, lr_scheduler_type="linear", warmup_steps=0.06,
        weight_decay=0.01, eval_strategy="steps", eval_steps=args.eval_every, save_strategy="no",
        logging_steps=100, report_to="none", seed=args.seed, use_cpu=True, bf16=args.bf16, disable_tqdm=True,
    )
    trainer = TimedTrainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=dev_set,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy,
                      metrics_path=out / "metrics.jsonl")
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    final = trainer.evaluate()
    summary = {"runner": "trainer+peft", "steps": trainer.state.global_step, "train_seconds": round(train_seconds, 2),
               "final": {"accuracy": final["eval_accuracy"]}, "threads": torch.get_num_threads(),
               "precision": "bf16" if args.bf16 else "fp32", "seed": args.seed}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
