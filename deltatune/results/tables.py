"""The task x method table of `deltatune compare --tasks ...`, laid out like Hu et al. 2021, Tables 2 and 3.

Rows are methods (or `METHOD@NAME` variants) with their trainable parameters for this model; columns are
each task's metrics (MRPC accuracy and F1, STS-B Pearson and Spearman, CoLA Matthews, the others accuracy;
E2E its five text metrics), mean ± std over the seeds that finished (one seed: the value alone), the best
of each column in bold, and an Avg. column over the tasks' first metric (the one Hu et al. average).

Beside it: each task's majority-class score (the constant prediction's, from the evaluation labels) with
the cells at that level flagged, and a published table (`published_tables.json` beside this file, with its source)
with the orderings it claims that hold on this model and those that do not.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from importlib import resources
from typing import Any

TASK_TITLES = {"sst2": "SST-2", "mrpc": "MRPC", "cola": "CoLA", "rte": "RTE", "stsb": "STS-B", "mnli": "MNLI",
               "qnli": "QNLI", "qqp": "QQP", "e2e": "E2E"}
METRIC_TITLES = {"accuracy": "acc", "f1": "F1", "macro_f1": "macro-F1", "matthews_corrcoef": "Mcc",
                 "pearson": "Pearson", "spearman": "Spearman", "bleu": "BLEU", "nist": "NIST", "meteor": "MET",
                 "rouge_l": "ROUGE-L", "cider": "CIDEr", "ser": "SER"}
LOWER_IS_BETTER = {"ser"}  # E2E's slot error rate: its best cell is the lowest
RAW_METRICS = {"nist": 2, "cider": 2}  # printed as they are, with 2 decimals; every other metric in %, 1 decimal
AT_MAJORITY = 1.0  # points: a cell within this of the constant prediction learned (next to) nothing


def scaled(metric: str, value: float | None) -> float | None:
    """A metric as the tables print it: fractions in %, NIST and CIDEr as they are."""
    return None if value is None else value if metric in RAW_METRICS else 100 * value


def _digits(metric: str) -> int:
    return RAW_METRICS.get(metric, 1)


def majority_scores(task_name: str, split: str, data_dir: str | None, limit: int | None = None,
                    task_options: dict | None = None) -> dict[str, float] | None:
    """The task's metrics for the constant prediction: the most frequent label of `split` (regression: the mean
    score, whose correlations are 0). None for generation tasks (their floor is zero-shot prompting)."""
    from deltatune.tasks import get_task

    task = get_task(task_name, **(task_options or {}))
    if task.kind not in ("classification", "regression"):
        return None
    labels = [example["label"] for example in task.load(split, data_dir, limit=limit)]
    constant = statistics.fmean(labels) if task.kind == "regression" else Counter(labels).most_common(1)[0][0]
    return task.compute_metrics([constant] * len(labels), labels)


def load_published(name: str) -> dict[str, Any]:
    """One published table from `deltatune/results/published_tables.json` (`roberta-base`, `gpt2-medium`)."""
    from deltatune.errors import ConfigError

    tables = json.loads(resources.files("deltatune.results").joinpath("published_tables.json").read_text())
    if name not in tables["tables"]:
        raise ConfigError(f"no published table {name!r}; there are {sorted(tables['tables'])} (--published NAME)")
    return tables["tables"][name]


def matching_published(tasks: list[str]) -> str | None:
    """The published table whose tasks include every one of `tasks` (GLUE tasks: roberta-base; e2e: gpt2-medium)."""
    tables = json.loads(resources.files("deltatune.results").joinpath("published_tables.json").read_text())["tables"]
    for name, table in tables.items():
        if set(tasks) <= {column["task"] for column in table["columns"]}:
            return name
    return None


def _columns(rows: list[dict], tasks: list[str]) -> list[tuple[str, str]]:
    """(task, metric) per column, in task order, each task's metrics in its own order."""
    from deltatune.tasks.catalog import BUILT_IN_TASKS

    columns = []
    for task in tasks:
        metrics = next((r["metrics"] for r in rows if r["task"] == task and r.get("metrics")), None)
        if metrics is None:  # no cell of the task finished: its columns still show, empty
            metrics = BUILT_IN_TASKS[task]().metric_names if task in BUILT_IN_TASKS else ["accuracy"]
        columns += [(task, metric) for metric in metrics]
    return columns


def _cell(row: dict | None, metric: str) -> tuple[float | None, str]:
    """(mean as printed, its text "87.5 ± 0.3" / "87.5" / "-")."""
    if row is None or row.get(f"{metric}_mean") is None:
        return None, "-"
    digits = _digits(metric)
    mean = round(scaled(metric, row[f"{metric}_mean"]), digits)
    std = row.get(f"{metric}_std")
    return mean, f"{mean:.{digits}f}" + ("" if std is None else f" ± {scaled(metric, std):.{digits}f}")


