"""Scoring a model with its active delta on a task: classification, regression and generation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deltatune.errors import DeltaTuneError
from deltatune.tasks import Task
from deltatune.tasks.encoding import Encoded, collate, encode, max_model_length
from deltatune.tasks.generation import generation_prompt


def task_loss(task: Task, outputs, labels: torch.Tensor) -> torch.Tensor:
    """The loss computed from logits here (not by the model), so any head shape works."""
    logits = outputs.logits
    if task.kind == "classification":
        return F.cross_entropy(logits.float(), labels)
    if task.kind == "regression":
        return F.mse_loss(logits.float().squeeze(-1), labels.float())
    # causal LM: predict token t+1 from tokens <= t; prompt positions are -100
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:]
    if shifted_logits.shape[1] != shifted_labels.shape[1]:  # a prompt-tuned model returns longer logits
        shifted_logits = shifted_logits[:, -shifted_labels.shape[1] :]
    return F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1))


@torch.no_grad()
def predict_scores(model, items: list[Encoded], pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """Logits of a classification/regression model for every item (batched, sorted by length)."""
    model.eval()
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    outputs: list[torch.Tensor | None] = [None] * len(items)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate([Encoded(items[i].input_ids, items[i].token_type_ids, None) for i in chunk], pad_id)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
        for row, index in enumerate(chunk):
            outputs[index] = logits[row]
    return torch.stack(outputs)


def encode_inputs(tokenizer, inputs: list, max_length: int) -> list[Encoded]:
    """Texts (or [first, second] sentence pairs; all of one kind) tokenised for a classification head."""
    pairs = [tuple(i) if not isinstance(i, str) else (i,) for i in inputs]
    if all(len(p) == 2 for p in pairs):
        encoded = tokenizer([p[0] for p in pairs], [p[1] for p in pairs], truncation=True, max_length=max_length)
    elif all(len(p) == 1 for p in pairs):
        encoded = tokenizer([p[0] for p in pairs], truncation=True, max_length=max_length)
    else:
        raise DeltaTuneError("inputs must be all texts or all [text, text] pairs, not a mix")
    types = encoded.get("token_type_ids")
    return [Encoded(ids, types[i] if types else None, None) for i, ids in enumerate(encoded["input_ids"])]


def label_prediction(text, row: torch.Tensor, labels: list[str] | None, digits: int | None = None) -> dict:
    """One input's prediction from its logits: a label and each label's probability, or a score (a one-output
    head). `row` may be padded with -inf past its head's width (a mixed batch of heads of several widths)."""
    width = len(labels) if labels else int(torch.isfinite(row).sum())
    row = row[:width]
    shown = text if isinstance(text, str) else list(text)
    if width == 1:
        score = row.item()
        return {"input": shown, "score": round(score, digits) if digits is not None else score}
    names = labels or [str(i) for i in range(width)]
    probabilities = [round(p, digits) if digits is not None else p for p in row.softmax(-1).tolist()]
    return {"input": shown, "label": names[int(row.argmax())], "probabilities": dict(zip(names, probabilities))}


def predict_labels(model, tokenizer, inputs: list, labels: list[str] | None = None, max_length: int = 128,
                   digits: int | None = None) -> list[dict]:
    """Predictions of the active task for texts or sentence pairs, as `deltatune predict` prints them and
    `deltatune serve` answers them. `labels`: the label names (default: the task's saved ones)."""
    if labels is None and getattr(model, "active_task", None) is not None:
        labels = model.task_info[model.active_task]["label_names"]
    items = encode_inputs(tokenizer, inputs, max_model_length(model, tokenizer, max_length))
    scores = predict_scores(model, items, tokenizer.pad_token_id)
    return [label_prediction(text, row, labels, digits) for text, row in zip(inputs, scores)]


