"""LoRA vs LoRA+ vs PiSSA-init LoRA on MiniLM SST-2, and combining two tasks' LoRA deltas with each method.

    python benchmarks/loraplus_pissa_combine.py variants --seeds 0 [--out runs/bench23]
    python benchmarks/loraplus_pissa_combine.py combine --sst2 runs/bench23/lora-s0 [--other mrpc] [--out runs/bench23]

`variants`: one `deltatune train` per (variant, seed), one at a time, one thread each, at compare's SST-2 budget
(compare.TASK_SETTINGS: 300 steps of batch 32, max length 64, precision auto, LoRA r=8 alpha=16 on W_q, W_v,
lr 5e-4): plain LoRA, LoRA+ (`--lr-ratio 16`, Hayou et al. 2024) and PiSSA init (`-o init=pissa`, Meng et al.
2024). Prints dev accuracy, train seconds, examples/s and trainable parameters.

`combine`: trains a LoRA on the other task at compare's budget for it (MRPC: 2 epochs at 128 tokens), then
combines it with the SST-2 delta (`deltatune combine`, each --how) and scores every combined delta on both
dev sets with each task's own head (one combined delta per head: the LoRA factors are the same), in % of that
task's own delta's score.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {  # label -> extra `deltatune train` arguments
    "lora": [],
    "lora+ (ratio 16)": ["--lr-ratio", "16"],
    "pissa init": ["-o", "init=pissa"],
}
SLUG = {"lora": "lora", "lora+ (ratio 16)": "loraplus16", "pissa init": "pissa"}
BUDGETS = {"sst2": ["--max-steps", "300", "--max-length", "64"], "mrpc": ["--epochs", "2", "--max-length", "128"],
           "rte": ["--epochs", "3", "--max-length", "128"]}
COMBINATIONS = [  # (label, combine arguments)
    ("linear 0.5/0.5", ["--how", "linear", "--weights", "0.5,0.5"]),
    ("linear 1/1", ["--how", "linear", "--weights", "1,1"]),
    ("svd 1/1, rank 8", ["--how", "svd", "--weights", "1,1", "--rank", "8"]),
    ("ties 1/1, density 0.2", ["--how", "ties", "--weights", "1,1", "--density", "0.2"]),
    ("dare 1/1, density 0.1", ["--how", "dare", "--weights", "1,1", "--density", "0.1"]),
    ("dare 1/1, density 0.5", ["--how", "dare", "--weights", "1,1", "--density", "0.5"]),
]


def deltatune(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "deltatune.cli", *args], env=env, text=True, capture_output=True)
    if done.returncode:
        raise SystemExit(f"deltatune {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def train(task: str, out: Path, seed: int, extra: list[str]) -> dict:
    if not (out / "summary.json").is_file():
        deltatune("train", "--model", "minilm", "--task", task, "--method", "lora", "--seed", str(seed),
                  "--no-progress", "--out", str(out), *BUDGETS[task], *extra)
    return json.loads((out / "summary.json").read_text())


def variants(args: argparse.Namespace) -> None:
    rows = []
    for seed in args.seeds:
        for label, extra in VARIANTS.items():
            summary = train("sst2", args.out / f"{SLUG[label]}-s{seed}", seed, extra)
            rows.append((label, seed, summary))
            print(f"{label:18s} seed {seed}: accuracy {100 * summary['final']['accuracy']:.2f}, "
                  f"{summary['train_seconds']} s, {summary['examples_per_s']} ex/s, "
                  f"{summary['trainable_parameters']:,} trainable, {summary['precision']}", flush=True)
    print("\n| variant | seed(s) | dev accuracy | train s | ex/s | trainable |\n|---|---|---|---|---|---|")
    for label in VARIANTS:
        mine = [s for name, _, s in rows if name == label]
        accuracy = [100 * s["final"]["accuracy"] for s in mine]
        mean = sum(accuracy) / len(accuracy)
        spread = (sum((a - mean) ** 2 for a in accuracy) / (len(accuracy) - 1)) ** 0.5 if len(accuracy) > 1 else 0
        print(f"| {label} | {','.join(str(s) for s in args.seeds)} | {mean:.2f}"
              f"{f' ± {spread:.2f}' if len(accuracy) > 1 else ''} ({' / '.join(f'{a:.2f}' for a in accuracy)}) | "
              f"{sum(s['train_seconds'] for s in mine) / len(mine):.0f} | "
              f"{sum(s['examples_per_s'] for s in mine) / len(mine):.1f} | {mine[0]['trainable_parameters']:,} |")


def score(delta: Path, task: str) -> dict:
    printed = json.loads(deltatune("eval", "--model", "minilm", "--delta", str(delta), "--task", task, "--split",
                                   "dev", "--max-length", BUDGETS[task][-1]))
    return printed["dev"]


def combine(args: argparse.Namespace) -> None:
    other = args.other
    own = {"sst2": args.sst2 / "delta", other: args.out / f"{other}-lora-s0" / "delta"}
    train(other, own[other].parent, 0, [])
    own_scores = {task: score(path, task) for task, path in own.items()}
    print(f"own deltas: {json.dumps(own_scores)}", flush=True)
    rows = []
    for label, settings in COMBINATIONS:
        scores = {}
        for task in own:
            out = args.out / "combined" / f"{label.split()[0]}-{label.split()[1]}-{label[-3:].strip()}-{task}"
            deltatune("combine", "--delta", f"sst2={own['sst2']}", "--delta", f"{other}={own[other]}", *settings,
                      "--head", task, "--out", str(out))
            scores[task] = score(out, task)
        rows.append((label, scores))
        print(f"{label}: {json.dumps(scores)}", flush=True)
    metric = {"sst2": "accuracy", "mrpc": "accuracy", "rte": "accuracy"}
    print(f"\n| combined (sst2 + {other}) | SST-2 acc | % of own | {other.upper()} acc | % of own |")
    print("|---|---|---|---|---|")
    print(f"| own delta | {100 * own_scores['sst2']['accuracy']:.2f} | 100 | "
          f"{100 * own_scores[other][metric[other]]:.2f} | 100 |")
    for label, scores in rows:
        cells = []
        for task in ("sst2", other):
            value, base = scores[task][metric[task]], own_scores[task][metric[task]]
            cells += [f"{100 * value:.2f}", f"{100 * value / base:.1f}"]
        print(f"| {label} | {' | '.join(cells)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["variants", "combine"])
    parser.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default=[0])
    parser.add_argument("--sst2", type=Path, help="combine: the SST-2 LoRA run folder (from `variants`)")
    parser.add_argument("--other", default="mrpc", choices=["mrpc", "rte"])
    parser.add_argument("--out", type=Path, default=Path("runs/bench23"))
    args = parser.parse_args()
    started = time.perf_counter()
    variants(args) if args.part == "variants" else combine(args)
    print(f"\nwall {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
