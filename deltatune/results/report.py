"""Tables and plots for `compare` and `sweep`: report.md, results.json, results.csv, PNG plots."""

from __future__ import annotations

import csv
import io
import json
import platform
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from deltatune.results.tables import RAW_METRICS, method_parameters, parameters_note


def environment() -> dict[str, str]:
    import transformers

    import deltatune

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({cpu})"
    return {"deltatune": deltatune.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "device": device, "threads": str(torch.get_num_threads())}


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample std; one value has no spread, so its std is None (shown without ±), not 0."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*") if f.is_file()) if path.is_dir() else 0


def aggregate(results: dict[str, dict]) -> list[dict[str, Any]]:
    """One row per method (or sweep value): mean and std over the seeds that finished, how many of the
    planned seeds that is (`seeds` of `seeds_planned`), each failed seed with its error, and the seeds a
    --report-only run found not trained yet (`not_run`)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for result in results.values():  # in the order the cells were planned
        label = result.get("label") or result["config"]["method"]
        groups.setdefault((result["config"]["task"], label), []).append(result)
    rows = []
    for (task, label), cells in groups.items():
        done = [c["summary"] for c in cells if "summary" in c]
        failed = [{"seed": c["config"]["seed"], "error": c["error"]} for c in cells if "error" in c]
        row: dict[str, Any] = {"label": label, "task": task, "method": cells[0]["config"]["method"], "seeds": len(done),
                               "seeds_planned": len(cells), "failed": failed,
                               "not_run": [c["config"]["seed"] for c in cells if c.get("not_run")],
                               "sweep_value": cells[0].get("sweep_value"),
                               "error": failed[0]["error"] if failed else None}
        if done:
            first = done[0]
            row["trainable_parameters"] = first["trainable_parameters"]
            row["head_parameters"] = next(  # None: only cells from before summaries had it (their seeds share it)
                (s["head_parameters"] for s in done if s.get("head_parameters") is not None
                 and s["trainable_parameters"] == first["trainable_parameters"]), None)
            row["method_parameters"] = method_parameters(row)
            row["delta_bytes"] = _dir_size(Path(first["delta"])) if first["delta"] else 0  # prompting: no delta
            for metric in first["final"]:
                mean, std = _mean_std([s["final"].get(metric) for s in done])
                row[f"{metric}_mean"], row[f"{metric}_std"] = mean, std
            for key in ("train_seconds", "examples_per_s", "peak_memory_mb", "steps"):
                row[key] = _mean_std([s.get(key) for s in done])[0]
            row["metrics"] = list(first["final"])
            for mode in ("calibrated", "batch_calibrated"):  # zero-/few-shot: beside the raw scores
                for metric in first.get(mode, {}):
                    mean, std = _mean_std([s[mode].get(metric) for s in done])
                    row[f"{mode}_{metric}_mean"], row[f"{mode}_{metric}_std"] = mean, std
            row["calibration_examples"] = first.get("calibration_examples")
        rows.append(row)
    return rows


def _fmt_metric(row: dict, metric: str) -> str:
    """"91.00 ± 1.20" over several seeds; "91.00" alone for one seed (one value has no spread)."""
    mean, std = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
    if mean is None:
        return "-"
    name = metric.removeprefix("batch_calibrated_").removeprefix("calibrated_")
    raw = name in RAW_METRICS or abs(mean) > 1.0  # NIST, CIDEr (a CIDEr of 0.56 is not 56%)
    scale, digits = (1, 3) if raw else (100, 2)
    text = f"{scale * mean:.{digits}f}"
    return text if std is None else f"{text} ± {scale * std:.{digits}f}"


def _seeds_line(rows: list[dict]) -> str:
    """What the quality columns average over, as it ran: "3 seeds", or each method's finished/planned."""
    counts = {(row["seeds"], row["seeds_planned"]) for row in rows}
    if len(counts) == 1 and all(done == planned for done, planned in counts):
        done = counts.pop()[0]
        return "1 seed" if done == 1 else f"{done} seeds, each finished"
    if all(done == planned for done, planned in counts):  # --method-seeds: each method its own count, all done
        return "seeds, each finished: " + "; ".join(
            f"{n} for {', '.join(dict.fromkeys(r['label'] for r in rows if r['seeds'] == n))}"
            for n in sorted({done for done, _ in counts}, reverse=True))
    several = len({row.get("task") for row in rows}) > 1
    return "seeds finished per method: " + ", ".join(
        f"{r['task'] + ' ' if several else ''}{r['label']} {r['seeds']}/{r['seeds_planned']}" for r in rows)


