"""A chat file end to end: E2E meaning representations as user turns, references as assistant turns, LoRA on
SmolLM2-135M-Instruct with its own chat template, evaluated on held-out MRs against the same model
zero-shot on the same prompts.

    DELTATUNE_DATA=../shared/data OMP_NUM_THREADS=1 python examples/chat_e2e_smollm2.py \\
        [--train-rows 800] [--steps 100] [--out runs/chat-e2e]

1. Writes OUT/train.jsonl (one conversation per training reference of the `e2e` task's train split) and
   OUT/dev.jsonl (one per held-out dev MR, its first reference as the answer): the `e2e` task's own split,
   so the dev MRs are the 55 that docs/results/e2e_smollm2.md reports its LoRA dev scores on.
2. `deltatune train --task jsonl --format messages --method lora` (loss on the assistant turns only).
3. `deltatune eval` of the delta (chrF, BLEU, ROUGE-L, exact match; predictions.jsonl), and the untrained
   model on the same chat prompts (zero-shot); both also scored with the E2E metrics against all
   references of each MR, like the `e2e` task.
Writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from deltatune.delta import DeltaModel
from deltatune.evaluate import generation_predictions
from deltatune.models import load_model, load_tokenizer
from deltatune.tasks import get_task

INSTRUCTION = "Write one sentence describing this restaurant: "


def conversation(mr: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": INSTRUCTION + mr}, {"role": "assistant", "content": answer}]}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def deltatune(*args: str) -> str:
    command = [sys.executable, "-m", "deltatune.cli", *args]
    print("$ deltatune " + " ".join(args), flush=True)
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-rows", type=int, default=800)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default="runs/chat-e2e")
    parser.add_argument("--data-dir", default=os.environ.get("DELTATUNE_DATA", "../shared/data"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    e2e = get_task("e2e")
    train = e2e.load("train", args.data_dir, limit=args.train_rows)
    dev = e2e.load("dev", args.data_dir)
    write_jsonl(out / "train.jsonl", [conversation(e["source"], e["target"]) for e in train])
    write_jsonl(out / "dev.jsonl", [conversation(e["source"], e["references"][0]) for e in dev])
    results: dict = {"train_conversations": len(train), "dev_mrs": len(dev)}

    started = time.perf_counter()
    summary = json.loads(deltatune(
        "train", "--model", "smollm2", "--task", "jsonl", "--data-file", str(out / "train.jsonl"),
        "--dev-file", str(out / "dev.jsonl"), "--format", "messages", "--method", "lora", "--lr", str(args.lr),
        "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--out", str(out / "lora"),
        "--eval-limit", "4", "--no-progress"))  # (the final delta is kept; `eval` below scores all dev MRs)
    results["lora"] = {"train": {k: summary[k] for k in ("steps", "examples_seen", "train_seconds", "examples_per_s",
                                                          "trainable_parameters", "precision")},
                       "seconds": round(time.perf_counter() - started)}
    evaluated = json.loads(deltatune("eval", "--model", "smollm2", "--delta", str(out / "lora" / "delta"),
                                     "--task", "jsonl", "--data-file", str(out / "dev.jsonl"),
                                     "--dev-file", str(out / "dev.jsonl"), "--out", str(out / "lora")))
    results["lora"]["dev"] = evaluated["dev"]

    # zero-shot: the same chat prompts, no delta
    task = get_task("jsonl", path=out / "dev.jsonl", dev_path=out / "dev.jsonl", format="messages")
    examples = task.load("dev")
    tokenizer = load_tokenizer("smollm2")
    started = time.perf_counter()
    zero_shot = generation_predictions(DeltaModel(load_model("smollm2", "causal-lm")), tokenizer, task, examples)
    results["zero-shot"] = {"dev": task.compute_metrics(zero_shot, [e["references"] for e in examples]),
                            "seconds": round(time.perf_counter() - started)}
    write_jsonl(out / "zero-shot-predictions.jsonl",
                [{"prompt": e["messages"][-1]["content"], "prediction": p, "references": e["references"]}
                 for e, p in zip(examples, zero_shot, strict=True)])

    # both against all references of each MR with the E2E metrics (as docs/results/e2e_smollm2.md)
    lora = {row["messages"][-1]["content"]: row["prediction"]
            for row in map(json.loads, (out / "lora" / "predictions.jsonl").read_text().splitlines())}
    all_references = [e["references"] for e in dev]
    for name, predictions in [("lora", [lora[INSTRUCTION + e["source"]] for e in dev]), ("zero-shot", zero_shot)]:
        results[name]["dev_e2e_metrics"] = e2e.compute_metrics(predictions, all_references,
                                                               metrics=["bleu", "nist", "rouge_l"])
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
