"""`deltatune compare` end to end on a tiny model: every output file, numbers consistent between
results.json and report.md, and finished cells reused after an interruption."""

from __future__ import annotations

import csv
import json

import pytest

from deltatune.cli import main as cli_main
from deltatune.models import tiny_tokenizer
from deltatune.train import TrainConfig


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
        assert f"{row['trainable_parameters']:,}" in line
        accuracy = f"{100 * row['accuracy_mean']:.2f} ± {100 * row['accuracy_std']:.2f}"
        assert accuracy in line, (accuracy, line)
    with open(out / "results.csv") as handle:
        assert {r["label"] for r in csv.DictReader(handle)} == {"lora", "bitfit"}
    variants = [row["variant"] for row in results["latency"]]
    assert variants == ["base model", "lora (unmerged)", "lora (merged)", "bitfit (unmerged)", "bitfit (merged)"]
    assert "Environment:" in report and "torch" in report and "Command: `deltatune compare" in report


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
    assert "| nosuchmethod | failed:" in report and "unknown method 'nosuchmethod'" in report

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
    assert "| zero-shot | failed:" in report and "is an encoder" in report
    assert "Budget per cell" in report  # lora trained
    assert json.loads((encoder_out / "results.json").read_text())["rows"][1]["error"] is None  # lora still ran


def tiny_model_dir_for(tmp_path):
    from conftest import make_model

    path = tmp_path / "tiny-bert"
    make_model("bert").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_prompting_cells_refuse_unknown_options():
    from deltatune.compare import prompting_summary

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

