"""SmolLM2-135M on E2E NLG: the five official metrics on the 630 test MRs, for the untrained model,
zero-shot and 2-shot prompting, and LoRA.

    python benchmarks/e2e_smollm2.py [--runs floor,zero-shot,few-shot,lora] [--train-limit N]
                                     [--lr 1e-3] [--batch-size 8] [--test-limit N] [--out runs/bench-e2e]

- floor: the frozen model with the prompt LoRA is trained on (``{MR}\\nSentence:``), greedy decoding;
- zero-shot / few-shot: `deltatune.prompting.fewshot` (``MR: {MR}\\nSentence:``, 2 demonstrations drawn from the
  train split with seed 0, prefix key/value cache), greedy decoding, stop at newline;
- lora: `deltatune train` (r=8, alpha=16 on q_proj/v_proj, loss on the target tokens only) on the local
  "train" split (the official dev set minus a held-out 10% of MRs; the official train set is not
  available offline), then the best delta scored on the test set.
Every generation: greedy, at most 64 new tokens, cut at the first newline; scored with
`deltatune.tasks.e2e_metrics` (all references of an MR together, like the official script).
Writes ``OUT/results.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from deltatune.delta import DeltaModel, load_delta
from deltatune.evaluate import evaluate
from deltatune.models import load_model, load_tokenizer
from deltatune.prompting.fewshot import evaluate_fewshot
from deltatune.tasks import get_task
from deltatune.train import TrainConfig, train

METRICS = ["bleu", "nist", "meteor", "rouge_l", "cider"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="floor,zero-shot,few-shot,lora")
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--train-limit", type=int, help="first N training references (default: all 4,2xx)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--test-limit", type=int, help="first N test MRs (default: all 630)")
    parser.add_argument("--out", default="runs/bench-e2e")
    parser.add_argument("--data-dir", default=os.environ.get("DELTATUNE_DATA", "../shared/data"))
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    task = get_task("e2e")
    test = task.load("test", args.data_dir, limit=args.test_limit)
    tokenizer = load_tokenizer("smollm2")
    print(f"SmolLM2-135M on E2E: {len(test)} test MRs, torch {torch.__version__}, {torch.get_num_threads()} threads")

    def record(name: str, metrics: dict, **extra) -> None:
        results[name] = {**{m: metrics[m] for m in METRICS}, **extra}
        print(json.dumps({name: results[name]}))
        tmp = results_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, results_file)

    for run in args.runs.split(","):
        started = time.perf_counter()
        if run == "floor":
            model = DeltaModel(load_model("smollm2", "causal-lm"))
            metrics = evaluate(model, tokenizer, task, test, batch_size=64)
            record("untrained (training prompt)", metrics, trainable=0, seconds=round(time.perf_counter() - started))
        elif run in {"zero-shot", "few-shot"}:
            shots = 0 if run == "zero-shot" else args.shots
            model = load_model("smollm2", "causal-lm")
            metrics = evaluate_fewshot(model, tokenizer, task, shots=shots, split="test", data_dir=args.data_dir,
                                       limit=args.test_limit, batch_size=16)
            record(f"{shots}-shot prompting", metrics, trainable=0, demonstrations=metrics["demonstrations"],
                   seconds=round(time.perf_counter() - started))
        elif run == "lora":
            summary = train(TrainConfig(
                model="smollm2", task="e2e", method="lora", out=str(out / "lora"), data_dir=args.data_dir,
                epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, max_length=128,
                train_limit=args.train_limit, progress=False, log_every=20,
            ))
            model = DeltaModel(load_model("smollm2", "causal-lm"))
            load_delta(model, summary["delta"])
            metrics = evaluate(model, tokenizer, task, test, batch_size=64)
            record("LoRA r=8 (q,v)", metrics, trainable=summary["trainable_parameters"],
                   train_examples=summary["examples_seen"], train_seconds=summary["train_seconds"],
                   dev=summary["final"], seconds=round(time.perf_counter() - started))
        else:
            raise SystemExit(f"unknown run {run!r}: choose from floor, zero-shot, few-shot, lora")

    print(f"\n{'run':<30}{'trainable':>10}" + "".join(f"{m:>9}" for m in METRICS) + f"{'seconds':>9}")
    for name, row in results.items():
        print(f"{name:<30}{row['trainable']:>10,}" + "".join(f"{row[m]:>9.4f}" for m in METRICS)
              + f"{row['seconds']:>9}")


if __name__ == "__main__":
    main()
