"""Few-shot SST-2 with SmolLM2-135M: the shared-prefix KV cache against the naive loop, in one run.

    python benchmarks/fewshot_speed.py                  # GLUE dev, all 872 sentences (several minutes)
    python benchmarks/fewshot_speed.py --limit 64       # a quick check
    python benchmarks/fewshot_speed.py --naive-limit 200  # naive loop on a subset, full time extrapolated

Prints zero-shot and 4-shot accuracy (raw and calibrated) of the prefix-cache path, and the 4-shot naive
loop (one example per forward pass, demonstrations re-encoded every time, as the 262 s baseline in
shared/reference/performance-notes.md). The 4-shot runs of both paths alternate chunk by chunk over the
same examples, so that load from other processes on the shared CPU falls on both alike.
Needs ``$DELTATUNE_DATA`` (or ``--data-dir``) pointing at the folder with ``glue/sst2``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time

import torch

from deltatune.models import load_model, load_tokenizer
from deltatune.prompting.demonstrations import select_demonstrations
from deltatune.prompting.fewshot import evaluate_fewshot, label_words_for, template_for
from deltatune.tasks import get_task

TARGETS = {"zero-shot accuracy": 0.78, "4-shot accuracy": 0.83, "4-shot speed-up": 3.0}


def sliced_task(task, start: int, stop: int, train: list[dict], dev: list[dict]):
    """The task with its dev split cut to ``[start, stop)``; both splits read once and reused."""
    return dataclasses.replace(task, loader=lambda split, _: train if split == "train" else dev[start:stop])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, default=None, help="first N dev sentences (default: all 872)")
    parser.add_argument(
        "--naive-limit", type=int, default=None, help="naive loop on N of them (default: all)"
    )
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--chunks", type=int, default=8, help="alternate the two 4-shot paths over N chunks")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    started = time.perf_counter()
    model, tokenizer = load_model("smollm2", "causal-lm"), load_tokenizer("smollm2")
    load_seconds = time.perf_counter() - started
    task = get_task("sst2")
    dev = task.load("dev", data_dir=args.data_dir, limit=args.limit)
    train = task.load("train", data_dir=args.data_dir)
    n, naive_n = len(dev), min(args.naive_limit or len(dev), len(dev))
    words = label_words_for(task, template_for(task))
    print(f"SmolLM2-135M-Instruct (fp32), SST-2 GLUE dev: {n} sentences, label words {words}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f}, model load {load_seconds:.1f} s"
    )
    demonstrations = select_demonstrations(train, args.shots, seed=0)  # what evaluate_fewshot shares
    print(
        f"{args.shots} demonstrations (seed 0, balanced): "
        + " | ".join(f"{d['text'].strip()!r} -> {words[d['label']].strip()}" for d in demonstrations)
    )

    zero = evaluate_fewshot(
        model, tokenizer, sliced_task(task, 0, n, train, dev), shots=0, batch_size=args.batch_size,
        calibration_inputs=0,
    )

    # 4-shot: per chunk, the prefix-cache path on all of it, then the naive loop on its first part.
    cached = {"seconds": 0.0, "raw": 0.0, "calibrated": 0.0, "seconds_on_naive_part": 0.0}
    naive = {"seconds": 0.0, "raw": 0.0, "calibrated": 0.0, "examples": 0}
    agree = True
    size = math.ceil(n / args.chunks)
    for start in range(0, n, size):
        stop = min(start + size, n)
        middle = start + math.ceil((stop - start) * naive_n / n)
        for part_start, part_stop in ((start, middle), (middle, stop)):
            if part_stop <= part_start:
                continue
            part = sliced_task(task, part_start, part_stop, train, dev)
            # calibration_inputs=0: time the dev sentences only (batch calibration would add 256 rows per chunk)
            result = evaluate_fewshot(model, tokenizer, part, shots=args.shots, batch_size=args.batch_size,
                                      calibration_inputs=0)
            count = part_stop - part_start
            cached["seconds"] += result["seconds"]
            cached["raw"] += result["accuracy"] * count
            cached["calibrated"] += result["calibrated_accuracy"] * count
            if part_start == start:
                cached["seconds_on_naive_part"] += result["seconds"]
                slow = evaluate_fewshot(
                    model, tokenizer, part, shots=args.shots, batch_size=1, use_cache_prefix=False,
                    calibration_inputs=0,
                )
                naive["seconds"] += slow["seconds"]
                naive["raw"] += slow["accuracy"] * count
                naive["calibrated"] += slow["calibrated_accuracy"] * count
                naive["examples"] += count
                agree &= (slow["accuracy"], slow["calibrated_accuracy"]) == (
                    result["accuracy"],
                    result["calibrated_accuracy"],
                )

    rows = [
        (
            f"prefix cache, batch {args.batch_size}",
            0,
            n,
            zero["accuracy"],
            zero["calibrated_accuracy"],
            zero["seconds"],
        ),
        (
            f"prefix cache, batch {args.batch_size}",
            args.shots,
            n,
            cached["raw"] / n,
            cached["calibrated"] / n,
            cached["seconds"],
        ),
        (
            "naive loop, batch 1",
            args.shots,
            naive["examples"],
            naive["raw"] / naive["examples"],
            naive["calibrated"] / naive["examples"],
            naive["seconds"],
        ),
    ]
    print(
        f"\n{'path':<24}{'shots':>6}{'examples':>10}{'accuracy':>10}{'calibrated':>12}{'seconds':>9}{'ms/ex':>8}"
    )
    for name, shots, count, raw, calibrated, seconds in rows:
        print(
            f"{name:<24}{shots:>6}{count:>10}{raw:>10.3f}{calibrated:>12.3f}{seconds:>9.1f}"
            f"{1000 * seconds / count:>8.0f}"
        )
    speedup = naive["seconds"] / cached["seconds_on_naive_part"]
    print(
        f"\n4-shot speed-up, naive loop / prefix cache on the same {naive['examples']} sentences "
        f"(alternating in {math.ceil(n / size)} chunks): {speedup:.1f}x"
    )
    print(f"naive and prefix-cache accuracies identical on those sentences: {'yes' if agree else 'NO'}")
    if naive["examples"] < n:
        print(
            f"EXTRAPOLATED (not measured): naive loop on all {n} sentences would take about "
            f"{naive['seconds'] * n / naive['examples']:.0f} s"
        )
    print(
        f"load average at the end {os.getloadavg()[0]:.2f}; "
        f"total wall time {time.perf_counter() - started:.0f} s"
    )
    measured = {
        "zero-shot accuracy": zero["accuracy"],
        "4-shot accuracy": cached["raw"] / n,
        "4-shot speed-up": speedup,
    }
    print(
        "targets (raw accuracy): "
        + "; ".join(
            f"{name} {measured[name]:.3f} >= {goal}: {'met' if measured[name] >= goal else 'MISSED'}"
            for name, goal in TARGETS.items()
        )
    )


if __name__ == "__main__":
    main()
