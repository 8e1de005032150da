"""Scoring and greedy decoding after a shared prompt prefix, encoded once (the speed of `fewshot.py`).

In k-shot prompting all test examples share the same k demonstrations, so every prompt is::

    [instruction + k demonstrations]   [query_i (+ label_j)]
     shared prefix: encoded ONCE        continuation: batched, left-padded

The prefix's key/value cache (batch 1) is computed once; each batch copies it and repeats it B times
(`DynamicCache.batch_repeat_interleave`). Continuations are left-padded, so pad slots lie between prefix
and query and are masked out, every row ends at the same column (one logits row per example is kept), and
position ids continue from the prefix length counting real tokens only. The naive path (prefix re-encoded
with every example, ``use_cache_prefix=False``) computes the same scores and stays for comparison and tests.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from deltatune.errors import FewShotError

PaddingSide = Literal["left", "right"]


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _leading_special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Special tokens the tokenizer puts before a text (a BOS), to start the whole prompt with."""
    with_specials = tokenizer("a")["input_ids"]
    plain = encode_text(tokenizer, "a")
    for start in range(len(with_specials)):
        if with_specials[start : start + len(plain)] == plain:
            return with_specials[:start]
    return []


def context_length(model: PreTrainedModel) -> int | None:
    """The model's context in tokens (None: unknown, no limit is checked)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _call_model(
    model: PreTrainedModel, keep: int, cache: Any, **inputs: torch.Tensor
) -> tuple[torch.Tensor, Any]:
    """One forward pass: float32 logits of the last `keep` columns (0: all) and the grown KV cache.

    transformers 5 names the cache argument `cache` (`past_key_values` is deprecated, gone in 5.40);
    `logits_to_keep` spares the LM head (49k x 576 for SmolLM2) on columns that are not scored.
    """
    parameters = inspect.signature(model.forward).parameters
    only_varargs = all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters.values())  # a wrapper
    old_name = "past_key_values" in parameters and "cache" not in parameters
    arguments = {"past_key_values" if old_name else "cache": cache}
    if only_varargs or "logits_to_keep" in parameters:
        arguments["logits_to_keep"] = keep
    output = model(**inputs, use_cache=True, **arguments)
    logits = output.logits if keep == 0 else output.logits[:, -keep:]
    grown = output.cache if getattr(output, "cache", None) is not None else output.past_key_values
    return logits.float(), grown


def encode_prefix(model: PreTrainedModel, prefix_ids: Sequence[int]) -> Any:
    """The key/value cache (batch 1) of the shared prefix, or None for an empty prefix."""
    if not prefix_ids:
        return None
    _, cache = _call_model(model, 1, None, input_ids=torch.tensor([list(prefix_ids)], device=model.device))
    return cache


@dataclass
class _Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, P + T): P cached prefix positions, then the rows
    position_ids: torch.Tensor  # (B, T)
    cache: Any
    lengths: list[int]  # real tokens of each row (prefix included when it is not cached)


def _make_batch(
    model: PreTrainedModel,
    prefix_ids: Sequence[int],
    prefix_cache: Any,
    rows: Sequence[Sequence[int]],
    padding_side: PaddingSide = "left",
) -> _Batch:
    """Pad `rows` into one batch after the prefix: cached (prefix_cache given) or re-encoded in every row."""
    if prefix_cache is None:
        rows = [list(prefix_ids) + list(row) for row in rows]
    past = len(prefix_ids) if prefix_cache is not None else 0
    batch, width = len(rows), max(len(row) for row in rows)
    pad_id = model.config.pad_token_id if isinstance(model.config.pad_token_id, int) else 0
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, row in enumerate(rows):
        columns = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        input_ids[i, columns] = torch.tensor(row, dtype=torch.long)
        mask[i, columns] = 1
    # Real tokens count on from the prefix; pads get a harmless position, they are masked out anyway.
    position_ids = past + (mask.cumsum(dim=1) - 1).clamp(min=0)
    cache = None
    if prefix_cache is not None:
        cache = copy.deepcopy(prefix_cache)  # the forward pass appends to it in place
        cache.batch_repeat_interleave(batch)  # (1, heads, P, d) -> (B, heads, P, d)
        mask = torch.cat([torch.ones((batch, past), dtype=torch.long), mask], dim=1)
    device = model.device
    return _Batch(
        input_ids.to(device), mask.to(device), position_ids.to(device), cache, [len(r) for r in rows]
    )


def _forward(model: PreTrainedModel, batch: _Batch, logits_to_keep: int = 0) -> tuple[torch.Tensor, Any]:
    """Logits (float32) of the last `logits_to_keep` columns (0: all) and the grown cache."""
    return _call_model(
        model,
        logits_to_keep,
        batch.cache,
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    )


@dataclass
class _ScoreRow:
    """One forward row: `tokens` after the prefix; each target ``(label index, label tokens)`` is scored on
    the row's last ``len(label tokens)`` positions (the row ends with all but the label's last token)."""

    tokens: list[int]
    targets: list[tuple[int, list[int]]]


def _label_rows(query_ids: list[int], label_ids: list[list[int]]) -> list[_ScoreRow]:
    """One row scores every single-token label at once; each multi-token label needs its own row."""
    rows = []
    single = [(j, ids) for j, ids in enumerate(label_ids) if len(ids) == 1]
    if single:
        rows.append(_ScoreRow(query_ids, single))
    rows += [_ScoreRow(query_ids + ids[:-1], [(j, ids)]) for j, ids in enumerate(label_ids) if len(ids) > 1]
    return rows


def _score_rows(
    model: PreTrainedModel,
    prefix_ids: Sequence[int],
    rows: Sequence[_ScoreRow],
    batch_size: int,
    use_cache_prefix: bool,
    padding_side: PaddingSide = "left",
) -> list[list[float]]:
    """Summed log-probabilities of every row's targets, in row order."""
    prefix_cache = encode_prefix(model, prefix_ids) if use_cache_prefix else None
    scores: list[list[float]] = [[] for _ in rows]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].tokens))  # similar lengths, little padding
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = _make_batch(model, prefix_ids, prefix_cache, [rows[i].tokens for i in chunk], padding_side)
        span = max(len(rows[i].targets[0][1]) for i in chunk)
        # Left padding: every row ends in the last column, so only the last `span` columns need logits.
        logits, _ = _forward(model, batch, logits_to_keep=span if padding_side == "left" else 0)
        log_probs = logits.log_softmax(dim=-1)  # (B, kept columns, vocab)
        for b, i in enumerate(chunk):
            end = log_probs.shape[1] if padding_side == "left" else batch.lengths[b]
            for _, label in rows[i].targets:
                columns = torch.arange(end - len(label), end, device=log_probs.device)
                tokens = torch.tensor(label, device=log_probs.device)
                scores[i].append(log_probs[b, columns, tokens].sum().item())
    return scores


