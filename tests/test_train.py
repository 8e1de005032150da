"""The training loop on a tiny model and a small csv file: it learns, resumes bit for bit, and the
CLI's train / eval / predict work end to end."""

from __future__ import annotations

import csv
import json
import shutil
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

import deltatune.training.loop as train_module
from deltatune.cli import main as cli_main
from deltatune.errors import TrainingError
from deltatune.training.loop import TrainConfig, train


def config(model_dir, data_file, out, **overrides) -> TrainConfig:
    values = dict(
        model=str(model_dir), task="csv", method="lora", out=str(out),
        task_options={"path": str(data_file), "text_columns": ["review"], "label_column": "sentiment"},
        max_steps=8, batch_size=8, lr=5e-3, seed=3, progress=False, log_every=2,
    )
    values.update(overrides)
    return TrainConfig(**values)


def test_training_learns_and_writes_its_run_folder(tiny_model_dir, sentiment_csv, tmp_path):
    summary = train(config(tiny_model_dir, sentiment_csv, tmp_path / "run", max_steps=90, lr=2e-3,
                           method="full", warmup_ratio=0.0))
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0], losses
    assert (run / "delta" / "delta.safetensors").is_file() and (run / "summary.json").is_file()
    n_train = 115  # 128 rows less a seeded 10% (13) (the csv task holds a seeded 10% out as dev)
    assert summary["steps"] == 90 and summary["examples_seen"] == 6 * n_train  # 15 steps per epoch
    assert summary["final"]["accuracy"] > 0.9  # the sentiment word decides the label
    evals = [r for r in records if "eval" in r]  # time-to-quality: when each evaluation happened
    assert [r["step"] for r in evals] == [15 * e for e in range(1, 7)]  # once per epoch
    assert all(0 < r["eval_seconds"] < r["seconds"] <= summary["seconds"] for r in evals)
    assert summary["seconds"] == pytest.approx(summary["train_seconds"] + summary["eval_seconds"], abs=0.02)
    assert [r["seconds"] for r in evals] == sorted(r["seconds"] for r in evals)


