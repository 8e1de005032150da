"""Training speed of SmolLM2-135M + LoRA on E2E (examples/s), one training step after another, for
several ways of computing the causal-LM loss on the same batches.

    OMP_NUM_THREADS=1 python benchmarks/e2e_train_speed.py [--modes full,targets] [--steps 20]
                                                           [--batch-size 8] [--out runs/e2e-speed.json]

Each mode trains its own copy of the same LoRA model (r=8, alpha=16 on q_proj/v_proj, AdamW lr 1e-3)
on the same batches (the first `--steps` batches of epoch 0 of the local E2E train split, length-bucketed
as `deltatune train` batches them); the modes take turns step by step, so that a change in the machine's
load hits them alike. A step = forward, backward, optimizer step. Reported: the median step time ->
examples/s, and each mode's losses (equal losses = the same computation).

Modes:
- full:    logits at every position, then the loss on the target positions (`task_loss`; what
           `deltatune train` did before the target-only loss);
- targets: hidden states gathered at the target positions first, LM head + cross-entropy on those only
           (`deltatune.core.lm_loss`);
- targets-eager: as targets, with attention as plain matrix products instead of PyTorch's CPU flash-attention
           kernel (`deltatune.training.loop.use_eager_attention`): what `deltatune train` does on a CPU now.
The first two use transformers' default attention (sdpa), as `deltatune train` did before.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import deltatune
from deltatune.evaluate import task_loss
from deltatune.models import load_model, load_tokenizer
from deltatune.tasks import get_task
from deltatune.tasks.encoding import collate, encode, epoch_batches
from deltatune.training.loop import resolve_precision


def full_loss(model, task, batch, labels):
    return task_loss(task, model(**batch), labels)


def targets_loss(model, task, batch, labels):
    return model(**batch, target_labels=labels)


# mode -> (loss, attention implementation)
MODES = {"full": (full_loss, "sdpa"), "targets": (targets_loss, "sdpa"), "targets-eager": (targets_loss, "eager")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="full,targets,targets-eager")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-limit", type=int, default=2000)
    parser.add_argument("--precision", default="auto", help="fp32 | bf16 | auto (as deltatune train)")
    parser.add_argument("--out", default="runs/e2e-speed.json")
    parser.add_argument("--data-dir", default=os.environ.get("DELTATUNE_DATA", "../shared/data"))
    args = parser.parse_args()

    torch.manual_seed(0)
    modes = args.modes.split(",")
    precision = resolve_precision(args.precision)
    task = get_task("e2e")
    tokenizer = load_tokenizer("smollm2")
    items = encode(task, task.load("train", args.data_dir, limit=args.train_limit), tokenizer, 128)
    order = epoch_batches(len(items), args.batch_size, seed=0, epoch=0, lengths=[len(i.input_ids) for i in items])
    batches = order[: args.warmup + args.steps]
    base = deltatune.attach(load_model("smollm2", "causal-lm"), deltatune.LoRA(r=8, alpha=16), task="e2e")
    models = {mode: copy.deepcopy(base) for mode in modes}
    for mode, model in models.items():
        model.base_model.set_attn_implementation(MODES[mode][1])
    optimizers = {mode: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
                  for mode, m in models.items()}
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    losses: dict[str, list[float]] = {mode: [] for mode in modes}
    tokens = padded = 0
    for step, indices in enumerate(batches):
        batch = collate([items[i] for i in indices], tokenizer.pad_token_id)
        labels = batch.pop("labels")
        if step >= args.warmup:
            tokens += int(batch["attention_mask"].sum())
            padded += batch["attention_mask"].numel()
        for mode in modes:
            model, optimizer = models[mode], optimizers[mode]
            model.train()
            started = time.perf_counter()
            with autocast():
                loss = MODES[mode][0](model, task, batch, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - started
            if step >= args.warmup:
                seconds[mode].append(elapsed)
                losses[mode].append(loss.item())
        print(f"step {step}: " + "  ".join(f"{m} {seconds[m][-1] if seconds[m] else 0:.2f}s" for m in modes),
              flush=True)

    result = {
        "command": "python benchmarks/e2e_train_speed.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "data_dir"),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "threads": torch.get_num_threads(), "precision": precision, "batch_size": args.batch_size,
        "steps": args.steps, "real_token_share": round(tokens / max(padded, 1), 4),
        "modes": {mode: {"median_step_s": round(statistics.median(seconds[mode]), 4),
                         "examples_per_s": round(args.batch_size / statistics.median(seconds[mode]), 3),
                         "mean_loss": round(statistics.fmean(losses[mode]), 6),
                         "losses": [round(x, 6) for x in losses[mode]]} for mode in modes},
    }
    first = modes[0]
    for mode in modes[1:]:
        result["modes"][mode]["speedup_vs_" + first] = round(
            statistics.median(seconds[first]) / statistics.median(seconds[mode]), 3)
        result["modes"][mode]["max_loss_difference_vs_" + first] = max(
            abs(a - b) for a, b in zip(losses[first], losses[mode], strict=True))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "modes"}, indent=2))
    for mode, row in result["modes"].items():
        print(mode, {k: v for k, v in row.items() if k != "losses"})


if __name__ == "__main__":
    main()
