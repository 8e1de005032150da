"""`deltatune compare` end to end on a tiny model: every output file, numbers consistent between
results.json and report.md, and finished cells reused after an interruption."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from deltatune.cli import main as cli_main
from deltatune.testing import tiny_tokenizer
from deltatune.training.loop import TrainConfig


def compare_args(model_dir, data_file, out, methods="lora,bitfit", seeds=2):
    return ["compare", "--model", str(model_dir), "--task", "csv", "--data-file", str(data_file),
            "--text-columns", "review", "--label-column", "sentiment", "--methods", methods,
            "--seeds", str(seeds), "--budget", "steps=3", "--batch-size", "8", "--out", str(out)]


@pytest.mark.slow
def test_compare_writes_consistent_report(tiny_model_dir, sentiment_csv, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli_main(compare_args(tiny_model_dir, sentiment_csv, out)) == 0
    for name in ["report.md", "results.json", "results.csv", "quality_vs_parameters.png", "latency.png"]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    rows = {row["label"]: row for row in results["rows"]}
    assert set(rows) == {"lora", "bitfit"}
    for label, row in rows.items():
        assert row["seeds"] == 2 and row["error"] is None
        line = next(line for line in report.splitlines() if line.startswith(f"| {label} |"))
        assert f"{row['method_parameters']:,}" in line and row["method_parameters"] < row["trainable_parameters"]
        accuracy = f"{100 * row['accuracy_mean']:.2f} ± {100 * row['accuracy_std']:.2f}"
        assert accuracy in line, (accuracy, line)
    with open(out / "results.csv") as handle:
        assert {r["label"] for r in csv.DictReader(handle)} == {"lora", "bitfit"}
    variants = [row["variant"] for row in results["latency"]]
    assert variants == ["base model", "lora (unmerged)", "lora (merged)", "bitfit (unmerged)", "bitfit (merged)"]
    assert "Environment:" in report and "torch" in report and "Command: `deltatune compare" in report

    # the same --out, BitFit alone (its finished cell reused): no latency section, nothing of LoRA's
    bitfit_only = compare_args(tiny_model_dir, sentiment_csv, out, methods="bitfit", seeds=1)
    assert cli_main(bitfit_only + ["--no-latency"]) == 0
    report = (out / "report.md").read_text()
    assert "Inference latency" not in report and "lora" not in report
    assert "latency" not in json.loads((out / "results.json").read_text())
    assert cli_main(bitfit_only) == 0  # latency on: measured again for the deltas of this run only
    variants = [row["variant"] for row in json.loads((out / "results.json").read_text())["latency"]]
    assert variants == ["base model", "bitfit (unmerged)", "bitfit (merged)"]


@pytest.mark.slow
def test_compare_reuses_finished_cells_and_reports_failures(tiny_model_dir, sentiment_csv, tmp_path):
    out = tmp_path / "cmp"
    args = compare_args(tiny_model_dir, sentiment_csv, out, methods="lora", seeds=1) + ["--no-latency"]
    assert cli_main(args) == 0  # as if killed after the first method
    first = (out / "cells" / "lora-seed0.json").read_text()
    first_mtime = (out / "runs" / "lora-seed0" / "summary.json").stat().st_mtime_ns

    rerun = compare_args(tiny_model_dir, sentiment_csv, out, methods="lora,nosuchmethod", seeds=1)
    assert cli_main(rerun + ["--no-latency"]) == 0
    assert (out / "cells" / "lora-seed0.json").read_text() == first  # reused, not retrained
    assert (out / "runs" / "lora-seed0" / "summary.json").stat().st_mtime_ns == first_mtime
    report = (out / "report.md").read_text()
    assert "| nosuchmethod | 0/1 | failed:" in report and "unknown method 'nosuchmethod'" in report

    other_budget = [a if a != "steps=3" else "steps=2" for a in args]
    assert cli_main(other_budget) == 0  # different settings: the cell is trained again, not reused
    assert json.loads((out / "cells" / "lora-seed0.json").read_text())["config"]["max_steps"] == 2


@pytest.mark.slow
def test_compare_prompting_baselines_are_rows_with_zero_trainable(tmp_path, sentiment_csv):
    """zero-shot/few-shot join compare as cells that train nothing; their numbers are evaluate_fewshot's;
    an encoder asked for prompting fails its own cells with a reason while the other methods still run."""
    from conftest import make_model

    from deltatune.models import load_model, load_tokenizer
    from deltatune.prompting.fewshot import evaluate_fewshot
    from deltatune.tasks import get_task

    decoder_dir = tmp_path / "tiny-llama"
    make_model("llama", kind="causal-lm").save_pretrained(decoder_dir)
    tiny_tokenizer().save_pretrained(decoder_dir)
    # every review distinct, so training inputs that are not also dev inputs exist for batch calibration
    reviews = sentiment_csv.read_text().splitlines()
    sentiment_csv.write_text("\n".join([reviews[0]] + [f"{i}: {row}" for i, row in enumerate(reviews[1:])]) + "\n")
    out = tmp_path / "cmp"
    args = compare_args(decoder_dir, sentiment_csv, out, methods="zero-shot,few-shot", seeds=2)
    assert cli_main(args + ["-o", "few-shot:shots=2", "--no-latency"]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {row["label"]: row for row in results["rows"]}
    assert rows["zero-shot"]["trainable_parameters"] == 0 and rows["few-shot"]["trainable_parameters"] == 0
    assert rows["zero-shot"]["error"] is None and rows["zero-shot"]["seeds"] == 1  # deterministic: one cell
    assert rows["few-shot"]["seeds"] == 2

    task = get_task("csv", path=str(sentiment_csv), text_columns=["review"], label_column="sentiment")
    model, tokenizer = load_model(str(decoder_dir), "causal-lm"), load_tokenizer(str(decoder_dir))
    for seed in (0, 1):  # each seed draws its own demonstrations
        expected = evaluate_fewshot(model, tokenizer, task, shots=2, split="dev", seed=seed)
        cell = results["cells"][f"few-shot-seed{seed}"]["summary"]
        assert cell["final"]["accuracy"] == pytest.approx(expected["accuracy"])
        assert cell["calibrated"]["accuracy"] == pytest.approx(expected["calibrated_accuracy"])
        assert cell["batch_calibrated"]["accuracy"] == pytest.approx(expected["batch_calibrated_accuracy"])
        assert cell["demonstrations"] == 2 and cell["delta"] is None
    report = (out / "report.md").read_text()
    zero_line = next(line for line in report.splitlines() if line.startswith("| zero-shot |"))
    assert "| 0 | 0.000% | 0.00 MB |" in zero_line
    assert "contextual calibration" in report
    assert "batch calibration over " in report and "unlabeled training inputs (Zhou et al. 2024): zero-shot" in report
    assert "Prompting baselines only: nothing trains" in report and "Budget per cell" not in report

    encoder_out = tmp_path / "cmp-encoder"
    assert cli_main(compare_args(tiny_model_dir_for(tmp_path), sentiment_csv, encoder_out, methods="zero-shot,lora",
                                 seeds=1) + ["--no-latency"]) == 0
    report = (encoder_out / "report.md").read_text()
    assert "| zero-shot | 0/1 | failed:" in report and "is an encoder" in report
    assert "Budget per cell" in report  # lora trained
    assert json.loads((encoder_out / "results.json").read_text())["rows"][1]["error"] is None  # lora still ran


def tiny_model_dir_for(tmp_path):
    from conftest import make_model

    path = tmp_path / "tiny-bert"
    make_model("bert").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_prompting_cells_refuse_unknown_options():
    from deltatune.results.compare import prompting_summary

    for method, options in [("few-shot", {"shot": "4"}), ("zero-shot", {"shots": "2"})]:
        config = TrainConfig(model="smollm2", task="sst2", method=method, out="unused", method_options=options)
        with pytest.raises(ValueError, match="unknown .* option"):
            prompting_summary(config)


def test_compare_records_one_data_folder_however_it_was_given(tmp_path, monkeypatch):
    """--data-dir, $DELTATUNE_DATA and a relative path to the same folder give the same cell config, so a
    rerun reuses finished cells whichever way the folder was named."""
    from deltatune.cli import _compare_config, build_parser

    folder = tmp_path / "data"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DELTATUNE_DATA", raising=False)
    by_flag = _compare_config(build_parser().parse_args(["compare", "--data-dir", "data"]))
    monkeypatch.setenv("DELTATUNE_DATA", str(folder))
    by_variable = _compare_config(build_parser().parse_args(["compare"]))
    assert by_flag.data_dir == by_variable.data_dir == str(folder.resolve())



# ---- reports from hand-built cells (no training): only what ran ----------------------------------------------
def hand_cell(tmp_path, method, seed, accuracy=None, error=None, **extra):
    """A cell as `run_cells` records it: the summary of a finished seed (with a small delta folder), or its error."""
    from dataclasses import asdict

    out = tmp_path / "runs" / f"{extra.get('label', method)}-seed{seed}"
    config = asdict(TrainConfig(model="tiny", task="csv", method=method, out=str(out), seed=seed))
    if error is not None:
        return {"config": config, "error": error, **extra}
    delta = out / "delta"
    delta.mkdir(parents=True)
    options = extra.pop("options", {})  # the method's config as delta.json records it
    (delta / "delta.json").write_text(json.dumps({"base": {"num_parameters": 10_000}, "config": options}))
    (delta / "delta.safetensors").write_bytes(bytes([seed]) * 100)
    summary = {"final": {"accuracy": accuracy}, "trainable_parameters": 100, "delta": str(delta),
               "train_seconds": 1.0, "examples_per_s": 10.0, "peak_memory_mb": 50.0, "steps": 3, "precision": "fp32"}
    return {"config": config, "summary": summary, **extra}


def table_line(report, label):
    return next(line for line in report.splitlines() if line.startswith(f"| {label} |"))


def test_report_means_only_the_seeds_that_finished_and_lists_the_failed_ones(tmp_path):
    """2 of LoRA's 3 seeds failed: its row is 1/3 with the one value (no "± 0.00"), the header claims no
    "3 seeds", and each failed seed is listed with its error under the table, in results.json and the csv."""
    from deltatune.results.compare import CompareConfig
    from deltatune.results.report import write_report

    cells = [hand_cell(tmp_path, "lora", 0, 0.91), hand_cell(tmp_path, "lora", 1, error="RuntimeError: out of memory"),
             hand_cell(tmp_path, "lora", 2, error="ValueError: loss is nan"),
             hand_cell(tmp_path, "bitfit", 0, 0.80), hand_cell(tmp_path, "bitfit", 1, 0.84),
             hand_cell(tmp_path, "bitfit", 2, error="KeyError: 'bias'"),
             hand_cell(tmp_path, "adapter", 0, 0.70), hand_cell(tmp_path, "adapter", 1, 0.72),
             hand_cell(tmp_path, "adapter", 2, 0.74)]
    config = CompareConfig(seeds=3, out=str(tmp_path / "out"))
    write_report(config, {f"cell{i}": c for i, c in enumerate(cells)}, None, "deltatune compare", "compare")
    report = (tmp_path / "out" / "report.md").read_text()

    assert "± 0.00" not in report and "3 seed" not in report
    assert "seeds finished per method: lora 1/3, bitfit 2/3, adapter 3/3" in report
    lora = table_line(report, "lora")
    assert "| 1/3 |" in lora and "| 91.00 |" in lora and "±" not in lora
    # two seeds: std = |0.80 - 0.84| / sqrt(2) = 2.83 points; three: 0.70, 0.72, 0.74 -> 72.00 ± 2.00
    assert "| 2/3 |" in table_line(report, "bitfit") and "| 82.00 ± 2.83 |" in table_line(report, "bitfit")
    assert "| 3/3 |" in table_line(report, "adapter") and "| 72.00 ± 2.00 |" in table_line(report, "adapter")
    under = report[report.index(table_line(report, "adapter")):]
    for line in ["- lora, seed 1: RuntimeError: out of memory", "- lora, seed 2: ValueError: loss is nan",
                 "- bitfit, seed 2: KeyError: 'bias'"]:
        assert line in under

    rows = {row["label"]: row for row in json.loads((tmp_path / "out" / "results.json").read_text())["rows"]}
    assert (rows["lora"]["seeds"], rows["lora"]["seeds_planned"], rows["lora"]["accuracy_std"]) == (1, 3, None)
    assert [f["seed"] for f in rows["lora"]["failed"]] == [1, 2] and rows["adapter"]["failed"] == []
    with open(tmp_path / "out" / "results.csv") as handle:
        csv_rows = {row["label"]: row for row in csv.DictReader(handle)}
    assert (csv_rows["lora"]["seeds"], csv_rows["lora"]["seeds_planned"], csv_rows["lora"]["accuracy_std"]) == (
        "1", "3", "")
    assert csv_rows["lora"]["failed_seeds"] == "1: RuntimeError: out of memory; 2: ValueError: loss is nan"
    assert csv_rows["bitfit"]["seeds"] == "2" and csv_rows["adapter"]["failed_seeds"] == ""


def test_one_seed_is_a_value_without_a_spread(tmp_path):
    from deltatune.results.compare import CompareConfig
    from deltatune.results.report import write_report

    config = CompareConfig(seeds=1, out=str(tmp_path / "out"))
    write_report(config, {"c": hand_cell(tmp_path, "lora", 0, 0.9624)}, None, "deltatune compare", "compare")
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| 96.24 |" in table_line(report, "lora") and "±" not in table_line(report, "lora")
    assert "1 seed;" in report and "seed(s)" not in report


def test_sweep_rows_say_how_many_seeds_finished(tmp_path):
    from deltatune.results.compare import CompareConfig
    from deltatune.results.report import write_report

    cells = [hand_cell(tmp_path, "lora", 0, 0.80, label="lora-r=4", sweep_value=4),
             hand_cell(tmp_path, "lora", 1, 0.90, label="lora-r=4", sweep_value=4),
             hand_cell(tmp_path, "lora", 0, 0.85, label="lora-r=8", sweep_value=8),
             hand_cell(tmp_path, "lora", 1, error="RuntimeError: boom", label="lora-r=8", sweep_value=8)]
    config = CompareConfig(seeds=2, out=str(tmp_path / "out"))
    write_report(config, {f"c{i}": c for i, c in enumerate(cells)}, None, "deltatune sweep", "sweep",
                 sweep=("lora", "r"))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| 2/2 |" in table_line(report, "lora-r=4") and "| 85.00 ± 7.07 |" in table_line(report, "lora-r=4")
    assert "| 1/2 |" in table_line(report, "lora-r=8") and "| 85.00 |" in table_line(report, "lora-r=8")
    assert "- lora-r=8, seed 1: RuntimeError: boom" in report and "2 seeds" not in report


def test_latency_sequence_fits_the_positions_beside_the_longest_prompt(tiny_model_dir, tmp_path):
    """128 tokens, or fewer on a model whose 128 positions must also hold a 20-token prompt."""
    from deltatune.results.compare import LATENCY_SEQ_LEN, latency_sequence_length

    lora = {"lora": hand_cell(tmp_path / "a", "lora", 0, 0.9, options={"r": 8})}
    prompt = {**lora, "prompt": hand_cell(tmp_path / "b", "prompt", 0, 0.7, options={"length": 20})}
    assert latency_sequence_length(str(tiny_model_dir), lora) == LATENCY_SEQ_LEN == 128
    assert latency_sequence_length(str(tiny_model_dir), prompt) == 108


def test_latency_is_reused_only_under_the_settings_it_was_measured_with(tmp_path, monkeypatch):
    """latency.json is reused when every setting matches; other deltas, rounds, threads or a retrained delta
    measure again; --no-latency leaves no latency section in report.md or results.json."""
    import torch

    from deltatune.results import compare as compare_module
    from deltatune.results.compare import CompareConfig, compare

    measured = []

    def fake_measure(config, results, seq_len=128):  # the timing itself is tested end to end (slow)
        methods = sorted(compare_module._latency_cells(results))
        measured.append(methods)
        return [{"variant": v, "batch1_ms": 1.0, "batch1_vs_base": 1.0, "batch16_ms": 2.0, "batch16_vs_base": 1.0}
                for v in ["base model", *[f"{m} (unmerged)" for m in methods]]]

    current = {}
    monkeypatch.setattr(compare_module, "measure_latency", fake_measure)
    monkeypatch.setattr(compare_module, "plan_cells", lambda config: [])
    monkeypatch.setattr(compare_module, "run_cells", lambda config, cells: current["results"])
    out = tmp_path / "out"
    lora = {"lora-seed0": hand_cell(tmp_path / "a", "lora", 0, 0.9)}
    bitfit = {"bitfit-seed0": hand_cell(tmp_path / "b", "bitfit", 0, 0.8)}

    def run(results, **settings):
        current["results"] = results
        compare(CompareConfig(out=str(out), methods=[c["config"]["method"] for c in results.values()], **settings))
        return (out / "report.md").read_text(), json.loads((out / "results.json").read_text())

    report, results = run(lora)
    assert measured == [["lora"]] and "lora (unmerged)" in report and results["latency_settings"]["rounds"] == 20
    run(lora)
    assert measured == [["lora"]]  # same settings: reused
    report, results = run(bitfit, latency=False)
    assert "Inference latency" not in report and "lora" not in report
    assert "latency" not in results and "latency_settings" not in results
    report, _ = run(bitfit)
    assert measured[-1] == ["bitfit"] and "lora" not in report
    run(bitfit, latency_repeats=5)
    assert len(measured) == 3  # other number of rounds
    run(bitfit, latency_repeats=5)
    assert len(measured) == 3
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    run(bitfit, latency_repeats=5)
    assert len(measured) == 4  # other thread count
    (Path(bitfit["bitfit-seed0"]["summary"]["delta"]) / "delta.safetensors").write_bytes(b"retrained" * 10)
    run(bitfit, latency_repeats=5)
    assert len(measured) == 5  # same path, another delta
