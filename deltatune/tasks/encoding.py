"""From task examples to model batches: tokenise once, then batch with dynamic padding.

Classification/regression examples become `input_ids` (+ `token_type_ids`) and a `labels` value.
Generation examples (data-to-text with a decoder) become one sequence `prompt + target + eos` whose
loss is on the target tokens only (prompt positions are labelled -100).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from deltatune.core.architectures import ROBERTA_LIKE
from deltatune.tasks import Task
from deltatune.tasks.generation import generation_prompt

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """Token ids of one example, plus its label (class id, score, or per-token labels)."""

    input_ids: list[int]
    token_type_ids: list[int] | None
    label: int | float | list[int] | None


def max_model_length(model, tokenizer, requested: int) -> int:
    """`requested`, capped at what the model's position embeddings allow (minus a prompt's length)."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if getattr(config, "model_type", None) in ROBERTA_LIKE and limit:
        limit -= 2  # RoBERTa numbers positions from padding_idx + 1
    reserved = sum(getattr(c, "reserved_positions", 0) for c in getattr(model, "components", dict)().values())
    if limit and requested > limit - reserved:
        return limit - reserved
    return requested


def encode(task: Task, examples: list[dict], tokenizer, max_length: int, for_training: bool = True) -> list[Encoded]:
    """Tokenise every example once (the training loop never tokenises again)."""
    if task.prompt_format is not None:  # the user's generation file: its prompt format and loss mask
        from deltatune.tasks.generation import encode_examples

        return [Encoded(ids, None, labels)
                for ids, labels in encode_examples(task.prompt_format, examples, tokenizer, max_length, for_training)]
    if task.kind == "generation":
        return [_encode_generation(e, tokenizer, max_length, for_training) for e in examples]
    texts = [e["text"] for e in examples]
    pairs = [e.get("text_pair") for e in examples]
    has_pairs = any(p is not None for p in pairs)
    batch = tokenizer(texts, pairs if has_pairs else None, truncation=True, max_length=max_length)
    encoded = []
    for i, example in enumerate(examples):
        token_types = batch["token_type_ids"][i] if "token_type_ids" in batch else None
        encoded.append(Encoded(batch["input_ids"][i], token_types, example.get("label")))
    return encoded


def _encode_generation(example: dict, tokenizer, max_length: int, for_training: bool) -> Encoded:
    prompt_ids = tokenizer(generation_prompt(example["source"]), add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
    if not for_training:
        return Encoded(prompt_ids[-max_length:], None, None)
    target_ids = tokenizer(" " + example["target"], add_special_tokens=False)["input_ids"]
    target_ids.append(tokenizer.eos_token_id)
    ids = prompt_ids + target_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + target_ids
    if len(ids) > max_length:
        warnings.warn(f"a training sequence of {len(ids)} tokens was cut to {max_length}", stacklevel=2)
        ids, labels = ids[:max_length], labels[:max_length]
    return Encoded(ids, None, labels)


def collate(items: list[Encoded], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a list of encoded examples to the longest one (dynamic padding)."""
    width = max(len(item.input_ids) for item in items)

    def pad(values: list, fill) -> list:
        padding = [fill] * (width - len(values))
        return padding + values if padding_side == "left" else values + padding

    batch = {
        "input_ids": torch.tensor([pad(i.input_ids, pad_id) for i in items]),
        "attention_mask": torch.tensor([pad([1] * len(i.input_ids), 0) for i in items]),
    }
    if items[0].token_type_ids is not None:
        batch["token_type_ids"] = torch.tensor([pad(i.token_type_ids, 0) for i in items])
    label = items[0].label
    if isinstance(label, list):
        batch["labels"] = torch.tensor([pad(i.label, IGNORE_INDEX) for i in items])
    elif isinstance(label, float):
        batch["labels"] = torch.tensor([float(i.label) for i in items])
    elif label is not None:
        batch["labels"] = torch.tensor([int(i.label) for i in items])
    return batch


def epoch_batches(
    num_examples: int, batch_size: int, seed: int, epoch: int, lengths: list[int] | None = None
) -> list[list[int]]:
    """The batches (lists of example indices) of one epoch, in a fixed order given (seed, epoch).

    With `lengths`, examples are grouped by length inside windows of 50 batches before batching
    (length bucketing: less padding, same examples per epoch), then the batches are shuffled.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    if lengths is not None:
        window = batch_size * 50
        order = [
            index
            for start in range(0, num_examples, window)
            for index in sorted(order[start : start + window], key=lambda i: lengths[i])
        ]
    batches = [order[i : i + batch_size] for i in range(0, num_examples, batch_size)]
    if lengths is not None:
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in shuffled]
    return batches
