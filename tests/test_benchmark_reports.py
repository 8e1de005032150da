"""The benchmark scripts' tables: rows measured with other settings are not mixed in unmarked, and targets are
decided on the final checkpoint (the best evaluation is chosen on the dev set it is scored on)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def e2e_row(bleu: float, settings: dict | None) -> dict:
    row = {"bleu": bleu, "nist": 1.0, "meteor": 0.1, "rouge_l": 0.2, "cider": 0.3, "trainable": 0, "seconds": 5}
    return row if settings is None else {**row, "settings": settings}


def test_e2e_table_keeps_rows_scored_on_other_test_mrs_apart(capsys):
    """An earlier run's rows in results.json scored with another --test-limit (or saved without settings) are
    listed under the table with their settings, not in it."""
    e2e = load_benchmark("e2e_smollm2")
    everything = {"test_limit": None, "test_mrs": 630}
    results = {
        "untrained (training prompt)": e2e_row(0.0745, everything),
        "LoRA r=8 (q,v)": e2e_row(0.6123, {"test_limit": 50, "test_mrs": 50, "lr": 1e-3, "epochs": 1.0}),
        "2-shot prompting": e2e_row(0.3562, None),
        "0-shot prompting": e2e_row(0.1383, {**everything, "shots": 0, "demonstration_seed": 0}),
    }
    e2e.print_table(results, everything)
    table, _, below = capsys.readouterr().out.partition("not in the table")
    assert "scored on 630 test MRs" in table
    assert "untrained (training prompt)" in table and "0-shot prompting" in table and "shots 0" in table
    assert "LoRA" not in table and "0.6123" not in table and "2-shot" not in table
    assert '"test_limit": 50' in below and "LoRA r=8 (q,v)" in below
    assert "2-shot prompting: settings not recorded" in below


def test_sst2_targets_are_decided_on_the_final_checkpoint():
    sst2 = load_benchmark("sst2_methods")
    # the best evaluations would meet both targets; the final checkpoints meet neither
    missed = sst2.target_lines(final={"full": 0.875, "lora": 0.855}, best={"full": 0.885, "lora": 0.875})
    assert missed[0].startswith("full fine-tuning >= 88% (final checkpoint): MISSED (final 87.50%; best 88.50%")
    assert "MISSED (gap 2.00 points; between the best evaluations 1.00" in missed[1]
    met = sst2.target_lines(final={"full": 0.89, "lora": 0.88}, best={"full": 0.90, "lora": 0.87})
    assert ": met (final 89.00%; best 90.00%" in met[0] and ": met (gap 1.00 points; between the best evaluations " \
        "3.00" in met[1]


def fewshot_scores(folder: Path, shots: int) -> str:
    """A scores.json as `fewshot_draws.py` saves it: 2 dev, 2 held-out examples, 1 content-free, 1 unlabeled."""
    folder.mkdir(parents=True)
    draw = {"demonstrations": [["a fine film", 1]] * shots, "held": [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]],
            "dev": [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.4, 0.6]]}
    saved = {"shots": shots, "draws_total": 12, "held_out": 2, "held_labels": [1, 0], "dev_labels": [1, 0],
             "content_free": 1, "unlabeled": 1, "draws": {str(shots): draw}}
    (folder / "scores.json").write_text(json.dumps(saved))
    return str(folder)


def test_fewshot_draws_refuses_to_summarize_ranges_scored_with_other_settings(tmp_path, capsys):
    draws = load_benchmark("fewshot_draws")
    four, eight = fewshot_scores(tmp_path / "a", 4), fewshot_scores(tmp_path / "b", 8)
    draws.summarize([four], subset=8)
    out = capsys.readouterr().out
    assert "| 4 |" in out and "dev over 1 draw(s) 100.00% (min" in out  # one draw: no spread
    with pytest.raises(SystemExit, match="'shots': 8.*'shots': 4.*same --draws, --shots"):
        draws.summarize([four, eight], subset=8)