@pytest.mark.parametrize("max_steps", [4, 3])  # the last step evaluated in the loop (4), or after it (3)
def test_train_seconds_leave_out_every_evaluation(tiny_model_dir, sentiment_csv, tmp_path, monkeypatch, max_steps):
    """summary.json: train_seconds is the training steps' time whether the final evaluation ran inside the loop or
    after it; eval_seconds holds every evaluation; seconds both. Each evaluation is made to take 0.6 s."""
    import time

    scoring = train_module.evaluate_sharded

    def slow(*args, **kwargs):
        time.sleep(0.6)
        return scoring(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_sharded", slow)
    summary = train(config(tiny_model_dir, sentiment_csv, tmp_path / "run", max_steps=max_steps, eval_every=2))
    evaluations = sum("eval" in json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open())
    assert evaluations == 2  # steps 2 and 4, or 2 and 3
    assert summary["eval_seconds"] >= 1.2 and summary["train_seconds"] < 0.6, summary
    assert summary["seconds"] == pytest.approx(summary["train_seconds"] + summary["eval_seconds"], abs=0.02)


@contextmanager
def optimizer_steps(fail_at: int | None = None):
    """Counts the optimizer steps taken inside the block (torch's global step hook: independent of the loop's
    code); with `fail_at`, the process "crashes" just before that step (1-based). Steps with all-zero
    gradients are not counted: loading an optimizer state takes one to create the state tensors."""
    taken = []

    def count(optimizer, args, kwargs):
        gradients = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not any(g.abs().sum() > 0 for g in gradients):
            return
        if fail_at is not None and len(taken) + 1 == fail_at:
            raise RuntimeError("simulated crash")
        taken.append(1)

    handle = register_optimizer_step_pre_hook(count)
    try:
        yield taken
    finally:
        handle.remove()


def scale_exp_avg(value, factor: float):
    """The optimizer state with every Adam first moment (exp_avg) multiplied by `factor`."""
    if isinstance(value, dict):
        return {k: v * factor if k == "exp_avg" else scale_exp_avg(v, factor) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(scale_exp_avg(v, factor) for v in value)
    return value


# prefix: the checkpoint holds the MLP it trains through; PiSSA: the resumed run recomputes the same frozen A0, B0
@pytest.mark.parametrize("method,options", [("lora", {}), ("prefix", {}), ("lora", {"init": "pissa", "r": 4})],
                         ids=["lora", "prefix", "lora-pissa"])
def test_resume_reads_the_checkpoint_and_gives_the_same_delta_bit_for_bit(tiny_model_dir, sentiment_csv, tmp_path,
                                                                          method, options):
    """Killed after step 6 with a checkpoint at step 4: the resumed process takes only steps 5-8 and ends
    with the uninterrupted run's delta, bit for bit; the same checkpoint with its Adam moments scaled
    ends elsewhere (so the optimizer state is read, not rebuilt)."""
    train(config(tiny_model_dir, sentiment_csv, tmp_path / "straight", method=method, method_options=options))
    interrupted = config(tiny_model_dir, sentiment_csv, tmp_path / "resumed", checkpoint_every=4, method=method,
                         method_options=options)
    with pytest.raises(RuntimeError, match="simulated crash"), optimizer_steps(fail_at=7):
        train(interrupted)
    shutil.copytree(tmp_path / "resumed", tmp_path / "perturbed")
    interrupted.resume = True
    with optimizer_steps() as taken:
        summary = train(interrupted)
    assert len(taken) == 4 and summary["steps"] == 8  # steps 5..8 only: the step-4 checkpoint was read

    straight = load_file(tmp_path / "straight" / "delta" / "delta.safetensors")
    resumed = load_file(tmp_path / "resumed" / "delta" / "delta.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key

    (state_file,) = (tmp_path / "perturbed" / "checkpoint").glob("*.pt")
    state = torch.load(state_file, weights_only=True)
    torch.save(scale_exp_avg(state, 4.0), state_file)
    train(config(tiny_model_dir, sentiment_csv, tmp_path / "perturbed", checkpoint_every=4, resume=True,
                 method=method, method_options=options))
    perturbed = load_file(tmp_path / "perturbed" / "delta" / "delta.safetensors")
    assert any(not torch.allclose(perturbed[key], straight[key], atol=1e-6) for key in straight)


def test_nonfinite_loss_stops_with_the_step(tiny_model_dir, sentiment_csv, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "task_loss", lambda task, outputs, labels: outputs.logits.sum() * float("nan"))
    with pytest.raises(TrainingError, match="loss is nan at step 0"):
        train(config(tiny_model_dir, sentiment_csv, tmp_path / "run"))


@pytest.mark.parametrize("failing_evaluation", [1, 2])
def test_an_evaluation_error_never_loses_the_trained_delta(tiny_model_dir, sentiment_csv, tmp_path, monkeypatch,
                                                           failing_evaluation):
    """Evaluation fails at step 8 (the first evaluation, or the second after step 4 scored): the step-8 delta is
    saved (in OUT/delta, or beside the best scored one in OUT/last-delta) and the error names the cause and the
    folder."""
    scored = train_module.evaluate_sharded
    calls = []

    def evaluate_or_fail(*args):
        calls.append(1)
        if len(calls) == failing_evaluation:
            raise ValueError("no predictions to score")
        return scored(*args)

    monkeypatch.setattr(train_module, "evaluate_sharded", evaluate_or_fail)
    out = tmp_path / "run"
    kept = out / ("delta" if failing_evaluation == 1 else "last-delta")
    with pytest.raises(TrainingError, match=rf"evaluating step 8 failed \(ValueError: no predictions to score\); "
                                            rf"the delta of step 8, not scored, is saved in {kept}"):
        train(config(tiny_model_dir, sentiment_csv, out, eval_every=8 // failing_evaluation))
    step_8 = load_file(kept / "delta.safetensors")
    lora_B = [key for key in step_8 if key.endswith("lora_B")]
    assert lora_B and all(step_8[key].abs().sum() > 0 for key in lora_B)  # trained (B starts at zero)
    if failing_evaluation == 2:  # the step-4 delta, scored, stays where it was
        step_4 = load_file(out / "delta" / "delta.safetensors")
        assert set(step_4) == set(step_8) and not all(torch.equal(step_4[k], step_8[k]) for k in lora_B)


def test_cli_train_eval_predict(tiny_model_dir, sentiment_csv, tmp_path, capsys):
    """`eval` and `predict` give what the saved delta on a fresh transformers model gives, example by example
    (reviews of different lengths: batching sorts them by length, and must put every score back in place)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import deltatune

    rows = sentiment_csv.read_text().splitlines()
    sentiment_csv.write_text("\n".join([rows[0]] + [row.replace("the movie", "the movie" + " really" * (i % 4), 1)
                                                    for i, row in enumerate(rows[1:])]) + "\n")
    data = ["--data-file", str(sentiment_csv), "--text-columns", "review", "--label-column", "sentiment"]
    code = cli_main(["train", "--model", str(tiny_model_dir), "--task", "csv", "--method", "full",
                     "--out", str(tmp_path / "run"), "--max-steps", "90", "--lr", "2e-3", "--warmup-ratio", "0",
                     "--batch-size", "8", "--no-progress", *data])
    assert code == 0
    capsys.readouterr()
    delta = tmp_path / "run" / "delta"
    assert cli_main(["eval", "--model", str(tiny_model_dir), "--delta", str(delta), "--task", "csv", *data]) == 0
    evaluation = json.loads(capsys.readouterr().out)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = deltatune.load_delta(AutoModelForSequenceClassification.from_pretrained(tiny_model_dir), delta).eval()

    def probabilities(text: str) -> torch.Tensor:
        with torch.no_grad():
            return model(**tokenizer(text, return_tensors="pt")).logits[0].softmax(-1)

    # a file given to eval is scored whole (not the 10% training held out of it), its rows counted
    with open(sentiment_csv, newline="") as handle:
        table = [(row["review"], ["negative", "positive"].index(row["sentiment"])) for row in csv.DictReader(handle)]
    predictions = [int(probabilities(text).argmax()) for text, _ in table]
    assert len(set(predictions)) == 2  # both classes predicted: the order of rows matters
    correct = sum(p == label for p, (_, label) in zip(predictions, table, strict=True))
    assert evaluation["rows"] == {"dev": 128}
    assert evaluation["dev"]["accuracy"] == pytest.approx(correct / 128)
    # a file holding one of the classes is scored against the ids the delta learnt (not re-numbered from 0),
    # and the run folder stands for its delta
    positive = tmp_path / "positive.csv"
    positive.write_text("review,sentiment\n" + "".join(f"{text},positive\n" for text, label in table[:40] if label))
    assert cli_main(["eval", "--model", str(tiny_model_dir), "--delta", str(tmp_path / "run"), "--task", "csv",
                     "--data-file", str(positive), "--text-columns", "review", "--label-column", "sentiment"]) == 0
    evaluation = json.loads(capsys.readouterr().out)
    said_positive = [p for p, (_, label) in zip(predictions[:40], table[:40], strict=True) if label]
    assert evaluation["rows"] == {"dev": 20} and evaluation["delta"] == str(delta)
    assert evaluation["dev"]["accuracy"] == pytest.approx(sum(said_positive) / 20)

    assert cli_main(["predict", "--model", str(tiny_model_dir), "--delta", str(delta),
                     "--task", "csv", *data, "the movie was great ."]) == 0
    prediction = json.loads(capsys.readouterr().out.strip())
    expected = probabilities("the movie was great .")
    assert prediction["label"] == ["negative", "positive"][int(expected.argmax())]
    assert [prediction["probabilities"][name] for name in ("negative", "positive")] == \
        pytest.approx(expected.tolist(), abs=0.006)  # printed with two decimals


def test_precision_auto_picks_bf16_only_with_native_support(monkeypatch):
    from deltatune.training.loop import resolve_precision

    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for avx512_bf16, amx, expected in [(True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert resolve_precision("auto") == expected
    with pytest.raises(TrainingError, match="choose fp32, bf16 or auto"):
        resolve_precision("fp16")


def test_cli_train_defaults_to_auto_precision_and_records_what_ran(tiny_model_dir, sentiment_csv, tmp_path):
    """The CLI's default is the fast path where the hardware has it; the summary says which precision ran,
    and the bf16 run's delta gives outputs close to the fp32 run's (same seed, same data)."""
    from deltatune.training.loop import resolve_precision

    runs = {}
    for precision in ("auto", "fp32"):
        out = tmp_path / precision
        assert cli_main(["train", "--model", str(tiny_model_dir), "--task", "csv", "--method", "lora",
                         "--data-file", str(sentiment_csv), "--text-columns", "review", "--label-column", "sentiment",
                         "--max-steps", "6", "--batch-size", "8", "--seed", "1", "--no-progress", "--out", str(out)]
                        + ([] if precision == "auto" else ["--precision", "fp32"])) == 0
        runs[precision] = json.loads((out / "summary.json").read_text())
    assert runs["auto"]["precision"] == resolve_precision("auto") and runs["fp32"]["precision"] == "fp32"
    fast = load_file(tmp_path / "auto" / "delta" / "delta.safetensors")
    exact = load_file(tmp_path / "fp32" / "delta" / "delta.safetensors")
    assert fast.keys() == exact.keys()
    for key in fast:  # six steps apart only by bf16 rounding in the matrix products
        torch.testing.assert_close(fast[key], exact[key], atol=2e-3, rtol=0.05)


def test_bf16_training_moves_the_delta_as_fp32_does(tiny_model_dir, sentiment_csv, tmp_path):
    """bf16 autocast changes only the rounding of the matrix products: after six steps its delta has moved
    from the initial delta about as far as the fp32 run's, and the two differ by much less than that move
    (a bf16 run that never stepped would sit at the initial delta)."""
    deltas = {}
    for name, precision, lr in [("initial", "fp32", 1e-30), ("fp32", "fp32", 5e-3), ("bf16", "bf16", 5e-3)]:
        train(config(tiny_model_dir, sentiment_csv, tmp_path / name, max_steps=6, seed=1, precision=precision,
                     lr=lr))
        deltas[name] = load_file(tmp_path / name / "delta" / "delta.safetensors")

    def distance(a: str, b: str) -> float:
        return sum(float((deltas[a][k] - deltas[b][k]).norm() ** 2) for k in deltas[a]) ** 0.5

    moved = distance("fp32", "initial")
    assert moved > 1e-2  # six steps of 5e-3 on the LoRA B matrices and the head
    assert distance("bf16", "initial") == pytest.approx(moved, rel=0.1)
    assert distance("bf16", "fp32") < 0.1 * moved
