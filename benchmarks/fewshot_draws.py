"""How much the choice of k demonstrations moves few-shot SST-2 accuracy, and whether training data predicts it.

    python benchmarks/fewshot_draws.py [--draws 16] [--shots 4] [--held-out 256] [--out runs/fewshot-draws]

SmolLM2-135M, label-word scoring (`deltatune.fewshot`), SST-2. For each seeded draw of `--shots` balanced
demonstrations (seeds 0..draws-1, `select_demonstrations`): accuracy, raw and contextually calibrated, on
`--held-out` training examples that are in no draw (balanced, fixed seed) and on the 872 GLUE dev sentences.
Prints one line per draw, the Pearson correlation between held-out and dev accuracy, and what picking the
best of 8 draws by held-out accuracy gives on dev (all 8-subsets of the draws, exactly). Scores are saved
to `--out/scores.json` after each draw. This is the evidence behind `select_from` in `evaluate_fewshot`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

from deltatune.fewshot import (
    calibrate,
    example_key,
    label_words_for,
    score_labels,
    select_demonstrations,
    template_for,
)
from deltatune.models import load_model, load_tokenizer
from deltatune.tasks import get_task


def accuracy(scores: torch.Tensor, labels: torch.Tensor, calibrated: bool) -> float:
    examples, content_free = scores[: len(labels)], scores[len(labels) :]
    predictions = calibrate(examples, content_free) if calibrated else examples
    return (predictions.argmax(dim=-1) == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--held-out", type=int, default=256)
    parser.add_argument("--subset", type=int, default=8, help="best-of-N selection simulated over the draws")
    parser.add_argument("--out", default="runs/fewshot-draws")
    parser.add_argument("--data-dir", default=os.environ.get("DELTATUNE_DATA", "../shared/data"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    task = get_task("sst2")
    dev, pool = task.load("dev", data_dir=args.data_dir), task.load("train", data_dir=args.data_dir)
    template = template_for(task)
    words = label_words_for(task, template)
    model, tokenizer = load_model("smollm2", "causal-lm"), load_tokenizer("smollm2")
    draws = [select_demonstrations(pool, args.shots, seed) for seed in range(args.draws)]
    used = {example_key(d) for draw in draws for d in draw}
    order = [i for i in range(len(pool)) if example_key(pool[i]) not in used]
    random.Random(12345).shuffle(order)
    per_label = args.held_out // 2
    held = [pool[i] for i in order if pool[i]["label"] == 0][:per_label]
    held += [pool[i] for i in order if pool[i]["label"] == 1][:per_label]
    content_free = template.content_free_queries()
    held_labels = torch.tensor([h["label"] for h in held])
    dev_labels = torch.tensor([d["label"] for d in dev])
    print(f"SmolLM2-135M, SST-2, {args.shots}-shot, {args.draws} draws; held-out: {len(held)} train examples; "
          f"dev: {len(dev)}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows, saved = [], {"held": [[h["text"], h["label"]] for h in held], "draws": {}}
    for seed, draw in enumerate(draws):
        started = time.perf_counter()
        prefix = template.build_prefix(draw, words)
        held_scores = score_labels(model, tokenizer, prefix, [template.format_query(h) for h in held] + content_free,
                                   words)
        dev_scores = score_labels(model, tokenizer, prefix, [template.format_query(d) for d in dev] + content_free,
                                  words)
        row = {"seed": seed, "labels": [d["label"] for d in draw]}
        for mode, calibrated in (("raw", False), ("cal", True)):
            row[f"held_{mode}"] = accuracy(held_scores, held_labels, calibrated)
            row[f"dev_{mode}"] = accuracy(dev_scores, dev_labels, calibrated)
        rows.append(row)
        print(f"draw {seed:>2} labels {row['labels']}: held-out raw {row['held_raw']:.3f} cal {row['held_cal']:.3f} | "
              f"dev raw {row['dev_raw']:.3f} cal {row['dev_cal']:.3f}  ({time.perf_counter() - started:.0f} s)",
              flush=True)
        saved["draws"][seed] = {"demonstrations": [[d["text"], d["label"]] for d in draw],
                                "held": held_scores.tolist(), "dev": dev_scores.tolist()}
        (out / "scores.json").write_text(json.dumps(saved))

    for mode in ("raw", "cal"):
        held_acc, dev_acc = [r[f"held_{mode}"] for r in rows], [r[f"dev_{mode}"] for r in rows]
        print(f"\n{mode}: dev accuracy over draws {statistics.mean(dev_acc):.2%} ± {statistics.stdev(dev_acc):.2%} "
              f"(min {min(dev_acc):.2%}, max {max(dev_acc):.2%}); Pearson r(held-out, dev) = "
              f"{statistics.correlation(held_acc, dev_acc):.3f}")
        if len(rows) >= args.subset:
            picked = [max(subset, key=lambda r: r[f"held_{mode}"])[f"dev_{mode}"]
                      for subset in itertools.combinations(rows, args.subset)]
            reached = statistics.mean(p >= 0.83 for p in picked)
            print(f"  best of {args.subset} draws by held-out accuracy, over all {len(picked)} subsets: dev "
                  f"{statistics.mean(picked):.2%} on average, >= 83% in {reached:.0%}")


if __name__ == "__main__":
    main()