def _failures(rows: list[dict]) -> list[str]:
    """One line per failed (method, seed) cell with its error, and one line for the cells not trained yet
    (--report-only): the table's means leave both out."""
    several = len({row.get("task") for row in rows}) > 1

    def name(row: dict) -> str:
        return f"{row['task'] + ' ' if several else ''}{row['label']}"

    failed = [f"- {name(row)}, seed {f['seed']}: {f['error']}" for row in rows for f in row["failed"]]
    lines = ["", "Failed seeds (not in the means above):", *failed] if failed else []
    not_run = [f"{name(row)} seed {', '.join(map(str, row['not_run']))}" for row in rows if row["not_run"]]
    return lines + (["", f"Not run yet (--report-only; not in the means above): {'; '.join(not_run)}."]
                    if not_run else [])


def write_report(config, results: dict[str, dict], latency: dict[str, Any] | None, command: str, kind: str,
                 sweep: tuple[str, str] | None = None, tables: dict[str, Any] | None = None) -> dict[str, Any]:
    """report.md, results.json, results.csv and the plots for `results` (the cells planned by this run).

    `latency` is {"settings": what it was measured under, "rows": one per variant}, or None: then neither
    report.md nor results.json has a latency section. `tables` (majority-class scores, a published table)
    goes to `tables.task_table_lines`; with several tasks that table comes first.
    """
    tables = tables or {}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(results)
    env = environment()
    metrics = list(dict.fromkeys(m for r in rows for m in r.get("metrics", [])))  # several tasks: all their metrics
    tasks = list(dict.fromkeys(r["config"]["task"] for r in results.values()))
    base_params = _base_parameters(results)
    payload = {"kind": kind, "command": command, "environment": env, "config": asdict(config), "rows": rows,
               "base_parameters": base_params, "cells": results,
               **{key: value for key, value in tables.items() if value is not None}}
    if latency is not None:
        payload["latency"], payload["latency_settings"] = latency["rows"], latency["settings"]
    latency_rows = latency["rows"] if latency else []
    _write_text(out / "results.json", json.dumps(payload, indent=2, default=str) + "\n")
    _write_csv(out / "results.csv", rows, metrics)
    plots = _plots(out, rows, latency, metrics, sweep)

    lines = _header_lines(config, results, rows, command, kind, env, tasks)
    several = len(tasks) > 1
    if several or tables.get("published"):
        from deltatune.results.tables import task_table_lines

        lines += task_table_lines(rows, tasks, **tables)
        lines += ["", "## Every cell", ""]
    elif tables.get("majority"):
        from deltatune.results.tables import majority_lines

        lines += majority_lines(rows, tables["majority"]) + [""]
    lines += _cell_table_lines(rows, metrics, base_params, several)
    lines += _failures(rows)
    lines += _calibration_lines(rows, metrics)
    if latency_rows:
        lines += _latency_lines(latency["settings"], latency_rows)
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    _write_text(out / "report.md", "\n".join(lines) + "\n")
    return payload


