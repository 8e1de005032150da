"""Training on several processes gives the one-process delta: two CPU processes (gloo) launched with
torchrun, with DDP and with FSDP (FSDP2 `fully_shard`), and gradient checkpointing for every method.

The two-process runs use a global batch of 7, so the ranks' slices differ (4 + 3) and the loss weighting
that keeps the update equal to the one-process update is exercised. They use the tiny BERT saved with
dropout 0: with dropout, each rank draws the masks for its slice from its own RNG stream, and no split of
the batch over two processes reproduces the masks one process draws for the whole batch, so the deltas
would differ by the dropout noise, not by anything training does. (Gradient checkpointing, tested with
dropout on, recomputes under the RNG state it saved, and is exact.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import WORDS_NEGATIVE, WORDS_POSITIVE, make_model
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from deltatune.methods.registry import METHODS
from deltatune.testing import tiny_model, tiny_tokenizer
from deltatune.training.loop import TrainConfig, train

STEPS, BATCH = 6, 7
COMMON = ["--max-steps", str(STEPS), "--batch-size", str(BATCH), "--lr", "5e-3", "--seed", "3", "--no-progress",
          "--checkpoint-every", "4", "--precision", "fp32"]  # compared with fp32 one-process runs
# name -> extra `deltatune train` arguments; each run is compared with the one-process run of its method
RUNS = {
    "ddp-lora": ["--method", "lora"],
    "ddp-bitfit": ["--method", "bitfit", "--grad-checkpointing"],  # DDP + non-reentrant checkpointing
    "fsdp-lora": ["--method", "lora", "--fsdp"],
    "fsdp-bitfit": ["--method", "bitfit", "--fsdp"],
}
# Run in both processes by torchrun: `deltatune train` through the CLI's own entry point (what
# `python -m deltatune.cli` calls), several runs in one launch as starting processes is the slow part.
# Last, the FSDP LoRA run is resumed from its step-4 checkpoint (sharded state saved whole, loaded back).
DRIVER = """
import json, shutil, sys
from pathlib import Path
import torch
import torch.distributed as dist
from deltatune.cli import main
from deltatune.training.loop import train
from test_distributed import gradient_runs, optimizer_steps, recorded_gradients

common, runs, data, out = json.loads(sys.argv[1])
for name, extra in runs.items():
    assert main(["train", *data, *common, *extra, "--out", f"{out}/{name}"]) == 0, name
if dist.get_rank() == 0:
    shutil.copytree(f"{out}/fsdp-lora/checkpoint", f"{out}/fsdp-lora-resumed/checkpoint")
dist.barrier()
with optimizer_steps() as taken:
    assert main(["train", *data, *common, *runs["fsdp-lora"], "--out", f"{out}/fsdp-lora-resumed", "--resume"]) == 0
if dist.get_rank() == 0:  # the step-4 checkpoint was read: only steps 5 and 6 ran
    (Path(out) / "fsdp-lora-resumed" / "steps.json").write_text(json.dumps(len(taken)))
for name, config in gradient_runs(Path(out)).items():  # DDP: the gradients themselves, step by step
    with recorded_gradients() as gradients:
        train(config)
    if dist.get_rank() == 0:
        torch.save(gradients, Path(config.out) / "gradients.pt")
