"""LoRA vs DoRA vs (IA)³ on MiniLM SST-2 at `deltatune compare`'s budget: dev accuracy, step time, parameters.

    python benchmarks/dora_ia3_sst2.py                       # 1 seed, at most 12 minutes of training
    python benchmarks/dora_ia3_sst2.py --seeds 0,1,2 --minutes 60

compare's SST-2 settings (compare.TASK_SETTINGS: 300 steps of 32 sentences, max length 64) and training
loop settings (train._optimizer: AdamW, weight decay 0.01 off biases and norms, 6% linear warmup then linear
decay, gradients clipped at 1.0), each method's registry learning rate (LoRA 5e-4, DoRA 5e-4, (IA)³ 3e-3),
r=8, alpha=16 on W_q, W_v for LoRA and DoRA; (IA)³ on keys, values and the FFN input. A new head each.

The three methods train in lockstep: each round takes the next batch of the (seeded) shuffled training set
— the same for all three — and runs one step of each, the order rotating, so their step times see the same
machine load. Step times are this process's CPU time (1 thread: what the step cost, whatever else runs on
the machine) and wall time; medians over the steps after the first 5. Training stops at --steps or when
--minutes of training time is spent (the steps reached are printed: a shorter run is not the compare
budget). Then each model is scored on the 872 dev sentences.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import transformers  # noqa: E402
from new_methods_sst2 import DATA, accuracy, batches, read_tsv  # noqa: E402

import deltatune  # noqa: E402
from deltatune.methods.registry import METHODS  # noqa: E402
from deltatune.models import load_model, load_tokenizer  # noqa: E402
from deltatune.training.loop import _optimizer  # noqa: E402

CONFIGS = {"lora": deltatune.LoRA(r=8, alpha=16), "dora": deltatune.DoRA(r=8, alpha=16), "ia3": deltatune.IA3()}


def run_seed(seed: int, args, tokenizer, train_rows, dev_rows) -> dict[str, dict]:
    rows = list(train_rows)
    random.Random(seed).shuffle(rows)
    models, optimizers = {}, {}
    for name, config in CONFIGS.items():
        torch.manual_seed(seed)  # the same new head for every method
        model = deltatune.attach(load_model("minilm", "classification", num_labels=2), config, task="sst2").train()
        _, optimizer, scheduler = _optimizer(model, METHODS[name].default_lr, 0.01, 0.06, args.steps)
        models[name], optimizers[name] = model, (optimizer, scheduler)
    cpu = {name: [] for name in CONFIGS}
    wall = {name: [] for name in CONFIGS}
    losses = {name: [] for name in CONFIGS}
    order = list(CONFIGS)
    started = time.perf_counter()
    step = 0
    data = batches(rows, tokenizer, args.batch, args.max_length)  # 67,349 sentences: 2,100 batches
    for step, (inputs, labels) in enumerate(data, 1):
        shift = step % len(order)
        for name in order[shift:] + order[:shift]:
            model, (optimizer, scheduler) = models[name], optimizers[name]
            start, start_cpu = time.perf_counter(), time.process_time()
            loss = F.cross_entropy(model(**inputs).logits, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
            losses[name].append(loss.item())
        if step % 25 == 0:
            print(f"  seed {seed} step {step}: " + ", ".join(
                f"{n} loss {statistics.fmean(losses[n][-25:]):.3f}" for n in CONFIGS), flush=True)
        if step >= args.steps or time.perf_counter() - started > 60 * args.minutes:
            break
    results = {}
    for name, model in models.items():
        report = model.report(print_table=False)
        results[name] = {
            "steps": step, "accuracy": accuracy(model, dev_rows, tokenizer, args.max_length),
            "cpu": statistics.median(cpu[name][5:] or cpu[name]),
            "wall": statistics.median(wall[name][5:] or wall[name]),
            "method_parameters": report.method_parameters, "trainable": report.trainable, "percent": report.percent,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--minutes", type=float, default=12.0, help="training time bound per seed")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, deltatune {deltatune.__version__}, "
          f"{args.threads} thread(s), {platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f} at start")
    tokenizer = load_tokenizer("minilm")
    train_rows, dev_rows = read_tsv(args.data / "train.tsv"), read_tsv(args.data / "dev.tsv")
    print(f"MiniLM on SST-2: {len(train_rows)} training sentences, {len(dev_rows)} dev; up to {args.steps} steps of "
          f"{args.batch}, max length {args.max_length}")
    per_seed = [run_seed(int(seed), args, tokenizer, train_rows, dev_rows) for seed in args.seeds.split(",")]
    print(f"\n{'method':<6} {'lr':>7} {'steps':>6} {'dev accuracy':>22} {'step cpu ms':>12} {'vs lora':>8} "
          f"{'step wall ms':>13} {'method params':>14} {'trainable':>10}")
    lora_cpu = statistics.fmean(r["lora"]["cpu"] for r in per_seed)
    for name in CONFIGS:
        rows = [r[name] for r in per_seed]
        accuracies = [100 * r["accuracy"] for r in rows]
        spread = f" ± {statistics.stdev(accuracies):.2f}" if len(rows) > 1 else ""
        shown = f"{statistics.fmean(accuracies):.2f}{spread} ({', '.join(f'{a:.2f}' for a in accuracies)})"
        step_cpu = statistics.fmean(r["cpu"] for r in rows)
        step_wall = statistics.fmean(r["wall"] for r in rows)
        print(f"{name:<6} {METHODS[name].default_lr:>7.0e} {'/'.join(str(r['steps']) for r in rows):>6} {shown:>22} "
              f"{1e3 * step_cpu:>12.0f} {step_cpu / lora_cpu:>7.2f}x {1e3 * step_wall:>13.0f} "
              f"{rows[0]['method_parameters']:>14,} {rows[0]['trainable']:>10,}")
    print(f"\nwall time {time.perf_counter() - began:.0f} s; load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
