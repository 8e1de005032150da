"""The E2E faithfulness measurement of issue 36: SFT LoRA vs SFT + DPO, slot error rate beside BLEU.

    # 1. the preference pairs (seeded): the local E2E train split's references after the SFT's first 2,000
    python benchmarks/dpo_e2e.py pairs --out runs/dpo-e2e/pairs.jsonl --dev-out runs/dpo-e2e/pairs-dev.jsonl
    # 2. train (deltatune train --objective dpo --reference SFT/delta ...) and eval each delta on the 630 test
    #    MRs (deltatune eval --task e2e --split test --out DIR), then:
    python benchmarks/dpo_e2e.py table --run "SFT seed 0=DIR" --run "SFT+DPO seed 0=DIR" ... [--changed A B]

Pairs (`deltatune.tasks.e2e_pairs.preference_pairs`): prompt = the E2E prompt the SFT delta was trained on,
chosen = a human reference, rejected = the same reference with one slot value swapped for another value of the
same slot (a familyFriendly yes/no by adding or dropping the negation), kept only where the slot checker finds
no error in the chosen and exactly one wrong slot in the rejected. `table` prints each run's E2E metrics (from
`deltatune eval`'s printed JSON, saved as eval.json) with SER's missing / wrong / added (and contradicted) counts
recomputed from its predictions.jsonl, and `--changed A B` lists a seeded sample of the test MRs whose output
changed from A to B, with their slot errors.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

from deltatune.tasks import get_task
from deltatune.tasks.e2e_pairs import preference_pairs
from deltatune.tasks.e2e_slots import slot_error_rate, slot_errors

SFT_TRAIN_LIMIT = 2000  # the SFT deltas trained on the first 2,000 train references (--train-limit 2000)
COUNTS = ("missing", "wrong", "added", "slots", "contradicted")
COLUMNS = [("bleu", "BLEU", 100, 1), ("nist", "NIST", 1, 2), ("meteor", "METEOR", 100, 1),
           ("rouge_l", "ROUGE-L", 100, 1), ("cider", "CIDEr", 1, 2), ("ser", "SER %", 100, 2)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    temporary.replace(path)


def cmd_pairs(args: argparse.Namespace) -> None:
    examples = get_task("e2e").load("train", args.data_dir)[SFT_TRAIN_LIMIT:]  # references the SFT never saw
    pairs = preference_pairs(examples, args.count + args.dev_count, args.seed)
    if len(pairs) < args.count + args.dev_count:
        raise SystemExit(f"only {len(pairs)} pairs could be built from {len(examples)} references")
    write_jsonl(Path(args.out), pairs[: args.count])
    write_jsonl(Path(args.dev_out), pairs[args.count :])
    swapped: dict[str, int] = {}
    for pair in pairs:
        slot = pair["swap"].split(":")[0]
        swapped[slot] = swapped.get(slot, 0) + 1
    print(json.dumps({"references": len(examples), "train_pairs": args.count, "dev_pairs": args.dev_count,
                      "swapped_slots": swapped, "example": pairs[0]}, indent=2, ensure_ascii=False))


def run_scores(folder: Path) -> dict:
    """A run's E2E metrics (eval.json) and SER counts from its predictions."""
    printed = json.loads((folder / "eval.json").read_text())["test"]
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    counts = slot_error_rate([r["source"] for r in rows], [r["prediction"] for r in rows])
    assert abs(counts["ser"] - printed["ser"]) < 1e-12, "eval.json's SER is not its predictions' SER"
    return {**printed, **{k: counts[k] for k in COUNTS}, "rows": rows}


def cmd_table(args: argparse.Namespace) -> None:
    runs = {label: run_scores(Path(folder)) for label, folder in (item.split("=", 1) for item in args.run)}
    lines = ["| run | " + " | ".join(title for _, title, _, _ in COLUMNS)
             + " | missing | wrong | added | MR slots | contradicted (not in SER) |",
             "|---|" + "---:|" * (len(COLUMNS) + len(COUNTS))]
    for label, scores in runs.items():
        cells = [f"{scores[key] * scale:.{digits}f}" for key, _, scale, digits in COLUMNS]
        counts = [f"{scores[key]:.0f}" for key in COUNTS]
        lines.append(f"| {label} | " + " | ".join(cells + counts) + " |")
    for group in args.mean or []:  # "NAME=label1,label2": the mean of those runs
        name, labels = group.split("=", 1)
        members = [runs[label] for label in labels.split(",")]
        cells = [f"{statistics.fmean(m[key] for m in members) * scale:.{digits}f}" for key, _, scale, digits in COLUMNS]
        counts = [f"{statistics.fmean(m[key] for m in members):.1f}" for key in COUNTS]
        lines.append(f"| **{name}** | " + " | ".join(cells + counts) + " |")
    print("\n".join(lines))
    if args.changed:
        before, after = (runs[label]["rows"] for label in args.changed)
        changed = [(a, b) for a, b in zip(before, after, strict=True) if a["prediction"] != b["prediction"]]
        print(f"\n{len(changed)} of {len(before)} outputs changed from {args.changed[0]} to {args.changed[1]}")
        for a, b in random.Random(0).sample(changed, min(args.examples, len(changed))):  # a seeded sample
            ea, eb = slot_errors(a["source"], a["prediction"]), slot_errors(b["source"], b["prediction"])
            print(f"\n- MR: {a['source']}\n  {args.changed[0]} ({describe(ea)}): {a['prediction']}\n"
                  f"  {args.changed[1]} ({describe(eb)}): {b['prediction']}")


def describe(errors) -> str:
    parts = [f"{kind} {', '.join(getattr(errors, kind))}" for kind in ("missing", "wrong", "added", "contradicted")
             if getattr(errors, kind)]
    return "; ".join(parts) or "no slot error"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pairs = commands.add_parser("pairs", help="write the seeded preference pairs")
    pairs.add_argument("--out", required=True)
    pairs.add_argument("--dev-out", required=True)
    pairs.add_argument("--count", type=int, default=320)
    pairs.add_argument("--dev-count", type=int, default=48)
    pairs.add_argument("--seed", type=int, default=0)
    pairs.add_argument("--data-dir", default=None)
    table = commands.add_parser("table", help="the SFT vs SFT + DPO table from eval outputs")
    table.add_argument("--run", action="append", required=True, help="LABEL=FOLDER (eval.json, predictions.jsonl)")
    table.add_argument("--mean", action="append", help="NAME=LABEL,LABEL: a row with the mean of those runs")
    table.add_argument("--changed", nargs=2, metavar=("A", "B"), help="list outputs that changed from run A to B")
    table.add_argument("--examples", type=int, default=12)
    args = parser.parse_args()
    cmd_pairs(args) if args.command == "pairs" else cmd_table(args)


if __name__ == "__main__":
    main()
