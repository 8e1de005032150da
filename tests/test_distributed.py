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
from pathlib import Path

import pytest
import torch
from conftest import WORDS_NEGATIVE, WORDS_POSITIVE, make_model
from safetensors.torch import load_file

from deltatune.models import tiny_tokenizer
from deltatune.registry import METHODS
from deltatune.train import TrainConfig, train

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
import torch.distributed as dist
from deltatune.cli import main

common, runs, data, out = json.loads(sys.argv[1])
for name, extra in runs.items():
    assert main(["train", *data, *common, *extra, "--out", f"{out}/{name}"]) == 0, name
if dist.get_rank() == 0:
    shutil.copytree(f"{out}/fsdp-lora/checkpoint", f"{out}/fsdp-lora-resumed/checkpoint")
dist.barrier()
assert main(["train", *data, *common, *runs["fsdp-lora"], "--out", f"{out}/fsdp-lora-resumed", "--resume"]) == 0
"""


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
    data = ["--model", str(root / "model"), "--task", "csv", "--data-file", str(reviews),
            "--text-columns", "review", "--label-column", "sentiment"]

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
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
    try:
        output, _ = launched.communicate(timeout=240)
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
    if name in RUNS:  # (a resumed run's logged loss averages only the steps it ran)
        losses = [[r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
                  for run in (distributed, single)]
        assert losses[0] == pytest.approx(losses[1], abs=1e-6)  # the global batch's loss, logged once by rank 0


# prefix tuning refuses checkpointing by name (its prefixes ride in the key/value cache, which transformers'
# checkpointed layers drop): tests/test_prefix.py checks the refusal
@pytest.mark.parametrize("method", [m for m in METHODS if m != "prefix"])
def test_gradient_checkpointing_gives_the_same_step(method, tiny_model_dir, sentiment_csv, tmp_path):
    """One step with non-reentrant checkpointing (dropout on: it recomputes under the saved RNG state)."""
    deltas = []
    for checkpointing in (False, True):
        out = tmp_path / f"checkpointing-{checkpointing}"
        train(TrainConfig(
            model=str(tiny_model_dir), task="csv", method=method, out=str(out),
            task_options={"path": str(sentiment_csv), "text_columns": ["review"], "label_column": "sentiment"},
            max_steps=1, batch_size=8, lr=5e-3, seed=3, progress=False, grad_checkpointing=checkpointing,
        ))
        deltas.append(load_file(out / "delta" / "delta.safetensors"))
    assert_same_delta(deltas[0], deltas[1], atol=1e-6)