def _write_text(path: Path, text: str) -> None:
    """Write whole or not at all: a temporary file beside `path`, renamed over it."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    temporary.replace(path)


def _header_lines(config, results: dict[str, dict], rows: list[dict], command: str, kind: str, env: dict,
                  tasks: list[str]) -> list[str]:
    """Title, command, environment and what every cell trained with."""
    return [f"# deltatune {kind}: {config.model} on {', '.join(tasks) or '?'}", "", f"Command: `{command}`", "",
            "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
            (f"Budget per cell: {_budgets(results)}, batch {config.batch_size}, "
             f"training precision {_precisions(results) or config.precision}, learning rate {_lrs(results)}, "
             if any(r.get("trainable_parameters") for r in rows) else "Prompting baselines only: nothing trains, ")
            + f"{_seeds_line(rows)}; quality = the task's metrics on its {_splits(results)} split at the end of "
            f"training (mean ± std over the seeds that finished, the value alone for one seed; in % where the metric "
            f"is a fraction).", ""]


def _cell_table_lines(rows: list[dict], metrics: list[str], base_params: int | None, several: bool) -> list[str]:
    """One row per (task,) method: parameters, delta size, each metric, time and memory; a failed row says why."""
    header = [*(["task"] if several else []), "method", "seeds", "trainable params", "% of base", "delta size",
              *metrics, "train s", "ex/s", "peak MB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        seeds = f"{row['seeds']}/{row['seeds_planned']}"
        first = [row["task"]] if several else []
        if row.get("trainable_parameters") is None:
            why = f"failed: {row['error']}" if row["error"] else "not run yet (--report-only)"
            lines.append("| " + " | ".join([*first, row["label"], seeds, f"{why} |"])
                         + " |" * (len(header) - 3 - len(first)))
            continue
        percent = 100 * row["method_parameters"] / base_params if base_params else float("nan")
        lines.append("| " + " | ".join([
            *first, row["label"], seeds, f"{row['method_parameters']:,}", f"{percent:.3f}%",
            f"{row['delta_bytes'] / 1e6:.2f} MB",
            *[_fmt_metric(row, m) for m in metrics], f"{row['train_seconds']:.0f}",
            "-" if row["examples_per_s"] is None else f"{row['examples_per_s']:.1f}", f"{row['peak_memory_mb']:.0f}",
        ]) + " |")
    return lines + ["", parameters_note(rows)]


def _calibration_lines(rows: list[dict], metrics: list[str]) -> list[str]:
    """The zero-/few-shot rows' calibrated scores (contextual, and batch calibration where it ran)."""
    calibrated = [r for r in rows if r.get(f"calibrated_{metrics[0]}_mean") is not None] if metrics else []
    if not calibrated:
        return []
    text = ("Zero-/few-shot rows score label words by the frozen model's next-token log-probabilities (raw, "
            "above); with contextual calibration (Zhao et al. 2021): " + "; ".join(
                f"{r['label']} {_fmt_metric(r, 'calibrated_' + metrics[0])}" for r in calibrated))
    batch = [r for r in calibrated if r.get(f"batch_calibrated_{metrics[0]}_mean") is not None]
    if batch:
        text += (f"; with batch calibration over {batch[0]['calibration_examples']} unlabeled training inputs "
                 "(Zhou et al. 2024): " + "; ".join(
                     f"{r['label']} {_fmt_metric(r, 'batch_calibrated_' + metrics[0])}" for r in batch))
    return ["", text + "."]


def _latency_lines(settings: dict, latency_rows: list[dict]) -> list[str]:
    lines = ["", f"## Inference latency (median ms of {settings['rounds']} rounds, sequence "
                 f"{settings['sequence_length']}, {settings['dtype'].removeprefix('torch.')}, "
                 f"{settings['threads']} threads)", "",
             "| variant | batch 1 | vs base | batch 16 | vs base |", "|---|---|---|---|---|"]
    for row in latency_rows:
        lines.append(f"| {row['variant']} | {row['batch1_ms']:.1f} | {row['batch1_vs_base']:.2f}× | "
                     f"{row['batch16_ms']:.1f} | {row['batch16_vs_base']:.2f}× |")
    return lines


def _splits(results: dict[str, dict]) -> str:
    return "/".join(dict.fromkeys(r["config"].get("eval_split", "dev") for r in results.values())) or "dev"


def _stopped_early(results: dict[str, dict]) -> str:
    """" (the time came first: prompt-seed0 at 61 steps)" for the cells that ran out of time before their steps."""
    early = [f"{name} at {r['summary']['steps']} steps" for name, r in results.items()
             if "summary" in r and r["summary"].get("steps", 0) < (r["config"].get("max_steps") or 0)]
    return f" (the time came first: {', '.join(early)})" if early else ""


