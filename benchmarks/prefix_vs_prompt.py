"""Prefix tuning vs prompt tuning on MiniLM SST-2, same budget: dev accuracy and training speed.

    python benchmarks/prefix_vs_prompt.py [--seeds 3] [--steps 300] [--out runs/prefix-vs-prompt]

Runs `deltatune compare` with both methods at their defaults (prefix: length 10, MLP reparameterization
with hidden 512, lr 1e-3; prompt: length 20, lr 3e-2), the budget of docs/results/compare-sst2-minilm
(300 steps of batch 32, max length 64), each (method, seed) cell in its own process, and prints the
rows: trainable (delta) parameters, accuracy mean ± std over seeds, examples per second in training.
The report and per-cell runs are in OUT (report.md, results.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deltatune.cli import main as cli_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("runs/prefix-vs-prompt"))
    args = parser.parse_args()
    code = cli_main(["compare", "--model", "minilm", "--task", "sst2", "--methods", "prefix,prompt",
                     "--seeds", str(args.seeds), "--budget", f"steps={args.steps}",
                     "--batch-size", str(args.batch_size), "--no-latency", "--out", str(args.out)])
    if code:
        raise SystemExit(code)
    results = json.loads((args.out / "results.json").read_text())
    print(f"{'method':<8}{'delta params':>14}{'accuracy':>18}{'train ex/s':>12}")
    for row in results["rows"]:
        accuracy = f"{100 * row['accuracy_mean']:.2f} ± {100 * row['accuracy_std']:.2f}"
        print(f"{row['label']:<8}{row['trainable_parameters']:>14,}{accuracy:>18}{row['examples_per_s']:>12.1f}")


if __name__ == "__main__":
    main()
