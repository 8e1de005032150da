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
Writes ``OUT/results.json`` (each row with the settings it was measured with) and prints a table. Rows kept
from an earlier run into the same ``--out`` join the table only when they were scored on the same test MRs;
the others (or rows saved without their settings) are listed under it with their settings, not mixed in.
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
from deltatune.training.loop import TrainConfig, train

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

    # what every row's numbers depend on: the test MRs scored (rows on other MRs are not comparable)
    scored_on = {"test_limit": args.test_limit, "test_mrs": len(test)}

    def record(name: str, metrics: dict, settings: dict, **extra) -> None:
        results[name] = {**{m: metrics[m] for m in METRICS}, **extra, "settings": {**scored_on, **settings}}
        print(json.dumps({name: results[name]}))
        tmp = results_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, results_file)

    for run in args.runs.split(","):
        started = time.perf_counter()
        if run == "floor":
            model = DeltaModel(load_model("smollm2", "causal-lm"))
            metrics = evaluate(model, tokenizer, task, test, batch_size=64)
            record("untrained (training prompt)", metrics, {}, trainable=0,
                   seconds=round(time.perf_counter() - started))
        elif run in {"zero-shot", "few-shot"}:
            shots = 0 if run == "zero-shot" else args.shots
            model = load_model("smollm2", "causal-lm")
            metrics = evaluate_fewshot(model, tokenizer, task, shots=shots, split="test", data_dir=args.data_dir,
                                       limit=args.test_limit, batch_size=16)
            record(f"{shots}-shot prompting", metrics, {"shots": shots, "demonstration_seed": 0}, trainable=0,
                   demonstrations=metrics["demonstrations"],
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
            lora_settings = {"train_limit": args.train_limit, "epochs": args.epochs, "lr": args.lr,
                             "batch_size": args.batch_size}
            record("LoRA r=8 (q,v)", metrics, lora_settings, trainable=summary["trainable_parameters"],
                   train_examples=summary["examples_seen"], train_seconds=summary["train_seconds"],
                   dev=summary["final"], seconds=round(time.perf_counter() - started))
        else:
            raise SystemExit(f"unknown run {run!r}: choose from floor, zero-shot, few-shot, lora")

    print_table(results, scored_on)


def print_table(results: dict[str, dict], scored_on: dict) -> None:
    """The rows scored on `scored_on`'s test MRs, each with its own settings; the others listed apart."""
    same = {name: row for name, row in results.items() if _scored_on(row) == scored_on}
    print(f"\nscored on {scored_on['test_mrs']} test MRs (--test-limit {scored_on['test_limit']})")
    print(f"{'run':<30}{'trainable':>10}" + "".join(f"{m:>9}" for m in METRICS) + f"{'seconds':>9}  settings")
    for name, row in same.items():
        print(f"{name:<30}{row['trainable']:>10,}" + "".join(f"{row[m]:>9.4f}" for m in METRICS)
              + f"{row['seconds']:>9}  {_own_settings(row)}")
    others = {name: row for name, row in results.items() if name not in same}
    if others:
        print("\nnot in the table (in results.json from an earlier run, scored on other test MRs):")
        for name, row in others.items():
            settings = row.get("settings")
            print(f"  {name}: " + (json.dumps(settings) if settings else "settings not recorded")
                  + f"; BLEU {row['bleu']:.4f}")


def _scored_on(row: dict) -> dict | None:
    settings = row.get("settings")
    return settings and {key: settings.get(key) for key in ("test_limit", "test_mrs")}


def _own_settings(row: dict) -> str:
    own = {k: v for k, v in row["settings"].items() if k not in ("test_limit", "test_mrs")}
    return ", ".join(f"{k} {v}" for k, v in own.items()) or "-"


if __name__ == "__main__":
    main()