def _budgets(results: dict[str, dict]) -> str:
    """Each task's budget as its cells ran ("sst2 300 steps, mrpc 2 epochs"; one task: "300 steps"), max length
    and training examples."""
    seen: dict[str, str] = {}
    for result in results.values():
        c = result["config"]
        budget = (f"{c['max_steps']} steps" if c.get("max_steps") else f"{c['max_seconds']:g} s"
                  if c.get("max_seconds") else f"{c['epochs']:g} epochs")
        if c.get("max_steps") and c.get("max_seconds"):  # --budget auto's share of a whole-comparison time limit
            budget += f" or {c['max_seconds']:g} s of training, whichever came first{_stopped_early(results)}"
        limit = f", first {c['train_limit']} training examples" if c.get("train_limit") else ""
        seen.setdefault(c["task"], f"{budget}, max length {c['max_length']}{limit}")
    if len(seen) == 1:
        return next(iter(seen.values()))
    return "; ".join(f"{task} {text}" for task, text in seen.items())


def _lrs(results: dict[str, dict]) -> str:
    """The learning rate each method trained with: --lr, else the registry's default."""
    from deltatune.methods.registry import METHODS

    found: dict[str, str] = {}
    for result in results.values():
        c = result["config"]
        label = result.get("label") or c["method"]
        if c["method"] in METHODS:
            lr = c.get("lr") or METHODS[c["method"]].default_lr
            found.setdefault(label, f"{label} {lr:g}" + ("" if c.get("lr") else " (registry default)"))
    return ", ".join(found.values()) or "-"


def _precisions(results: dict[str, dict]) -> str:
    """The precision(s) the cells trained in, as their summaries recorded them ("auto" resolved)."""
    found = sorted({r["summary"]["precision"] for r in results.values() if r.get("summary", {}).get("precision")})
    return "/".join(found)


def _base_parameters(results: dict[str, dict]) -> int | None:
    """Base model size, from a full fine-tuning cell's delta.json (or any delta's base description)."""
    for result in results.values():
        if "summary" in result and result["summary"]["delta"]:
            meta = Path(result["summary"]["delta"]) / "delta.json"
            if meta.is_file():
                return json.loads(meta.read_text())["base"]["num_parameters"]
    counted = [r["summary"].get("base_parameters") for r in results.values() if "summary" in r]
    return next((n for n in counted if n), None)  # only prompting cells: the model they prompted


def _write_csv(path: Path, rows: list[dict], metrics: list[str]) -> None:
    columns = ["task", "label", "method", "sweep_value", "seeds", "seeds_planned", "method_parameters",
               "head_parameters", "trainable_parameters",
               "delta_bytes", *[f"{m}_{s}" for m in metrics for s in ("mean", "std")], "train_seconds",
               "examples_per_s", "peak_memory_mb", "steps", "failed_seeds", "error", "not_run_seeds"]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:  # the failed seeds as "1: error; 2: error", in the row they are missing from
        writer.writerow({**row, "failed_seeds": "; ".join(f"{f['seed']}: {f['error']}" for f in row["failed"]),
                         "not_run_seeds": " ".join(map(str, row["not_run"]))})
    _write_text(path, text.getvalue())


def _spread(row: dict, metric: str) -> float:
    """The error bar: the std over seeds in %, none (0) for one seed."""
    std = row.get(f"{metric}_std")
    return 0.0 if std is None else 100 * std


def _plot_label(row: dict) -> str:
    """The point's label, with the seeds that finished when not all of them did."""
    if row["seeds"] == row["seeds_planned"]:
        return row["label"]
    return f"{row['label']} ({row['seeds']}/{row['seeds_planned']} seeds)"