"""


@contextmanager
def recorded_gradients():
    """Every optimizer step's gradients (before the update, after any clipping), in parameter order:
    torch's global step hook, whatever the training loop's code. Steps with all-zero gradients (loading an
    optimizer state takes one) are left out."""
    steps = []

    def record(optimizer, args, kwargs):
        gradients = []
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                gradient = parameter.grad
                if gradient is not None and hasattr(gradient, "full_tensor"):  # FSDP: a DTensor shard
                    gradient = gradient.full_tensor()
                gradients.append(None if gradient is None else gradient.detach().to("cpu", copy=True))
        if any(g is not None and g.abs().sum() > 0 for g in gradients):
            steps.append(gradients)

    handle = register_optimizer_step_pre_hook(record)
    try:
        yield steps
    finally:
        handle.remove()


@contextmanager
def optimizer_steps():
    with recorded_gradients() as steps:
        yield steps


def write_e2e(root: Path) -> Path:
    """A data folder with a small E2E dev set: references of very different lengths, so the two ranks'
    slices of a batch hold different numbers of target tokens."""
    rows = ["mr,ref"]
    for i in range(24):
        words = " and".join([" it is good"] * (1 + i % 5))
        rows.append(f'"name[Place {i}], food[Thai]","Place {i} serves Thai food{words}."')
    (root / "e2e").mkdir(parents=True, exist_ok=True)
    (root / "e2e" / "devset.csv").write_text("\n".join(rows) + "\n")
    return root


def write_scores(path: Path) -> Path:
    """Reviews with a real-valued score (a regression task): every example gets its own prediction."""
    generator = torch.Generator().manual_seed(1)
    lines = ["review,score"]
    for i in range(128):
        words = WORDS_POSITIVE if i % 2 else WORDS_NEGATIVE
        word = words[int(torch.randint(len(words), (1,), generator=generator))]
        lines.append(f"the movie{' really' * (i % 3)} was {word} .,{(i % 2) * 3 + (i % 7) / 7:.3f}")
    path.write_text("\n".join(lines) + "\n")
    return path


def gradient_runs(root: Path) -> dict[str, TrainConfig]:
    """Two steps each, no clipping (it would hide a gradient scaled by any factor), global batch 7:
    LoRA on the sentiment csv, LoRA on a regression csv (its evaluation gathers 13 distinct predictions),
    and LoRA on a generation task (loss averaged over target tokens, not examples)."""
    common = dict(max_steps=2, batch_size=BATCH, lr=5e-3, seed=3, progress=False, max_grad_norm=0.0,
                  precision="fp32")
    classify = {"path": str(root / "reviews.csv"), "text_columns": ["review"], "label_column": "sentiment"}
    regress = {"path": str(root / "scores.csv"), "text_columns": ["review"], "label_column": "score"}
    return {
        "grad-classification": TrainConfig(model=str(root / "model"), task="csv", method="lora",
                                           out=str(root / "grad-classification"), task_options=classify, **common),
        "grad-regression": TrainConfig(model=str(root / "regression-model"), task="csv", method="lora",
                                       out=str(root / "grad-regression"), task_options=regress, **common),
        "grad-generation": TrainConfig(model=str(root / "causal-model"), task="e2e", method="lora",
                                       out=str(root / "grad-generation"), data_dir=str(root / "e2e-data"),
                                       eval_limit=2, max_length=48, **common),
    }


def write_reviews(path: Path) -> Path:
    generator = torch.Generator().manual_seed(0)
    lines = ["review,sentiment"]
    for i in range(128):
        words = WORDS_POSITIVE if i % 2 else WORDS_NEGATIVE
        word = words[int(torch.randint(len(words), (1,), generator=generator))]
        lines.append(f"the movie was {word} .,{'positive' if i % 2 else 'negative'}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The one-process runs (here) and the two-process runs (torchrun), all in one folder."""
    root = tmp_path_factory.mktemp("distributed")
    model = make_model("bert")
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    reviews = write_reviews(root / "reviews.csv")
    write_scores(root / "scores.csv")
    regression = make_model("bert", kind="regression")
    regression.config.hidden_dropout_prob = regression.config.attention_probs_dropout_prob = 0.0
    regression.save_pretrained(root / "regression-model")
    tiny_tokenizer().save_pretrained(root / "regression-model")
    torch.manual_seed(0)
    causal = tiny_model("gpt2", "causal-lm")
    causal.config.resid_pdrop = causal.config.embd_pdrop = causal.config.attn_pdrop = 0.0
    causal.save_pretrained(root / "causal-model")
    tiny_tokenizer().save_pretrained(root / "causal-model")
    write_e2e(root / "e2e-data")
    data = ["--model", str(root / "model"), "--task", "csv", "--data-file", str(reviews),
            "--text-columns", "review", "--label-column", "sentiment"]

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1",  # the driver imports this file's helpers
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    (root / "driver.py").write_text(textwrap.dedent(DRIVER))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(root / "driver.py"), json.dumps([COMMON, RUNS, data, str(root)])]  # --standalone: a free port
    launched = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    for method in ("lora", "bitfit"):  # meanwhile, the one-process references
        train(TrainConfig(
            model=str(root / "model"), task="csv", method=method, out=str(root / f"single-{method}"),
            task_options={"path": str(reviews), "text_columns": ["review"], "label_column": "sentiment"},
            max_steps=STEPS, batch_size=BATCH, lr=5e-3, seed=3, progress=False, checkpoint_every=4,
        ))
    for name, config in gradient_runs(root).items():
        config.out = str(root / f"single-{name}")
        with recorded_gradients() as gradients:
            train(config)
        torch.save(gradients, root / f"single-{name}" / "gradients.pt")
    try:
        output, _ = launched.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        launched.kill()
        output, _ = launched.communicate()
        pytest.fail(f"torchrun timed out:\n{output[-4000:]}")
    assert launched.returncode == 0, output[-4000:]
    return root