def prefix_token_ids(tokenizer: PreTrainedTokenizerBase, prefix_text: str) -> list[int]:
    return _leading_special_ids(tokenizer) + encode_text(tokenizer, prefix_text)


@torch.inference_mode()
def score_labels(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prefix: str,
    queries: Sequence[str],
    label_words: Sequence[str],
    batch_size: int = 16,
    use_cache_prefix: bool = True,
    padding_side: PaddingSide = "left",
) -> torch.Tensor:
    """``(len(queries), len(label_words))`` log p(label word | prefix + query), summed over the word's tokens.

    The prefix, each query and each label word are tokenized separately and concatenated, so the cached
    and the naive path see exactly the same token ids.
    """
    prefix_ids = prefix_token_ids(tokenizer, prefix)
    label_ids = [encode_text(tokenizer, word) for word in label_words]
    if any(not ids for ids in label_ids):
        raise FewShotError(f"a label word encodes to no tokens: {list(label_words)}")
    rows, owners = [], []  # owners[r] = query index of row r
    for q, query in enumerate(queries):
        query_rows = _label_rows(encode_text(tokenizer, query), label_ids)
        rows += query_rows
        owners += [q] * len(query_rows)
    table = torch.full((len(queries), len(label_words)), float("nan"))
    with _eval_mode(model):
        row_scores = _score_rows(model, prefix_ids, rows, batch_size, use_cache_prefix, padding_side)
    for row, owner, values in zip(rows, owners, row_scores):
        for (label, _), value in zip(row.targets, values):
            table[owner, label] = value
    return table


class _eval_mode:
    """Dropout off while scoring; the caller's train/eval mode is restored afterwards."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


# ---------------------------------------------------------------------------------------------
# Greedy generation


def _is_done(text: str, stop: str | None) -> bool:
    return stop is not None and stop in text


@torch.inference_mode()
def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prefix_ids: Sequence[int],
    contexts: Sequence[Sequence[int]],
    max_new_tokens: int = 20,
    stop: str | None = "\n",
    batch_size: int = 16,
    use_cache_prefix: bool = True,
) -> list[str]:
    """Greedy continuation of ``prefix + context`` for every context, cut before `stop` (or at EOS)."""
    texts: list[str] = [""] * len(contexts)
    eos = tokenizer.eos_token_id
    with _eval_mode(model):
        prefix_cache = encode_prefix(model, prefix_ids) if use_cache_prefix else None
        order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = _make_batch(model, prefix_ids, prefix_cache, [contexts[i] for i in chunk], "left")
            generated: list[list[int]] = [[] for _ in chunk]
            done = [False] * len(chunk)
            for _ in range(max_new_tokens):
                logits, batch.cache = _forward(model, batch, logits_to_keep=1)
                next_tokens = logits[:, -1].argmax(dim=-1)  # (B,)
                for b, token in enumerate(next_tokens.tolist()):
                    if done[b]:
                        continue
                    if token == eos:
                        done[b] = True
                        continue
                    generated[b].append(token)
                    done[b] = _is_done(tokenizer.decode(generated[b]), stop)
                if all(done):
                    break
                # Next step: one new column per row, attending to everything so far.
                batch.input_ids = next_tokens[:, None]
                batch.position_ids = batch.position_ids[:, -1:] + 1
                ones = torch.ones_like(batch.attention_mask[:, :1])
                batch.attention_mask = torch.cat([batch.attention_mask, ones], dim=1)
            for b, i in enumerate(chunk):
                text = tokenizer.decode(generated[b], skip_special_tokens=True)
                texts[i] = text.split(stop)[0] if stop else text
    return texts


def complete(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_new_tokens: int = 20,
    stop: str | None = "\n",
) -> str:
    """Greedy completion of `prompt`, up to (not including) `stop`.

    A translation prompt in the style of Brown et al. 2020, figure 2.1 (there English => French),
    ``"...сыр => cheese\nдом =>"``, gives ``" home"`` with SmolLM2.
    """
    ids = prefix_token_ids(tokenizer, prompt)
    return generate_greedy(model, tokenizer, [], [ids], max_new_tokens, stop, batch_size=1)[0]