def _quality_plot(out: Path, done: list[dict], metric: str) -> Path:
    """Quality vs the method's own parameters (log scale), each method its own colour and marker, named in a legend
    beside the axes: methods of similar size and score (LoRA, DoRA, BitFit) overlap as points, never as labels.
    The prompting rows train nothing: horizontal lines, raw dashed and batch-calibrated dotted."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8.5, 4.2))
    colors, markers = plt.get_cmap("tab10").colors, "osD^vP*Xph"
    trained = sorted((r for r in done if r["method_parameters"]), key=lambda r: r["method_parameters"])
    for i, row in enumerate(trained):
        axis.errorbar(row["method_parameters"], 100 * row[f"{metric}_mean"], yerr=_spread(row, metric),
                      fmt=markers[i % len(markers)], color=colors[i % len(colors)], capsize=4, markersize=7,
                      alpha=0.85, label=f"{_plot_label(row)} ({100 * row[f'{metric}_mean']:.1f})")
    for i, row in enumerate(r for r in done if not r["method_parameters"]):
        for prefix, style, suffix in (("", "--", ""), ("batch_calibrated_", ":", ", batch-calibrated")):
            value = row.get(f"{prefix}{metric}_mean")
            if value is not None:
                axis.axhline(100 * value, linestyle=style, color=("black", "dimgray", "darkgray")[i % 3], alpha=0.8,
                             label=f"{_plot_label(row)}{suffix}, 0 trained ({100 * value:.1f})")
    axis.set_xscale("log")
    axis.set_xlabel("trainable parameters, the method's own (log scale)")
    axis.set_ylabel(f"{metric} (%)")
    axis.set_title("Quality vs trainable parameters (mean ± std over seeds)")
    axis.grid(alpha=0.3)
    handles, labels = axis.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda k: "0 trained" in labels[k])  # the methods first, by size
    axis.legend([handles[k] for k in order], [labels[k] for k in order], loc="upper left", bbox_to_anchor=(1.01, 1.0),
                fontsize=8, frameon=False)
    figure.tight_layout()
    path = out / "quality_vs_parameters.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _plots(out: Path, rows: list[dict], latency: dict | None, metrics: list[str], sweep) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    done = [r for r in rows if r.get(f"{metrics[0]}_mean") is not None] if metrics else []
    if done and sweep is None:
        paths.append(_quality_plot(out, done, metrics[0]))
    if done and sweep is not None:
        method, parameter = sweep
        ordered = sorted(done, key=lambda r: float(r["sweep_value"]))
        figure, axis = plt.subplots(figsize=(6.5, 4.2))
        axis.errorbar([float(r["sweep_value"]) for r in ordered], [100 * r[f"{metrics[0]}_mean"] for r in ordered],
                      yerr=[_spread(r, metrics[0]) for r in ordered], fmt="o-", capsize=4)
        for row in ordered:  # a value whose seeds did not all finish says so beside its point
            if row["seeds"] != row["seeds_planned"]:
                axis.annotate(f"{row['seeds']}/{row['seeds_planned']} seeds",
                              (float(row["sweep_value"]), 100 * row[f"{metrics[0]}_mean"]),
                              textcoords="offset points", xytext=(6, -10), fontsize=8)
        axis.set_xscale("log")
        axis.set_xlabel(f"{method} {parameter} (log scale)")
        axis.set_ylabel(f"{metrics[0]} (%)")
        axis.set_title(f"{method}: quality vs {parameter} (mean ± std over seeds)")
        axis.grid(alpha=0.3)
        figure.tight_layout()
        paths.append(out / f"sweep_{method}_{parameter}.png")
        figure.savefig(paths[-1], dpi=120)
        plt.close(figure)
    if latency and latency["rows"]:
        figure, axes = plt.subplots(1, 2, figsize=(10, 4.2))
        for axis, batch in zip(axes, (1, 16)):
            values = [row[f"batch{batch}_ms"] for row in latency["rows"]]
            axis.barh([row["variant"] for row in latency["rows"]], values, color="tab:blue")
            for y, value in enumerate(values):
                axis.text(value, y, f" {value:.1f}", va="center", fontsize=8)
            axis.set_title(f"batch {batch}")
            axis.set_xlabel("median latency (ms)")
            axis.invert_yaxis()
        figure.suptitle(f"Inference latency by method (sequence {latency['settings']['sequence_length']})")
        figure.tight_layout()
        paths.append(out / "latency.png")
        figure.savefig(paths[-1], dpi=120)
        plt.close(figure)
    return paths