def assert_same_delta(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor], atol: float) -> None:
    assert sorted(actual) == sorted(expected)
    for key in expected:
        assert actual[key].shape == expected[key].shape, key
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=0, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("name", [*RUNS, "fsdp-lora-resumed"])
def test_two_processes_train_the_one_process_delta(runs, name):
    method = (RUNS.get(name) or RUNS["fsdp-lora"])[1]
    single, distributed = runs / f"single-{method}", runs / name
    expected = load_file(single / "delta" / "delta.safetensors")
    assert_same_delta(expected, load_file(distributed / "delta" / "delta.safetensors"), atol=1e-5)
    # the step-4 checkpoint holds the whole delta too (under FSDP: gathered from the shards)
    assert_same_delta(load_file(single / "checkpoint" / "delta.safetensors"),
                      load_file(distributed / "checkpoint" / "delta.safetensors"), atol=1e-5)
    assert json.loads((distributed / "delta" / "delta.json").read_text())["num_parameters"] == \
        sum(t.numel() for t in expected.values())

    summary, reference = (json.loads((run / "summary.json").read_text()) for run in (distributed, single))
    assert summary["processes"] == 2 and summary["steps"] == STEPS
    assert summary["examples_seen"] == reference["examples_seen"]  # the global batches, counted once
    assert summary["final"] == reference["final"]  # evaluation split over the ranks, then gathered
    if name == "fsdp-lora-resumed":  # the checkpoint was read: the resumed processes took steps 5 and 6 only
        assert json.loads((distributed / "steps.json").read_text()) == STEPS - 4
    if name in RUNS:  # (a resumed run's logged loss averages only the steps it ran)
        losses = [[r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
                  for run in (distributed, single)]
        assert losses[0] == pytest.approx(losses[1], abs=1e-6)  # the global batch's loss, logged once by rank 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["grad-classification", "grad-regression", "grad-generation"])
def test_two_processes_compute_the_one_process_gradients(runs, name):
    """Each step's all-reduced gradients equal the one-process gradients of the same global batch (7
    examples split 4 + 3; for generation, slices with different numbers of target tokens), and the
    evaluation gathered from the ranks scores like the one-process evaluation (regression: 13 distinct
    predictions, so an evaluation gathered out of order correlates differently with the labels)."""
    single = torch.load(runs / f"single-{name}" / "gradients.pt", weights_only=True)
    distributed = torch.load(runs / name / "gradients.pt", weights_only=True)
    assert len(single) == len(distributed) == 2
    for step, (expected, actual) in enumerate(zip(single, distributed, strict=True)):
        assert len(expected) == len(actual)
        for index, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert (e is None) == (a is None), (step, index)
            if e is not None:
                torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-4, msg=f"step {step}, parameter {index}")
    summary, reference = (json.loads((runs / run / "summary.json").read_text()) for run in (name, f"single-{name}"))
    assert summary["processes"] == 2
    if name == "grad-regression":  # (Spearman's ranks of near-equal predictions flip with float rounding)
        assert summary["final"]["pearson"] == pytest.approx(reference["final"]["pearson"], abs=1e-4)
        assert summary["final"]["pearson"] != pytest.approx(0.0, abs=1e-3)
    else:
        assert summary["final"] == pytest.approx(reference["final"], abs=1e-4)  # the deltas differ by rounding


# prefix tuning refuses checkpointing by name (its prefixes ride in the key/value cache, which transformers'
# checkpointed layers drop): tests/test_prefix.py checks the refusal
@pytest.mark.parametrize("method", [m for m in METHODS if m != "prefix"])
def test_gradient_checkpointing_gives_the_same_step(method, tiny_model_dir, sentiment_csv, tmp_path):
    """One step with non-reentrant checkpointing (dropout on: it recomputes under the saved RNG state): the
    same gradients (a step of Adam alone is nearly sign-like and would hide a gradient scaled by 2)."""
    deltas, gradients = [], []
    for checkpointing in (False, True):
        out = tmp_path / f"checkpointing-{checkpointing}"
        with recorded_gradients() as steps:
            train(TrainConfig(
                model=str(tiny_model_dir), task="csv", method=method, out=str(out),
                task_options={"path": str(sentiment_csv), "text_columns": ["review"], "label_column": "sentiment"},
                max_steps=1, batch_size=8, lr=5e-3, seed=3, progress=False, grad_checkpointing=checkpointing,
                max_grad_norm=0.0,  # unclipped: the gradients themselves are compared
            ))
        deltas.append(load_file(out / "delta" / "delta.safetensors"))
        gradients.append(steps)
    assert_same_delta(deltas[0], deltas[1], atol=1e-6)
    (plain,), (recomputed,) = gradients
    assert len(plain) == len(recomputed)
    for expected, actual in zip(plain, recomputed, strict=True):
        assert (expected is None) == (actual is None)
        if expected is not None:
            torch.testing.assert_close(actual, expected, atol=1e-7, rtol=1e-5)
