"""E2E NLG: restaurant meaning representations (MRs) -> one-sentence descriptions, several references each.

Local files (``--data-dir`` / ``$DELTATUNE_DATA``): ``e2e/devset.csv`` and ``e2e/testset_w_refs.csv``,
CSV with header ``mr,ref`` and one row per reference. The official train set (42k references) is not
among them, so locally:

- "train" = the dev-set MRs minus a held-out 10%, one example per reference;
- "dev"   = that fixed seeded 10% of dev-set MRs (grouped by MR, so no MR is in both), for model selection;
- "test"  = the official test set (630 MRs), scored against all references of each MR.

From the dataset hub (``tuetschek/e2e_nlg``, the same official data) "train", "dev" and "test" are the
official train, validation and test sets.
"""

from __future__ import annotations

import csv
from pathlib import Path

from deltatune.tasks.sources import hub_split, local_data_root, local_file, read_table, split_off_dev
from deltatune.tasks.task import Example, Task

HUB_DATASET = "tuetschek/e2e_nlg"
HUB_SPLIT_NAMES = {"train": "train", "dev": "validation", "test": "test"}
# The official scorer repairs these mis-encoded characters when it reads reference files.
ENCODING_FIXES = {"Ł": "£", "Â£": "£", "Ã©": "é", "ã©": "é"}


def clean_text(text: str) -> str:
    """Strip and repair text the way the official E2E scorer reads its files."""
    for broken, fixed in ENCODING_FIXES.items():
        text = text.replace(broken, fixed)
    return text.strip()


def group_by_source(pairs: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """``(mr, ref)`` rows -> ``(mr, [refs...])``, MRs in order of first appearance, refs in file order."""
    references_by_source: dict[str, list[str]] = {}
    for source, reference in pairs:
        references_by_source.setdefault(source, []).append(reference)
    return list(references_by_source.items())


def read_pairs(root: Path, file_name: str) -> list[tuple[str, str]]:
    table = read_table(local_file(root, f"e2e/{file_name}", "e2e"), delimiter=",", quoting=csv.QUOTE_MINIMAL)
    mr_index, ref_index = table.column("mr"), table.column("ref")
    return [(clean_text(fields[mr_index]), clean_text(fields[ref_index])) for _, fields in table.rows]


def read_hub_pairs(split: str) -> list[tuple[str, str]]:
    rows = hub_split("e2e", HUB_DATASET, None, HUB_SPLIT_NAMES[split])
    return [(clean_text(row["meaning_representation"]), clean_text(row["human_reference"])) for row in rows]


def load_e2e(split: str, data_dir: Path | None) -> list[Example]:
    """Train examples ``{"source", "target"}``; dev/test examples ``{"source", "references"}``."""
    root = local_data_root(data_dir)
    if root is None:
        grouped = group_by_source(read_hub_pairs(split))
    elif split == "test":
        grouped = group_by_source(read_pairs(root, "testset_w_refs.csv"))
    else:
        train, dev = split_off_dev(group_by_source(read_pairs(root, "devset.csv")), root / "e2e/devset.csv",
                                   dev_option=None)
        grouped = dev if split == "dev" else train
    if split == "train":
        return [{"source": source, "target": ref} for source, refs in grouped for ref in refs]
    return [{"source": source, "references": refs} for source, refs in grouped]


def e2e_task() -> Task:
    return Task(
        name="e2e",
        kind="generation",
        metric_names=["bleu", "nist", "meteor", "rouge_l", "cider", "ser"],  # ser: lower is better
        splits=("train", "dev", "test"),
        loader=load_e2e,
        description="E2E NLG restaurant data-to-text; scored like the official E2E script",
    )