def method_parameters(row: dict) -> int:
    """The parameters a method trains of its own: all it trains less the task head, which every method trains
    alike (the convention of the published tables, e.g. Hu et al. 2021 Table 2; `parameters_note` states it)."""
    return row["trainable_parameters"] - (row.get("head_parameters") or 0)


def parameters_note(rows: list[dict]) -> str:
    """The one sentence under every table with a parameter column: what it counts."""
    heads = sorted({r["head_parameters"] for r in rows if r.get("head_parameters")})
    text = "Trainable parameters: the method's own (what its delta adds or changes), as published tables count them"
    if not heads:
        return text + "."
    return (text + f"; each task's head (the classifier and the layers that feed it, e.g. BERT's pooler) trains "
            f"too, alike with every method, and is not counted: {heads[0]:,}"
            + (f"-{heads[-1]:,}" if len(heads) > 1 else "") + " parameters.")


def _parameters(rows: list[dict]) -> str:
    """The method's own trainable parameters (`method_parameters`), rounded for the table."""
    counts = sorted({method_parameters(r) for r in rows if r.get("trainable_parameters") is not None})
    if not counts:
        return "-"
    # task heads differ (STS-B: one output); a difference below the rounding shows as one number
    short = list(dict.fromkeys(f"{n / 1e6:.2f}M" if n >= 10_000 else f"{n:,}" for n in counts))
    return short[0] if len(short) == 1 else f"{short[0]}-{short[-1]}"


def measured_table(rows: list[dict], tasks: list[str]) -> dict[str, Any]:
    """{"columns": [(task, metric)], "rows": {label: {"parameters", "cells": {(task, metric): (mean, text)},
    "avg", "seeds"}}}: what `task_table_lines` prints and the orderings compare."""
    columns = _columns(rows, tasks)
    by_label: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_label.setdefault(row["label"], {})[row["task"]] = row
    table = {}
    for label, per_task in by_label.items():
        cells = {(task, metric): _cell(per_task.get(task), metric) for task, metric in columns}
        firsts = [cells[(task, metric)][0] for task, metric in columns
                  if metric == next(m for t, m in columns if t == task)]
        avg = round(statistics.fmean(firsts), 1) if len(tasks) > 1 and None not in firsts and firsts else None
        seeds = {task: f"{r['seeds']}/{r['seeds_planned']}" for task, r in per_task.items()}
        table[label] = {"parameters": _parameters(list(per_task.values())), "cells": cells, "avg": avg,
                        "seeds": next(iter(seeds.values())) if len(set(seeds.values())) == 1
                        else ", ".join(f"{TASK_TITLES.get(t, t)} {s}" for t, s in seeds.items())}
    return {"columns": columns, "rows": table}


def _header(columns: list[tuple[str, str]], tasks: list[str]) -> list[str]:
    """One task: its metrics ("BLEU", "NIST"...); several: "SST-2", "CoLA Mcc", "MRPC acc", "MRPC F1"."""
    names = []
    for task, metric in columns:
        title, metric_title = TASK_TITLES.get(task, task), METRIC_TITLES.get(metric, metric)
        alone = sum(1 for t, _ in columns if t == task) == 1 and metric == "accuracy"
        names.append(metric_title if len(tasks) == 1 else title if alone else f"{title} {metric_title}")
    return names


