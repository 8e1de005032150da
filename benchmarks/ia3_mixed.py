"""(IA)³ tasks in one mixed batch vs the base model alone: what serving 8 (IA)³ tasks together costs.

    python benchmarks/ia3_mixed.py                # about 2 minutes on a quiet core
    python benchmarks/ia3_mixed.py --reps 10      # quicker, noisier

MiniLM (all-MiniLM-L6-v2, the real weights), batches of the first 16 and 32 real SST-2 dev sentences (each
padded to its longest), 8 (IA)³ tasks (l_k, l_v, l_ff in every block; random values around 1, a head per
task). Each example of a mixed batch belongs to one of the 8 tasks (interleaved).

Rows, each one forward pass of the batch (eval, inference mode, fp32, 1 thread by default):
- base: the plain transformers model (no deltatune at all) — what the overhead is measured against;
- ia3 merged: one task folded into the weights; ia3 one task: one task unmerged (hooks);
- ia3 mixed, 8 tasks: `model(**batch, tasks=[...])`, each row its own task's vectors;
- lora mixed, 8 tasks (r=8, W_q, W_v): the same 8-task batch through LoRA's batched matmuls, for scale.

The variants run interleaved (one forward of each per round, the order rotating every round) because the
machine is shared; medians over the rounds are quoted, of wall time and of this process's CPU time. Before
timing, every mixed batch is checked against each example run alone after `use(task)`.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import transformers  # noqa: E402
from mixed_batch import interleaved_times, largest_difference, sentences, with_tasks  # noqa: E402

import deltatune  # noqa: E402
from deltatune.models import load_model, load_tokenizer  # noqa: E402

TASKS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=30, help="interleaved rounds (medians are quoted)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time = the work's cost)")
    parser.add_argument("--batches", default="16,32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, deltatune {deltatune.__version__}, "
          f"{args.threads} thread(s), {platform.machine()}, load average {os.getloadavg()[0]:.2f} at start")

    names = [f"task{i}" for i in range(TASKS)]
    tokenizer = load_tokenizer("minilm")
    base = load_model("minilm", "classification").eval()
    ia3 = with_tasks(deltatune.IA3(), names, scale=0.1)
    merged = copy.deepcopy(ia3).use(names[0]).merge()
    lora = with_tasks(deltatune.LoRA(r=8, alpha=16), names, scale=0.1)
    print(f"(IA)³ parameters per task (without the head): "
          f"{ia3.report(names[0], print_table=False).method_parameters:,}")

    for size in [int(b) for b in args.batches.split(",")]:
        batch = dict(tokenizer(sentences(size), padding=True, return_tensors="pt"))
        tasks = [names[i % TASKS] for i in range(size)]
        checks = {label: largest_difference(model, batch, tasks) for label, model in [("ia3", ia3), ("lora", lora)]}
        print(f"\nbatch {size}, padded to {batch['input_ids'].shape[1]} tokens; mixed vs each example alone, max "
              f"|logit difference|: " + ", ".join(f"{k} {v:.1e}" for k, v in checks.items()))
        ia3.use(names[0])
        variants: dict[str, Callable] = {
            "base (plain transformers model)": lambda batch=batch: base(**batch).logits,
            "ia3: one task merged": lambda batch=batch: merged(**batch).logits,
            "ia3: one task (hooks)": lambda batch=batch: ia3(**batch).logits,
            "ia3: mixed, 8 tasks": lambda batch=batch, tasks=tasks: ia3(**batch, tasks=tasks).logits,
            "lora: mixed, 8 tasks": lambda batch=batch, tasks=tasks: lora(**batch, tasks=tasks).logits,
        }
        wall, cpu = interleaved_times(variants, args.reps)
        for label, times in (("wall", wall), ("cpu", cpu)):
            median = {name: statistics.median(values) for name, values in times.items()}
            reference = median["base (plain transformers model)"]
            print(f"{label + ' time, batch ' + str(size):<34} {'ms/batch':>9} {'vs base':>8}  IQR ms")
            for name in variants:
                low, _, high = statistics.quantiles(times[name], n=4)
                print(f"{name:<34} {1e3 * median[name]:>9.2f} {median[name] / reference - 1:>+8.1%}  "
                      f"{1e3 * low:.1f}-{1e3 * high:.1f}")
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