@torch.no_grad()
def generate_texts(
    model, tokenizer, sources: list[str], batch_size: int = 16, max_new_tokens: int = 64, num_beams: int = 1
) -> list[str]:
    """Greedy (or beam) continuation of each source's prompt, cut at the first newline."""
    model.eval()
    items = [Encoded(tokenizer(generation_prompt(s), add_special_tokens=False)["input_ids"], None, None)
             for s in sources]
    device = next(model.parameters()).device
    texts: list[str] = []
    for start in range(0, len(items), batch_size):
        batch = collate(items[start : start + batch_size], tokenizer.pad_token_id, padding_side="left")
        batch = {k: v.to(device) for k, v in batch.items()}
        generated = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            stop_strings=["\n"], tokenizer=tokenizer,  # only the first line is kept: stop there
        )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        for row in tokenizer.batch_decode(new_tokens, skip_special_tokens=True):
            texts.append(row.strip().split("\n")[0].strip())
    return texts


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS and the model's generation-config EOS ids (a chat model's end of turn)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in [tokenizer.eos_token_id, *configured] if i is not None))


@torch.no_grad()
def generate_completions(
    model, tokenizer, prompts: list[list[int]], batch_size: int = 16, max_new_tokens: int = 128,
    tasks: list[str] | None = None,
) -> list[str]:
    """Greedy completion of each prompt (token ids) up to an end-of-sequence token, decoded without special
    tokens. Batches are left-padded; longest prompts first, so that batches hold similar lengths."""
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    device = next(model.parameters()).device
    texts: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate([Encoded(prompts[i], None, None) for i in chunk], tokenizer.pad_token_id, padding_side="left")
        batch = {k: v.to(device) for k, v in batch.items()}
        options = {"tasks": [tasks[i] for i in chunk]} if tasks is not None else {}
        generated = model.generate(**batch, **options, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(model, tokenizer))
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        for index, text in zip(chunk, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True):
            texts[index] = text.strip()
    return texts


def generation_predictions(model, tokenizer, task: Task, examples: list[dict], max_length: int = 128,
                           batch_size: int = 16) -> list[str]:
    """The model's output for each evaluation example of a generation task (greedy). The user's generation
    files: the prompt their delta was trained with, up to EOS, at most 1.5x the longest reference + 16
    tokens; built-in data-to-text (E2E): `generate_texts`."""
    if task.prompt_format is None:
        return generate_texts(model, tokenizer, [e["source"] for e in examples], batch_size=batch_size)
    prompts = [item.input_ids for item in encode(task, examples, tokenizer, max_length, for_training=False)]
    longest = max((len(tokenizer(r, add_special_tokens=False)["input_ids"]) for e in examples for r in e["references"]),
                  default=48)
    return generate_completions(model, tokenizer, prompts, batch_size, max_new_tokens=int(1.5 * longest) + 16)


def task_predictions(model, tokenizer, task: Task, examples: list[dict], max_length: int = 128,
                     batch_size: int = 64) -> list:
    """The model's prediction for each example under its active delta, as the task's metrics take them: a class
    id, a score, or (generation) a text, generated `batch_size // 4` prompts at a time (generation holds more
    memory per example). One entry for `evaluate`, `deltatune eval` and the ranks of a distributed evaluation."""
    if task.kind == "generation":
        return generation_predictions(model, tokenizer, task, examples, max_length, max(1, batch_size // 4))
    scores = predict_scores(model, encode(task, examples, tokenizer, max_length), tokenizer.pad_token_id, batch_size)
    return scores.squeeze(-1).tolist() if task.kind == "regression" else scores.argmax(-1).tolist()


def task_references(task: Task, examples: list[dict]) -> list:
    """What each example's prediction is scored against: its label, or its reference texts (generation)."""
    return [e["references"] if task.kind == "generation" else e["label"] for e in examples]


def score_predictions(task: Task, examples: list[dict], predictions: list, metrics: list[str] | None = None
                      ) -> dict[str, float]:
    """The task's metrics of `predictions` (one per example): against the references, and (E2E's slot error
    rate) against each example's source."""
    sources = [e.get("source") for e in examples] if task.kind == "generation" else None
    return task.compute_metrics(predictions, task_references(task, examples), metrics=metrics, sources=sources)


def evaluate(
    model, tokenizer, task: Task, examples: list[dict], max_length: int = 128, batch_size: int = 64,
    metrics: list[str] | None = None,
) -> dict[str, float]:
    """The task's metrics for `examples` (an evaluation split) under the model's active delta."""
    predictions = task_predictions(model, tokenizer, task, examples, max_length, batch_size)
    return score_predictions(task, examples, predictions, metrics)