def task_table_lines(rows: list[dict], tasks: list[str], majority: dict[str, dict] | None = None,
                     published: dict[str, Any] | None = None) -> list[str]:
    """The table (markdown), the majority-class row and its flags, then the published table and orderings."""
    table = measured_table(rows, tasks)
    columns, measured = table["columns"], table["rows"]
    several = len(tasks) > 1
    header = ["method", "seeds", "# trainable parameters", *_header(columns, tasks), *(["Avg."] if several else [])]
    best = {column: (min if column[1] in LOWER_IS_BETTER else max)(
        (r["cells"][column][0] for r in measured.values() if r["cells"][column][0] is not None), default=None)
        for column in columns}
    best_avg = max((r["avg"] for r in measured.values() if r["avg"] is not None), default=None)
    lines = ["## Tasks x methods (mean ± std over seeds; one seed: the value alone; best of each column in bold)",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    flags = []
    for label, row in measured.items():
        texts = []
        for column in columns:
            mean, text = row["cells"][column]
            floor = (majority or {}).get(column[0])
            if mean is not None and floor is not None and mean <= scaled(column[1], floor[column[1]]) + AT_MAJORITY:
                text += " ⚠"
                flags.append(f"- {label} on {TASK_TITLES.get(column[0], column[0])} "
                             f"{METRIC_TITLES.get(column[1], column[1])}: {mean:.1f}, the majority class scores "
                             f"{scaled(column[1], floor[column[1]]):.1f}")
            texts.append(f"**{text}**" if mean is not None and mean == best[column] else text)
        avg = "-" if row["avg"] is None else f"{row['avg']:.1f}"
        lines.append("| " + " | ".join([label, row["seeds"], row["parameters"], *texts,
                                        *([f"**{avg}**" if row["avg"] == best_avg and avg != "-" else avg]
                                          if several else [])]) + " |")
    if majority and any(majority.values()):  # generation tasks have none: their floor is zero-shot prompting
        texts = [f"{scaled(m, majority[t][m]):.1f}" if majority.get(t) else "-" for t, m in columns]
        firsts = [majority[t][m] for t, m in columns if majority.get(t) and m == next(x for s, x in columns if s == t)]
        avg = [f"{statistics.fmean(scaled('accuracy', v) for v in firsts):.1f}"] if several and firsts else (
            ["-"] if several else [])
        lines.append("| " + " | ".join(["*majority class*", "-", "0", *texts, *avg]) + " |")
        lines += ["", "*majority class*: every evaluation example given the most frequent label (STS-B: the mean "
                      "score, whose correlations are 0)."]
        if flags:
            lines += ["", f"⚠ At the majority-class level (within {AT_MAJORITY:g} point): the cell learned next to "
                          "nothing: a finding to fix (budget, learning rate, max length), not a result.", *flags]
    lines += ["", parameters_note(rows)]
    if published:
        lines += published_lines(published, table)
    return lines


def majority_lines(rows: list[dict], majority: dict[str, dict | None]) -> list[str]:
    """One task without the task table: the majority-class scores in a sentence, and the rows at that level."""
    floor = next(iter(majority.values()), None)
    if not floor:
        return []
    text = ", ".join(f"{METRIC_TITLES.get(m, m)} {scaled(m, v):.2f}" for m, v in floor.items())
    lines = [f"Majority class (every evaluation example given the most frequent label): {text}."]
    for row in rows:
        metric = next(iter(floor))
        mean = row.get(f"{metric}_mean")
        if mean is not None and scaled(metric, mean) <= scaled(metric, floor[metric]) + AT_MAJORITY:
            lines.append(f"⚠ {row['label']} is at the majority-class level ({scaled(metric, mean):.2f}): it learned "
                         "next to nothing; fix the budget, learning rate or max length before reading it as a result.")
    return lines


def published_lines(published: dict[str, Any], table: dict[str, Any]) -> list[str]:
    """The published table as printed in its source, then each "LoRA >= X" ordering it claims, held or not here."""
    columns = published["columns"]
    lines = ["", f"## Published: {published['title']}", "", f"Source: {published['source']}", "",
             "| method | # trainable parameters | " + " | ".join(c["title"] for c in columns) + " |",
             "|" + "---|" * (len(columns) + 2)]
    for row in published["rows"]:
        texts = []
        for column in columns:
            value, std = row["scores"].get(column["key"]), row.get("std", {}).get(column["key"])
            digits = _digits(column["metric"]) if column["metric"] else 1
            texts.append("-" if value is None else f"{value:.{digits}f}"
                         + ("" if std is None else f" ± {std:.{digits}f}"))
        lines.append(f"| {row['name']} | {row['parameters']} | " + " | ".join(texts) + " |")
    pairs = ", ".join(f"{row['name']} = {row['label']}" for row in published["rows"])
    lines += ["", f"Rows pair with ours by label (name your variants so): {pairs}."]
    orderings = published_orderings(published, table)
    if orderings:
        held = sum(1 for o in orderings if o["published"] == o["measured"])
        lines += ["", f"Orderings of the published table on this model ({held} of {len(orderings)} hold):", ""]
        for o in orderings:
            verdict = "holds" if o["published"] == o["measured"] else "does not hold"
            lines.append(f"- {o['claim']}: published {'yes' if o['published'] else 'no'} ({o['published_values']}) "
                         f"— measured {'yes' if o['measured'] else 'no'} ({o['measured_values']}): {verdict}")
    else:
        lines += ["", "No published ordering can be checked: no two published rows have measured counterparts."]
    return lines


def published_orderings(published: dict[str, Any], table: dict[str, Any]) -> list[dict[str, Any]]:
    """For the published table's reference row (LoRA) against every other row measured here, per shared column
    and the average: does reference >= other hold in the paper, and here?"""
    measured = table["rows"]
    reference = next(r for r in published["rows"] if r["label"] == published["reference"])
    if reference["label"] not in measured:
        return []
    found = []
    for other in published["rows"]:
        if other is reference or other["label"] not in measured:
            continue
        for column in published["columns"]:
            key = (column["task"], column["metric"])
            if column["key"] == "avg":
                mine, theirs = measured[reference["label"]]["avg"], measured[other["label"]]["avg"]
            elif key in table["columns"]:
                mine, theirs = measured[reference["label"]]["cells"][key][0], measured[other["label"]]["cells"][key][0]
            else:
                continue
            paper_mine, paper_theirs = reference["scores"].get(column["key"]), other["scores"].get(column["key"])
            if None in (mine, theirs, paper_mine, paper_theirs):
                continue
            found.append({"claim": f"{reference['name']} ≥ {other['name']} on {column['title']}",
                          "published": paper_mine >= paper_theirs,
                          "published_values": f"{paper_mine:g} vs {paper_theirs:g}",
                          "measured": mine >= theirs, "measured_values": f"{mine:g} vs {theirs:g}"})
    return found
