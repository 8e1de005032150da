"""`deltatune compare --tasks ...`: cells per (task, method, seed), method variants, per-task settings, the
task x method table (bold best, Avg., majority-class floor, a published table and its orderings), --jobs."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from deltatune.cli import _compare_config, build_parser
from deltatune.cli import main as cli_main
from deltatune.errors import ConfigError
from deltatune.results.compare import CompareConfig, TaskSettings, jobs_and_threads, plan_cells
from deltatune.training.loop import TrainConfig


def parse(*argv):
    return _compare_config(build_parser().parse_args(["compare", *argv]))


# ---- planning ------------------------------------------------------------------------------------------------
def test_tasks_times_variants_times_seeds_with_each_tasks_settings(tmp_path):
    config = parse("--tasks", "rte,sst2", "--methods", "lora,adapter@small,adapter@big", "--seeds", "2",
                   "-o", "adapter:placement=lin", "-o", "adapter@small:bottleneck=8", "-o", "adapter@big:bottleneck=48",
                   "--lr", "adapter@big=3e-4", "--lr", "adapter=1e-3", "--out", str(tmp_path), "--data-dir", ".")
    cells = plan_cells(config)
    assert len(cells) == 2 * 3 * 2
    names = [cell.name for cell in cells]
    assert names[:4] == ["rte-lora-seed0", "rte-lora-seed1", "rte-adapter@small-seed0", "rte-adapter@small-seed1"]
    by_name = {cell.name: cell for cell in cells}
    small, big = by_name["rte-adapter@small-seed1"], by_name["sst2-adapter@big-seed0"]
    assert (small.label, small.config.method, small.config.seed) == ("adapter@small", "adapter", 1)
    # a variant's options go over its method's; its --lr over the method's
    assert small.config.method_options == {"placement": "lin", "bottleneck": 8} and small.config.lr == 1e-3
    assert big.config.method_options == {"placement": "lin", "bottleneck": 48} and big.config.lr == 3e-4
    assert by_name["rte-lora-seed0"].config.lr is None  # the registry's default, resolved by train
    # budget auto: RTE by epochs with pairs at 128 tokens, SST-2 by steps at 64 (as compare always ran it)
    rte, sst2 = by_name["rte-lora-seed0"].config, by_name["sst2-lora-seed0"].config
    assert (rte.epochs, rte.max_steps, rte.max_length) == (3.0, None, 128)
    assert (sst2.max_steps, sst2.max_length) == (300, 64)
    assert rte.out == str(Path(tmp_path) / "runs" / "rte-lora-seed0")


def test_one_task_keeps_the_cell_names_and_settings_of_earlier_runs(tmp_path):
    """A run folder made before --tasks (cells `lora-seed0`, 300 steps, 64 tokens) is reused: same names, same
    TrainConfig; an explicit --budget/--max-length still wins over the task's row."""
    config = parse("--task", "sst2", "--methods", "lora", "--out", str(tmp_path), "--data-dir", ".")
    (cell,) = plan_cells(config)
    assert cell.name == "lora-seed0"
    assert asdict(cell.config) == asdict(TrainConfig(
        model="minilm", task="sst2", method="lora", out=str(Path(tmp_path) / "runs" / "lora-seed0"),
        data_dir=str(Path(".").resolve()), batch_size=32, max_length=64, seed=0, precision="auto", progress=False,
        max_steps=300))
    (cell,) = plan_cells(parse("--tasks", "mrpc", "--methods", "lora", "--budget", "steps=7", "--max-length", "32"))
    assert (cell.name, cell.config.max_steps, cell.config.max_length) == ("lora-seed0", 7, 32)


def test_variant_options_are_typed_and_a_stray_variant_is_refused():
    assert parse("--methods", "lora@r4", "-o", "lora@r4:r=4").method_options["lora@r4"] == {"r": 4}
    with pytest.raises(ConfigError, match="names no variant"):
        parse("--methods", "lora@r4", "-o", "lora@r8:r=8")
    with pytest.raises(ConfigError, match="-o"):
        parse("--methods", "lora@r4", "-o", "lora@r4:rank=4")  # the method's config has no 'rank'
    with pytest.raises(ConfigError, match="not both"):
        parse("--task", "sst2", "--tasks", "rte,mrpc")


