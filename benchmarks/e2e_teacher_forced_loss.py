"""Teacher-forced loss of saved E2E deltas on training pairs and on test references: does a delta that decodes
badly fit its training data (a method that generalizes poorly) or not (a delta that is not the trained model)?

    python benchmarks/e2e_teacher_forced_loss.py --model smollm2 RUN/delta [RUN/delta ...]

The base model alone is the first row. Used for docs/results/e2e_table.md (FT^Top2 vs LoRA).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from deltatune.core.lm_loss import target_only_loss
from deltatune.delta import load_delta
from deltatune.models import load_model, load_tokenizer
from deltatune.tasks.e2e import e2e_task, load_e2e
from deltatune.tasks.encoding import IGNORE_INDEX, collate, encode


def mean_token_loss(model, tokenizer, examples: list[dict], batch_size: int = 16) -> float:
    """The training objective (`lm_loss.target_only_loss`) as a mean over every target token, bf16 autocast."""
    items = encode(e2e_task(), examples, tokenizer, max_length=128, for_training=True)
    total, count = 0.0, 0
    for start in range(0, len(items), batch_size):
        batch = collate(items[start:start + batch_size], tokenizer.pad_token_id)
        labels = batch.pop("labels")
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = target_only_loss(model, batch, labels).item()
        tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
        total, count = total + loss * tokens, count + tokens
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("deltas", nargs="+")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--examples", type=int, default=64)
    args = parser.parse_args()
    data = Path(os.environ.get("DELTATUNE_DATA", "../shared/data"))
    tokenizer = load_tokenizer(args.model)
    train = load_e2e("train", data)[: args.examples]
    test = [{"source": e["source"], "target": e["references"][0]} for e in load_e2e("test", data)[::3]][: args.examples]
    print(f"{'delta':<60}{'train loss':>12}{'test loss':>12}{'gap':>8}")
    for path in ["(base)", *args.deltas]:
        model = load_model(args.model, kind="causal-lm")
        if path != "(base)":
            load_delta(model, path)
        on_train, on_test = mean_token_loss(model, tokenizer, train), mean_token_loss(model, tokenizer, test)
        print(f"{path:<60}{on_train:>12.3f}{on_test:>12.3f}{on_test - on_train:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
