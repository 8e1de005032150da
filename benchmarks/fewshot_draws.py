"""How much the choice of k demonstrations moves few-shot SST-2 accuracy, what calibration recovers, and
whether training data predicts it.

    python benchmarks/fewshot_draws.py [--draws 12] [--only 0-5] [--shots 4] [--held-out 256] [--unlabeled 256]
                                       [--out runs/fewshot-draws]
    python benchmarks/fewshot_draws.py --summarize runs/fewshot-draws/0-5 runs/fewshot-draws/6-11

SmolLM2-135M, label-word scoring (`deltatune.prompting.fewshot`), SST-2. For each seeded draw of `--shots` balanced
demonstrations (seeds 0..draws-1, `select_demonstrations`), dev accuracy (872 GLUE sentences) four ways:
raw; contextual calibration (Zhao et al. 2021, content-free inputs); batch calibration (Zhou et al. 2024)
with the mean label probabilities taken over `--unlabeled` training inputs (a seeded random sample, labels
unused: what `evaluate_fewshot` does); and batch calibration over the dev inputs themselves (the paper's
transductive variant, for reference). Also raw/contextual accuracy on `--held-out` labelled training
examples (balanced), the Pearson correlation between held-out and dev accuracy, and what picking the best
of 8 draws by held-out accuracy gives on dev (all 8-subsets of the draws, exactly). The held-out and
unlabeled samples depend on all `--draws` draws (none of their examples), so `--only` ranges run as
separate jobs score the same sets; each saves `--out/<range>/scores.json` after every draw.
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

from deltatune.prompting.calibration import calibrate
from deltatune.prompting.demonstrations import example_key, select_demonstrations
from deltatune.prompting.fewshot import label_words_for, template_for
from deltatune.prompting.prefix_cache import score_labels

MODES = ("raw", "contextual", "batch_train", "batch_dev")


def predictions(scores: torch.Tensor, n: int, content_free: int, mode: str, dev_batch: torch.Tensor | None = None):
    examples = scores[:n]
    if mode == "raw":
        return examples.argmax(dim=-1)
    if mode == "contextual":
        return calibrate(examples, scores[n : n + content_free]).argmax(dim=-1)
    if mode == "batch_train":
        return calibrate(examples, scores[n + content_free :]).argmax(dim=-1)
    return calibrate(examples, examples if dev_batch is None else dev_batch).argmax(dim=-1)


def accuracy(predicted: torch.Tensor, labels: list[int]) -> float:
    return (predicted == torch.tensor(labels)).float().mean().item()


def score(args: argparse.Namespace) -> None:
    from deltatune.models import load_model, load_tokenizer
    from deltatune.tasks import get_task

    first, last = (int(x) for x in (args.only or f"0-{args.draws - 1}").split("-"))
    out = Path(args.out) / f"{first}-{last}"
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
    held_keys = {example_key(h) for h in held}
    unlabeled = [pool[i]["text"] for i in order if example_key(pool[i]) not in held_keys][-args.unlabeled :]
    content_free = template.content_free_queries()
    print(f"SmolLM2-135M, SST-2, {args.shots}-shot, draws {first}-{last} of {args.draws}; held-out: {len(held)} "
          f"labelled train examples; unlabeled: {len(unlabeled)} train inputs; dev: {len(dev)}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    saved = {"shots": args.shots, "draws_total": args.draws, "held_out": args.held_out,
             "held_labels": [h["label"] for h in held], "dev_labels": [d["label"] for d in dev],
             "content_free": len(content_free), "unlabeled": len(unlabeled), "draws": {}}
    for seed in range(first, last + 1):
        started = time.perf_counter()
        prefix = template.build_prefix(draws[seed], words)
        held_scores = score_labels(model, tokenizer, prefix, [template.format_query(h) for h in held] + content_free,
                                   words)
        unlabeled_queries = [template.format_query({"text": u}) for u in unlabeled]
        dev_queries = [template.format_query(d) for d in dev] + content_free + unlabeled_queries
        dev_scores = score_labels(model, tokenizer, prefix, dev_queries, words)
        saved["draws"][seed] = {"demonstrations": [[d["text"], d["label"]] for d in draws[seed]],
                                "held": held_scores.tolist(), "dev": dev_scores.tolist()}
        (out / "scores.json.tmp").write_text(json.dumps(saved))
        os.replace(out / "scores.json.tmp", out / "scores.json")
        row = draw_row(saved, seed)
        print(f"draw {seed:>2} labels {row['labels']}: held-out raw {row['held_raw']:.3f} "
              f"cal {row['held_contextual']:.3f} | dev " + " ".join(f"{m} {row[m]:.3f}" for m in MODES)
              + f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def draw_row(saved: dict, seed) -> dict:
    draw = saved["draws"][seed]
    n_dev, n_held, cf = len(saved["dev_labels"]), len(saved["held_labels"]), saved["content_free"]
    dev_scores, held_scores = torch.tensor(draw["dev"]), torch.tensor(draw["held"])
    row = {"seed": int(seed), "labels": [label for _, label in draw["demonstrations"]]}
    for mode in MODES:
        row[mode] = accuracy(predictions(dev_scores, n_dev, cf, mode), saved["dev_labels"])
    for mode in ("raw", "contextual"):
        row[f"held_{mode}"] = accuracy(predictions(held_scores, n_held, cf, mode), saved["held_labels"])
    return row


SETTINGS = ("shots", "draws_total", "held_out", "unlabeled", "content_free")  # what makes two ranges comparable


def summarize(paths: list[str], subset: int) -> None:
    """One table over the draws saved in `paths`, which must all have been scored under the same settings
    (the held-out and unlabeled samples depend on them): a range with other settings is refused, not mixed in."""
    rows, first = [], None
    for path in paths:
        saved = json.loads((Path(path) / "scores.json").read_text())
        settings = {key: saved.get(key) for key in SETTINGS} | {"dev": len(saved["dev_labels"]),
                                                                 "held": len(saved["held_labels"])}
        if first is None:
            first = (path, settings)
        elif settings != first[1]:
            raise SystemExit(f"{path} was scored with {settings}, {first[0]} with {first[1]}: summarize ranges "
                             f"scored with the same --draws, --shots, --held-out and --unlabeled only")
        rows += [draw_row(saved, seed) for seed in saved["draws"]]
    rows.sort(key=lambda r: r["seed"])
    print("| draw | labels in order | held-out raw | held-out contextual | dev raw | dev contextual "
          "| dev batch (train inputs) | dev batch (dev inputs) |\n|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seed']} | {r['labels']} | {100 * r['held_raw']:.2f} | {100 * r['held_contextual']:.2f} | "
              + " | ".join(f"{100 * r[m]:.2f}" for m in MODES) + " |")
    print()
    for mode in MODES:
        dev_acc = [r[mode] for r in rows]
        spread = f" ± {statistics.stdev(dev_acc):.2%}" if len(rows) > 1 else ""  # one draw: no spread
        line = (f"{mode:>11}: dev over {len(rows)} draw(s) {statistics.mean(dev_acc):.2%}{spread} "
                f"(min {min(dev_acc):.2%}, max {max(dev_acc):.2%}), >= 83% in {sum(a >= 0.83 for a in dev_acc)}")
        if mode in ("raw", "contextual") and len(rows) > 1:
            held_acc = [r[f"held_{mode}"] for r in rows]
            line += f"; Pearson r(held-out, dev) = {statistics.correlation(held_acc, dev_acc):.3f}"
            if len(rows) >= subset:
                picked = [max(s, key=lambda r: r[f"held_{mode}"])[mode] for s in itertools.combinations(rows, subset)]
                line += (f"; best of {subset} by held-out: {statistics.mean(picked):.2%} on average, >= 83% in "
                         f"{statistics.mean(p >= 0.83 for p in picked):.0%} of {len(picked)} subsets")
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=12)
    parser.add_argument("--only", help="score only draws FIRST-LAST (inclusive), e.g. 0-5")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--held-out", type=int, default=256)
    parser.add_argument("--unlabeled", type=int, default=256, help="training inputs for batch calibration")
    parser.add_argument("--subset", type=int, default=8, help="best-of-N selection simulated over the draws")
    parser.add_argument("--out", default="runs/fewshot-draws")
    parser.add_argument("--summarize", nargs="+", metavar="DIR", help="print the tables from saved scores only")
    parser.add_argument("--data-dir", default=os.environ.get("DELTATUNE_DATA", "../shared/data"))
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize, args.subset)
    else:
        score(args)
        summarize([str(Path(args.out) / (args.only or f"0-{args.draws - 1}"))], args.subset)


if __name__ == "__main__":
    main()