def test_method_seeds_give_one_row_more_seeds_than_the_others(tmp_path):
    """--method-seeds lora=3 with --seeds 1: LoRA over seeds 0-2, every other row over seed 0 (a variant's count
    over its method's); zero-shot still one cell. --lr reaches a variant whose name has a dash."""
    config = parse("--task", "e2e", "--methods", "lora,adapter@lin-small,adapter@lin-big,zero-shot",
                   "--method-seeds", "lora=3", "--method-seeds", "adapter=2", "--method-seeds", "adapter@lin-big=1",
                   "--lr", "adapter@lin-small=3e-3", "--model", "smollm2", "--out", str(tmp_path), "--data-dir", ".")
    names = [cell.name for cell in plan_cells(config)]
    assert names == ["lora-seed0", "lora-seed1", "lora-seed2", "adapter@lin-small-seed0", "adapter@lin-small-seed1",
                     "adapter@lin-big-seed0", "zero-shot-seed0"]
    assert {cell.config.lr for cell in plan_cells(config) if cell.label == "adapter@lin-small"} == {3e-3}


@pytest.mark.parametrize("argv, message", [
    (["--method-seeds", "prefix=3"], "'prefix' is not one of the methods run here"),
    (["--method-seeds", "lora=0"], "whole number >= 1"),
    (["--method-seeds", "lora"], "METHOD=VALUE"),
    (["--lr", "adapter@lin_small=1e-3"], "'adapter@lin_small' is not one of the methods"),  # was silently unused
    (["--lr", "lora=fast"], "a learning rate"),
])
def test_per_method_values_name_a_method_that_runs(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse("--methods", "lora,adapter@lin-small", *argv)


def test_jobs_times_threads_fit_the_cores(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert jobs_and_threads(CompareConfig(), cells=20) == (8, 1)  # one single-thread cell per core
    assert jobs_and_threads(CompareConfig(), cells=3) == (3, 2)  # never more jobs than cells
    assert jobs_and_threads(CompareConfig(jobs=2), cells=20) == (2, 4)
    assert jobs_and_threads(CompareConfig(threads_per_job=2), cells=20) == (4, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert jobs_and_threads(CompareConfig(), cells=20) == (1, 8)  # one device: one cell at a time


# ---- the majority-class floor --------------------------------------------------------------------------------
def test_majority_class_scores_are_the_constant_predictions(tmp_path):
    from deltatune.results.tables import majority_scores

    path = tmp_path / "labels.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{'yes' if i < 7 else 'no'}\n" for i in range(10)))
    options = {"path": str(path), "text_columns": ["text"], "label_column": "label"}
    scores = majority_scores("csv", "dev", None, task_options=options)
    dev = __import__("deltatune.tasks", fromlist=["get_task"]).get_task("csv", **options).load("dev")
    yes = sum(1 for example in dev if example["label"] == max({e["label"] for e in dev},
                                                              key=[e["label"] for e in dev].count))
    assert scores["accuracy"] == pytest.approx(yes / len(dev))
    assert majority_scores("e2e", "test", None) is None  # generation: its floor is zero-shot prompting


# ---- the report, from hand-built cells (no training) ---------------------------------------------------------
def cell(tmp_path, task, label, seed, metrics, trainable=100, head=None):
    method = label.split("@")[0]
    out = tmp_path / "runs" / f"{task}-{label}-seed{seed}"
    config = asdict(TrainConfig(model="tiny", task=task, method=method, out=str(out), seed=seed, max_length=128))
    delta = out / "delta"
    delta.mkdir(parents=True)
    (delta / "delta.json").write_text(json.dumps({"base": {"num_parameters": 10_000}}))
    summary = {"final": metrics, "trainable_parameters": trainable, "delta": str(delta), "train_seconds": 1.0,
               "examples_per_s": 10.0, "peak_memory_mb": 50.0, "steps": 3, "precision": "fp32",
               **({} if head is None else {"head_parameters": head})}
    return {"config": config, "summary": summary, "label": label}


def line(report, label):
    return next(row for row in report.splitlines() if row.startswith(f"| {label} |"))


def test_task_table_bold_avg_majority_and_published_orderings(tmp_path):
    from deltatune.results.report import write_report
    from deltatune.results.tables import load_published

    cells = {}
    for seed, (rte, acc, f1) in enumerate([(0.60, 0.80, 0.86), (0.62, 0.84, 0.88)]):  # LoRA over two seeds
        cells[f"rte-lora-{seed}"] = cell(tmp_path, "rte", "lora", seed, {"accuracy": rte})
        cells[f"mrpc-lora-{seed}"] = cell(tmp_path, "mrpc", "lora", seed, {"accuracy": acc, "f1": f1})
    # full: 9,000 trainable of which 1,056 (RTE) / 1,056 (MRPC) are the task head: 7,944 its own
    cells["rte-full"] = cell(tmp_path, "rte", "full", 0, {"accuracy": 0.624}, trainable=9_000, head=1_056)
    cells["mrpc-full"] = cell(tmp_path, "mrpc", "full", 0, {"accuracy": 0.69, "f1": 0.90}, trainable=9_000, head=1_056)
    majority = {"rte": {"accuracy": 0.53}, "mrpc": {"accuracy": 0.684, "f1": 0.812}}
    config = CompareConfig(tasks=["rte", "mrpc"], seeds=2, out=str(tmp_path / "out"))
    write_report(config, cells, None, "deltatune compare", "compare",
                 tables={"majority": majority, "published": load_published("roberta-base")})
    report = (tmp_path / "out" / "report.md").read_text()

    assert "| method | seeds | # trainable parameters | RTE | MRPC acc | MRPC F1 | Avg. |" in report
    # LoRA: RTE 61.0 ± 1.4 (|0.60-0.62|/sqrt 2), MRPC 82.0 ± 2.8, F1 87.0 ± 1.4; Avg. (61.0 + 82.0) / 2 = 71.5
    assert line(report, "lora") == "| lora | 2/2 | 100 | 61.0 ± 1.4 | **82.0 ± 2.8** | 87.0 ± 1.4 | **71.5** |"
    # FT, one seed: values alone; RTE 62.4 bold, F1 90.0 bold; Avg. (62.4 + 69.0) / 2 = 65.7
    # FT's MRPC accuracy 69.0 is within 1 point of the constant prediction's 68.4: flagged
    assert line(report, "full") == "| full | 1/1 | 7,944 | **62.4** | 69.0 ⚠ | **90.0** | 65.7 |"
    # one convention in every table: the "Every cell" table counts full's own 7,944 too (and 7,944 / 10,000 of the
    # base), and each table says so once
    assert line(report.split("## Every cell")[1], "rte | full").startswith("| rte | full | 1/1 | 7,944 | 79.440% |")
    assert "9,000" not in report
    note = ("Trainable parameters: the method's own (what its delta adds or changes), as published tables count them; "
            "each task's head (the classifier and the layers that feed it, e.g. BERT's pooler) trains too, alike with "
            "every method, and is not counted: 1,056 parameters.")
    assert report.count(note) == 2
    assert "| *majority class* | - | 0 | 53.0 | 68.4 | 81.2 | 60.7 |" in report
    assert "- full on MRPC acc: 69.0, the majority class scores 68.4" in report
    assert "⚠" not in line(report, "lora")
    assert "Source: Hu et al. 2021" in report and "| LoRA | 0.3M |" in report
    assert ("- LoRA ≥ FT* on RTE: published yes (86.6 vs 78.7) — measured no (61 vs 62.4): does not hold"
            in report)
    assert "- LoRA ≥ FT* on MRPC acc: published no (89.7 vs 90.2) — measured yes (82 vs 69): does not hold" in report
    assert "- LoRA ≥ FT* on Avg.: published yes (87.2 vs 86.4) — measured yes (71.5 vs 65.7): holds" in report
    assert "(1 of 3 hold)" in report
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["majority"] == majority and {r["task"] for r in results["rows"]} == {"rte", "mrpc"}
    with open(tmp_path / "out" / "results.csv", newline="") as f:  # one row per (task, method), the task named
        csv_rows = {(row["task"], row["label"]): row for row in csv.DictReader(f)}
    assert set(csv_rows) == {(task, label) for task in ("rte", "mrpc") for label in ("lora", "full")}
    assert (csv_rows["rte", "full"]["accuracy_mean"], csv_rows["mrpc", "full"]["f1_mean"]) == ("0.624", "0.9")


def test_published_tables_are_package_data_with_their_source():
    from deltatune.results.tables import load_published, matching_published

    glue, e2e = load_published("roberta-base"), load_published("gpt2-medium")
    assert "Table 2" in glue["source"] and "Table 3" in e2e["source"]
    lora = next(row for row in glue["rows"] if row["label"] == "lora")
    assert lora["scores"]["rte"] == 86.6 and lora["scores"]["avg"] == 87.2
    ft = next(row for row in e2e["rows"] if row["label"] == "full")
    assert [ft["scores"][c["key"]] for c in e2e["columns"]] == [68.2, 8.62, 46.2, 71.0, 2.47]
    assert matching_published(["sst2", "rte"]) == "roberta-base" and matching_published(["e2e"]) == "gpt2-medium"
    assert matching_published(["bbc-news"]) is None
    with pytest.raises(ConfigError, match="roberta-base"):
        load_published("gpt3")


def test_task_settings_table_has_the_glue_tasks():
    from deltatune.results.compare import TASK_SETTINGS

    assert TASK_SETTINGS["sst2"] == TaskSettings("steps=300", 64)  # what compare ran before per-task settings
    assert {"sst2", "mrpc", "cola", "rte", "stsb", "e2e"} <= set(TASK_SETTINGS)
    assert TASK_SETTINGS["e2e"].train_limit == 2000 and TASK_SETTINGS["e2e"].eval_split == "test"


# ---- --jobs: the same cells whatever the parallelism ---------------------------------------------------------
@pytest.mark.slow
def test_jobs_two_gives_the_cells_of_jobs_one(tiny_model_dir, sentiment_csv, tmp_path):
    def run(jobs):
        out = tmp_path / f"jobs{jobs}"
        assert cli_main(["compare", "--model", str(tiny_model_dir), "--task", "csv", "--data-file",
                         str(sentiment_csv), "--text-columns", "review", "--label-column", "sentiment",
                         "--methods", "lora,bitfit@b", "--seeds", "1", "--budget", "steps=2", "--batch-size", "8",
                         "--no-latency", "--jobs", str(jobs), "--threads-per-job", "1", "--out", str(out)]) == 0
        return out, json.loads((out / "results.json").read_text())["cells"]

    out1, one = run(1)
    out2, two = run(2)
    assert list(one) == list(two) == ["lora-seed0", "bitfit@b-seed0"]
    for name in one:
        assert one[name]["summary"]["final"] == two[name]["summary"]["final"], name
        assert one[name]["summary"]["trainable_parameters"] == two[name]["summary"]["trainable_parameters"]
        first, second = (Path(o) / "runs" / name / "delta" / "delta.safetensors" for o in (out1, out2))
        assert first.read_bytes() == second.read_bytes(), name  # the very same trained weights


def test_a_classification_cell_trained_with_a_frozen_pooler_is_trained_again(tmp_path):
    """Cells from before BERT's pooler trained with the head (no head_parameters in their summary) are not reused
    for the methods that keep the base frozen; full fine-tuning (it trained the pooler anyway) and generation
    cells (no pooler) are."""
    from deltatune.results.compare import _finished

    def cell(method, final, **summary):
        config = TrainConfig(model="minilm", task="cola", method=method, out=str(tmp_path / method))
        path = tmp_path / f"{method}-{len(final)}-{len(summary)}.json"
        path.write_text(json.dumps({"config": asdict(config), "summary": {
            "method": method, "trainable_parameters": 1000, "final": final, **summary}}))
        return path, config

    for method, final, extra, reused in [
            ("lora", {"matthews_corrcoef": 0.0}, {}, False), ("bitfit", {"pearson": 0.1, "spearman": 0.1}, {}, False),
            ("lora", {"matthews_corrcoef": 0.2}, {"head_parameters": 148_610}, True),
            ("full", {"matthews_corrcoef": 0.3}, {}, True), ("top_layers", {"accuracy": 0.8}, {}, True),
            ("lora", {"bleu": 0.5, "nist": 7.0}, {}, True)]:
        path, config = cell(method, final, **extra)
        assert (_finished(path, config) is not None) == reused, (method, final, extra)


def test_report_only_writes_the_table_from_finished_cells_and_trains_none(tmp_path, monkeypatch):
    """--report-only: the finished cell's row, the unfinished one listed as not run, no cell started."""
    import deltatune.results.compare as compare_module

    monkeypatch.setattr(compare_module, "start_cell", lambda *a, **k: pytest.fail("--report-only started a cell"))
    config = parse("--tasks", "rte", "--methods", "lora,bitfit", "--no-latency", "--report-only",
                   "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path))
    lora, bitfit = plan_cells(config)
    done = cell(tmp_path, "rte", "lora", 0, {"accuracy": 0.61}, head=66)
    done["config"] = asdict(lora.config)
    (tmp_path / "out" / "cells").mkdir(parents=True)
    (tmp_path / "out" / "cells" / f"{lora.name}.json").write_text(json.dumps(done))
    compare_module.compare(config)
    report = (tmp_path / "out" / "report.md").read_text()
    # 100 trainable, 66 of them the head; no data folder here, so no majority row
    assert ("| lora | 1/1 | 34 | **61.0** |\n| bitfit | 0/1 | - | - |\n\nTrainable parameters: the method's own"
            in report)
    assert "| bitfit | 0/1 | not run yet (--report-only) |" in report and "Failed seeds" not in report
    assert "Not run yet (--report-only; not in the means above): bitfit seed 0." in report
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        csv_rows = {row["label"]: row for row in csv.DictReader(f)}
    assert (csv_rows["bitfit"]["not_run_seeds"], csv_rows["bitfit"]["failed_seeds"]) == ("0", "")
    assert csv_rows["lora"]["not_run_seeds"] == "" and "failed" not in report


def test_a_generation_table_has_no_majority_row(tmp_path):
    """E2E has no majority class (its floor is the zero-shot row): no row of dashes, no note about one."""
    from deltatune.results.report import aggregate
    from deltatune.results.tables import task_table_lines

    rows = aggregate({"e2e-lora": cell(tmp_path, "e2e", "lora", 0, {"bleu": 0.53, "nist": 7.2})})
    text = "\n".join(task_table_lines(rows, ["e2e"], majority={"e2e": None}))
    assert "| lora | 1/1 | 100 | **53.0** | **7.20** |" in text
    assert "majority" not in text


def test_the_best_slot_error_rate_is_the_lowest(tmp_path):
    """SER (lower is better) is bolded at its minimum, BLEU at its maximum."""
    from deltatune.results.report import aggregate
    from deltatune.results.tables import task_table_lines

    rows = aggregate({"e2e-lora": cell(tmp_path, "e2e", "lora", 0, {"bleu": 0.53, "ser": 0.04}),
                      "e2e-adapter": cell(tmp_path, "e2e", "adapter", 0, {"bleu": 0.55, "ser": 0.09})})
    text = "\n".join(task_table_lines(rows, ["e2e"], majority={"e2e": None}))
    assert "| lora | 1/1 | 100 | 53.0 | **4.0** |" in text and "| adapter | 1/1 | 100 | **55.0** | 9.0 |" in text


def test_cell_table_prints_cider_and_nist_as_they_are_even_below_one():
    from deltatune.results.report import _fmt_metric

    assert _fmt_metric({"cider_mean": 0.5588, "cider_std": None}, "cider") == "0.559"  # not "55.88" (%)
    assert _fmt_metric({"accuracy_mean": 0.8, "accuracy_std": 0.01}, "accuracy") == "80.00 ± 1.00"


def test_a_row_takes_its_head_size_from_any_seed_that_recorded_it(tmp_path):
    """Full fine-tuning's seeds 0-1 ran before summaries had head_parameters, seed 2 after: the row counts the
    method's own parameters from seed 2's head size, not the total with the head."""
    from deltatune.results.report import aggregate

    old = [cell(tmp_path, "rte", "full", seed, {"accuracy": 0.6}, trainable=100) for seed in (0, 1)]
    new = cell(tmp_path, "rte", "full", 2, {"accuracy": 0.6}, trainable=100, head=30)
    other = cell(tmp_path, "rte", "lora", 0, {"accuracy": 0.6}, trainable=50, head=30)  # another row's head
    (row,) = [r for r in aggregate({f"c{i}": c for i, c in enumerate([*old, new])}) if r["label"] == "full"]
    assert row["head_parameters"] == 30 and row["seeds"] == 3
    assert aggregate({"a": old[0], "b": other})[0]["head_parameters"] is None


def test_the_budget_line_groups_methods_by_their_finished_seed_count(tmp_path):
    """--method-seeds lora=3 with --seeds 1, every cell finished: one clause per count, not one per (task, row)."""
    from deltatune.results.report import _seeds_line, aggregate

    cells = {f"{task}-lora-{seed}": cell(tmp_path, task, "lora", seed, {"accuracy": 0.6})
             for task in ("rte", "mrpc") for seed in range(3)}
    cells |= {f"{task}-bitfit": cell(tmp_path, task, "bitfit", 0, {"accuracy": 0.6}) for task in ("rte", "mrpc")}
    cells["rte-adapter"] = cell(tmp_path, "rte", "adapter", 0, {"accuracy": 0.6})
    cells["mrpc-adapter"] = cell(tmp_path, "mrpc", "adapter", 0, {"accuracy": 0.6})
    assert _seeds_line(aggregate(cells)) == "seeds, each finished: 3 for lora; 1 for bitfit, adapter"
    cells["mrpc-lora-2"] = {"config": cells["mrpc-lora-2"]["config"], "not_run": True}  # a seed short: each row
    assert _seeds_line(aggregate(cells)).startswith("seeds finished per method: rte lora 3/3, mrpc lora 2/3, ")


def test_quality_plot_names_every_method_without_overlapping_labels(tmp_path, monkeypatch):
    """LoRA, DoRA and BitFit of about one size and score (as on MiniLM SST-2) and two prompting floors: every row is
    named on the figure, and no two of its texts overlap (they did when each point carried its label)."""
    from matplotlib.figure import Figure

    from deltatune.results.report import write_report

    drawn = []  # per figure saved: its title and (text, box on the canvas) of every text on it
    save = Figure.savefig

    def keep(figure, *args, **kwargs):
        result = save(figure, *args, **kwargs)
        renderer = figure.canvas.get_renderer()
        texts = [t for axis in figure.axes for t in axis.texts]
        texts += [t for axis in figure.axes if axis.get_legend() for t in axis.get_legend().get_texts()]
        drawn.append((figure.axes[0].get_title(), [(t.get_text(), t.get_window_extent(renderer)) for t in texts
                                                   if t.get_text()]))
        return result

    monkeypatch.setattr(Figure, "savefig", keep)
    points = {"lora": (295_682, 0.893), "dora": (298_754, 0.894), "bitfit": (250_754, 0.891),
              "adapter": (449_666, 0.899), "full": (22_861_826, 0.905), "zero-shot": (0, 0.55), "few-shot": (0, 0.56)}
    cells = {label: cell(tmp_path, "sst2", label, 0, {"accuracy": accuracy}, trainable=trainable,
                         head=148_226 if trainable else None) for label, (trainable, accuracy) in points.items()}
    write_report(CompareConfig(out=str(tmp_path / "out"), task="sst2"), cells, None, "deltatune compare", "compare")
    (texts,) = [texts for title, texts in drawn if title.startswith("Quality vs trainable")]
    written = " ".join(text for text, _ in texts)
    assert all(label in written for label in points), written
    overlapping = [(texts[i][0], texts[j][0]) for i in range(len(texts)) for j in range(i + 1, len(texts))
                   if texts[i][1].overlaps(texts[j][1])]
    assert not overlapping
