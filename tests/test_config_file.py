"""`--config run.yaml` on train, compare and serve (deltatune/config_file.py): the file's settings reach the run,
options on the command line override them, unknown keys and wrong types are refused, and a run folder's
config.yaml trains the same delta again, bit for bit."""

from __future__ import annotations

import json

import pytest
import yaml

from deltatune.cli import _compare_config, apply_config_file, build_parser, config_from_args
from deltatune.cli import main as cli_main
from deltatune.serving.config import ServeConfig


def write_yaml(path, values: dict):
    path.write_text(yaml.safe_dump(values))
    return path


def test_saved_config_trains_the_same_delta_bit_for_bit(tiny_model_dir, sentiment_csv, tmp_path):
    run_file = write_yaml(tmp_path / "run.yaml", {
        "model": str(tiny_model_dir), "task": "csv", "method": "lora", "out": str(tmp_path / "first"),
        "task_options": {"path": str(sentiment_csv), "text_columns": ["review"], "label_column": "sentiment"},
        "max_steps": 6, "batch_size": 8, "lr": "5e-3", "seed": 3, "progress": False,
        "method_options": {"r": 4, "dropout": 0.1},  # dropout: the replay must draw the same masks
    })
    assert cli_main(["train", "--config", str(run_file), "--max-steps", "5"]) == 0  # the option beats the file
    first = tmp_path / "first"
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert saved["max_steps"] == 5 and saved["lr"] == 5e-3 and saved["precision"] in ("fp32", "bf16")
    assert json.loads((first / "delta" / "delta.json").read_text())["config"]["r"] == 4

    assert cli_main(["train", "--config", str(first / "config.yaml"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "delta" / "delta.safetensors").read_bytes() == \
        (first / "delta" / "delta.safetensors").read_bytes()
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["steps"] == 5

    # another seed and -o r=2 over the file's r=4: a different delta (the comparison above can fail)
    assert cli_main(["train", "--config", str(first / "config.yaml"), "--out", str(tmp_path / "other"),
                     "--seed", "4", "-o", "r=2"]) == 0
    assert json.loads((tmp_path / "other" / "delta" / "delta.json").read_text())["config"]["r"] == 2
    assert (tmp_path / "other" / "delta" / "delta.safetensors").read_bytes() != \
        (first / "delta" / "delta.safetensors").read_bytes()


@pytest.mark.parametrize(("values", "words"), [
    ({"modle": "minilm"}, ["unknown key", "'modle'", "'model'", "'max_steps'"]),  # the known keys listed
    ({"max_steps": "many"}, ["max_steps", "integer"]),
    ({"precision": "fp16"}, ["precision", "fp32", "bf16"]),
    ({"method_options": {"rank": 4}}, ["method_options", "rank", "'r'"]),
    ({"method_options": [4]}, ["method_options", "mapping"]),
])
def test_bad_config_files_are_refused_naming_the_key(tmp_path, capsys, values, words):
    run_file = write_yaml(tmp_path / "run.yaml", {"model": "minilm", "task": "sst2", "method": "lora",
                                                  "out": str(tmp_path / "run"), **values})
    assert cli_main(["train", "--config", str(run_file)]) == 2
    message = capsys.readouterr().err
    assert all(word in message for word in words), message
    assert not (tmp_path / "run").exists()


def parsed(argv: list[str]):
    parser = build_parser()
    apply_config_file(parser, argv)
    return parser.parse_args(argv)


def test_compare_config_file_merges_with_the_options(tmp_path):
    run_file = write_yaml(tmp_path / "compare.yaml", {
        "methods": "lora,bitfit", "seeds": 2, "budget": "steps=7", "lr": {"lora": "1e-3", "bitfit": 0.01},
        "method_options": {"lora": {"r": 4, "alpha": 8}}, "report_only": True,
    })
    config = _compare_config(parsed(["compare", "--config", str(run_file), "--seeds", "3", "-o", "lora:alpha=32",
                                     "--lr", "bitfit=0.02"]))
    assert config.methods == ["lora", "bitfit"] and config.budget == "steps=7" and config.report_only
    assert config.seeds == 3  # the option over the file
    assert config.lr == {"lora": 1e-3, "bitfit": 0.02}
    assert config.method_options["lora"] == {"r": 4, "alpha": 32}


def test_serve_config_file(tmp_path, monkeypatch):
    import deltatune.serving.app as app

    served = {}
    monkeypatch.setattr(app, "serve", lambda model, deltas, host, port, config: served.update(
        model=model, deltas=deltas, port=port, config=config))
    run_file = write_yaml(tmp_path / "serve.yaml", {"model": "minilm", "delta": {"sst2": "runs/a/delta"},
                                                    "port": 0, "max_batch_size": 4, "max_wait_ms": 2})
    assert cli_main(["serve", "--config", str(run_file), "--max-batch-size", "8"]) == 0
    assert served["model"] == "minilm" and served["deltas"] == {"sst2": "runs/a/delta"} and served["port"] == 0
    assert (served["config"].max_batch_size, served["config"].max_wait_ms, served["config"].queue_size) == (8, 2, 256)
    assert config_from_args(ServeConfig, parsed(["serve", "--config", str(run_file)])).max_batch_size == 4
