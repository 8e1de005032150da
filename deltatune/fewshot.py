"""Zero- and few-shot prompting baselines: what a frozen LM does with no parameters changed at all.

The founding lecture starts here: a large LM solves a new task when the prompt shows k solved examples
(k-shot) or none (zero-shot)::

    Translate from Russian to English:
    стол => table
    сыр => cheese
    дом =>                      -> " home"

Classification is **label-word scoring**: each class has a verbalizer word (" negative" / " positive");
the prediction is ``argmax_y log p(word_y | prompt)``, summing over the word's tokens when it has several.
**Contextual calibration** (Zhao et al. 2021, "Calibrate Before Use", §5) removes the prompt's bias towards
some words: with ``p_cf`` the label probabilities (normalised over labels) for content-free inputs ("N/A",
"[MASK]", "", averaged), the calibrated prediction is ``argmax_y p(y|x) / p_cf(y)``. Generation (E2E) is
greedy decoding that stops at a newline.

Speed: all test examples share the same k demonstrations, so every prompt is::

    [instruction + k demonstrations]   [query_i (+ label_j)]
     shared prefix: encoded ONCE        continuation: batched, left-padded

The prefix's key/value cache (batch 1) is computed once; each batch copies it and repeats it B times
(`DynamicCache.batch_repeat_interleave`). Continuations are left-padded, so pad slots lie between prefix
and query and are masked out, every row ends at the same column (one logits row per example is kept), and
position ids continue from the prefix length counting real tokens only. The naive path (prefix re-encoded
with every example) computes the same scores and stays for comparison and tests.
"""

from __future__ import annotations

import copy
import inspect
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from deltatune.errors import DeltaTuneError

Example = dict[str, Any]
PaddingSide = Literal["left", "right"]
# Zhao et al. (2021) average the calibration over these three content-free inputs.
CONTENT_FREE_INPUTS: tuple[str, ...] = ("N/A", "[MASK]", "")


class FewShotError(DeltaTuneError):
    """A prompt cannot be built or does not fit the model, or the task cannot be prompted."""


@dataclass(frozen=True)
class PromptTemplate:
    """How one task is put into words.

    query: format string of one example without its answer: ``{text}``/``{text_pair}`` (classification)
        or ``{source}`` (generation).
    label_words: verbalizer, label id -> the word that continues the query (with its leading space);
        None derives ``" " + label name`` from the task.
    instruction: text put once before the demonstrations.
    separator: between demonstrations, and between the last one and the query.
    max_chars: long texts (news articles) are cut to this many characters at a word boundary.
    """

    query: str
    label_words: tuple[str, ...] | None = None
    instruction: str = ""
    separator: str = "\n\n"
    max_chars: int | None = None

    def _cut(self, text: str) -> str:
        if self.max_chars is None or len(text) <= self.max_chars:
            return text
        return text[: self.max_chars].rsplit(" ", 1)[0] + " ..."

    def format_query(self, example: Example) -> str:
        fields = {
            key: self._cut(value) if isinstance(value, str) else value for key, value in example.items()
        }
        return self.query.format(**fields)

    def format_demonstration(self, example: Example, label_words: Sequence[str]) -> str:
        answer = label_words[example["label"]] if "label" in example else " " + example["target"]
        return self.format_query(example) + answer

    def build_prefix(self, demonstrations: Sequence[Example], label_words: Sequence[str]) -> str:
        """Instruction + demonstrations, ending where the query starts."""
        shots = "".join(self.format_demonstration(d, label_words) + self.separator for d in demonstrations)
        return self.instruction + shots


# One table: task name -> template. Label id order follows each task's `label_names`.
TEMPLATES: dict[str, PromptTemplate] = {
    "sst2": PromptTemplate("Review: {text}\nSentiment:", (" negative", " positive")),
    # label 0 = entailment
    "rte": PromptTemplate(
        '{text}\nQuestion: Does this imply that "{text_pair}"? Yes or no?\nAnswer:', (" yes", " no")
    ),
    # label 1 = equivalent
    "mrpc": PromptTemplate(
        "Sentence 1: {text}\nSentence 2: {text_pair}\n"
        "Question: Do both sentences mean the same thing? Yes or no?\nAnswer:",
        (" no", " yes"),
    ),
    # label 1 = acceptable
    "cola": PromptTemplate(
        "Sentence: {text}\nQuestion: Is this sentence grammatical? Yes or no?\nAnswer:", (" no", " yes")
    ),
    # five topics (business, entertainment, politics, sport, tech): words are the label names
    "bbc-news": PromptTemplate("Article: {text}\nTopic:", max_chars=600),
    "e2e": PromptTemplate("MR: {source}\nSentence:"),
}
GENERIC_CLASSIFICATION = PromptTemplate("Text: {text}\nLabel:")
GENERIC_PAIR_CLASSIFICATION = PromptTemplate("Text 1: {text}\nText 2: {text_pair}\nLabel:")
GENERIC_GENERATION = PromptTemplate("Input: {source}\nOutput:")


def template_for(task: Any, has_pair: bool = False) -> PromptTemplate:
    """The task's template from `TEMPLATES`, else a generic one for its kind."""
    if task.name in TEMPLATES:
        return TEMPLATES[task.name]
    if task.kind == "generation":
        return GENERIC_GENERATION
    if task.kind == "classification":
        return GENERIC_PAIR_CLASSIFICATION if has_pair else GENERIC_CLASSIFICATION
    raise FewShotError(
        f"few-shot prompting scores classes or generates text; task {task.name!r} is {task.kind}"
    )


def label_words_for(task: Any, template: PromptTemplate) -> list[str]:
    """Verbalizer words in label-id order."""
    names = list(task.label_names or [])
    words = list(template.label_words) if template.label_words else [" " + n.replace("_", " ") for n in names]
    if names and len(words) != len(names):
        raise FewShotError(f"template for {task.name!r} has {len(words)} label words for {len(names)} labels")
    return words


# ---------------------------------------------------------------------------------------------
# Demonstrations


def example_key(example: Example) -> tuple:
    """What makes two examples the same prompt: the texts (classification) or the source (generation)."""
    if "source" in example:
        return ("source", example["source"])
    return ("text", example.get("text"), example.get("text_pair"))


def select_demonstrations(
    pool: Sequence[Example], shots: int, seed: int = 0, exclude: set[tuple] | frozenset = frozenset()
) -> list[Example]:
    """`shots` distinct examples of `pool`, none with a key in `exclude`, drawn with a fixed seed.

    Classification draws round-robin over labels (balanced), then shuffles the order so that no label
    always comes last.
    """
    if shots <= 0:
        return []
    rng = random.Random(seed)
    candidates = [i for i, example in enumerate(pool) if example_key(example) not in exclude]
    rng.shuffle(candidates)
    if pool and "label" in pool[0]:
        by_label: dict[int, list[int]] = {}
        for i in candidates:
            by_label.setdefault(pool[i]["label"], []).append(i)
        queues = [by_label[label] for label in sorted(by_label)]
        candidates = [
            queue[r] for r in range(max(map(len, queues), default=0)) for queue in queues if r < len(queue)
        ]
    chosen, seen = [], set()
    for i in candidates:
        key = example_key(pool[i])
        if key not in seen:
            chosen.append(pool[i])
            seen.add(key)
        if len(chosen) == shots:
            break
    rng.shuffle(chosen)
    return chosen


def plan_demonstrations(
    examples: Sequence[Example], pool: Sequence[Example], shots: int, seed: int = 0
) -> list[tuple[list[Example], list[int]]]:
    """Groups ``(demonstrations, indices of examples)`` that cover every example once.

    Most examples share one set of demonstrations (one cached prefix); an example that is itself one of
    them gets its own set drawn without it, so no example is ever shown its own answer.
    """
    shared = select_demonstrations(pool, shots, seed)
    shared_keys = {example_key(d) for d in shared}
    groups: dict[tuple | None, list[int]] = {}
    for i, example in enumerate(examples):
        key = example_key(example)
        groups.setdefault(key if key in shared_keys else None, []).append(i)
    return [
        (shared if key is None else select_demonstrations(pool, shots, seed, exclude={key}), indices)
        for key, indices in groups.items()
    ]


# ---------------------------------------------------------------------------------------------
# Token ids and batched forward passes over a shared prefix


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _leading_special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Special tokens the tokenizer puts before a text (a BOS), to start the whole prompt with."""
    with_specials = tokenizer("a")["input_ids"]
    plain = _encode(tokenizer, "a")
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


def _prompt_prefix_ids(tokenizer: PreTrainedTokenizerBase, prefix_text: str) -> list[int]:
    return _leading_special_ids(tokenizer) + _encode(tokenizer, prefix_text)


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
    prefix_ids = _prompt_prefix_ids(tokenizer, prefix)
    label_ids = [_encode(tokenizer, word) for word in label_words]
    if any(not ids for ids in label_ids):
        raise FewShotError(f"a label word encodes to no tokens: {list(label_words)}")
    rows, owners = [], []  # owners[r] = query index of row r
    for q, query in enumerate(queries):
        query_rows = _label_rows(_encode(tokenizer, query), label_ids)
        rows += query_rows
        owners += [q] * len(query_rows)
    table = torch.full((len(queries), len(label_words)), float("nan"))
    with _eval_mode(model):
        row_scores = _score_rows(model, prefix_ids, rows, batch_size, use_cache_prefix, padding_side)
    for row, owner, values in zip(rows, owners, row_scores):
        for (label, _), value in zip(row.targets, values):
            table[owner, label] = value
    return table


def calibrate(log_scores: torch.Tensor, content_free_log_scores: torch.Tensor) -> torch.Tensor:
    """Contextual calibration: ``p(y|x) / mean_cf p(y|cf)``, renormalised; both normalised over labels first.

    log_scores: (N, labels); content_free_log_scores: (C, labels). Returns probabilities (N, labels).
    """
    probs = log_scores.softmax(dim=-1)
    content_free = content_free_log_scores.softmax(dim=-1).mean(dim=0)
    calibrated = probs / content_free
    return calibrated / calibrated.sum(dim=-1, keepdim=True)


class _eval_mode:
    """Dropout off while scoring; the caller's train/eval mode is restored afterwards."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


# ---------------------------------------------------------------------------------------------
# Fitting the context


def fit_demonstrations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: PromptTemplate,
    demonstrations: list[Example],
    label_words: Sequence[str],
    longest_continuation: int,
) -> tuple[list[Example], list[int]]:
    """Drop demonstrations from the end until prefix + the longest continuation fit the model's context.

    Returns the demonstrations kept and the prefix token ids; warns when some were dropped and raises
    `FewShotError` when even the zero-shot prompt is too long.
    """
    limit, kept = context_length(model), list(demonstrations)
    while True:
        prefix_ids = _prompt_prefix_ids(tokenizer, template.build_prefix(kept, label_words))
        if limit is None or len(prefix_ids) + longest_continuation <= limit:
            break
        if not kept:
            raise FewShotError(
                f"the longest example needs {len(prefix_ids) + longest_continuation} tokens even zero-shot, "
                f"more than the model's context of {limit} tokens; use shorter texts or another model"
            )
        kept.pop()
    if len(kept) < len(demonstrations):
        warnings.warn(
            f"few-shot prompt too long for the model's context of {limit} tokens: dropped "
            f"{len(demonstrations) - len(kept)} of {len(demonstrations)} demonstrations "
            f"({len(kept)}-shot now)",
            stacklevel=3,
        )
    return kept, prefix_ids


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

    The lecture's ``"...сыр => cheese\nдом =>"`` gives ``" home"`` with SmolLM2.
    """
    prompt_ids = _prompt_prefix_ids(tokenizer, prompt)
    return generate_greedy(model, tokenizer, [], [prompt_ids], max_new_tokens, stop, batch_size=1)[0]


# ---------------------------------------------------------------------------------------------
# Evaluation on a task


def evaluate_fewshot(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Any,
    shots: int = 0,
    split: str = "dev",
    data_dir: str | Path | None = None,
    calibrate: bool = True,
    limit: int | None = None,
    batch_size: int = 16,
    use_cache_prefix: bool = True,
    seed: int = 0,
    max_new_tokens: int = 64,
) -> dict[str, Any]:
    """k-shot prompting of a frozen causal LM on `split` of `task` (a `Task` or its name).

    Classification: the task's metrics on raw label-word predictions, and with ``calibrated_`` in front,
    after contextual calibration (when `calibrate`). Generation: the task's metrics on greedy outputs.
    Demonstrations come from the train split (seeded, balanced over labels). Also reports ``examples``,
    ``shots`` asked, ``demonstrations`` used (fewer when the context is too short), ``prefix_tokens`` and
    ``seconds`` (prompting and scoring, data loading excluded).
    """
    if isinstance(task, str):
        from deltatune.tasks import get_task

        task = get_task(task)
    examples = task.load(split, data_dir=data_dir, limit=limit)
    if not examples:
        raise FewShotError(f"no examples in split {split!r} of task {task.name!r}")
    pool = task.load("train", data_dir=data_dir) if shots > 0 else []
    template = template_for(task, has_pair=examples[0].get("text_pair") is not None)
    started = time.perf_counter()
    groups = plan_demonstrations(examples, pool, shots, seed)
    if task.kind == "classification":
        results = _evaluate_classification(
            model, tokenizer, task, template, examples, groups, calibrate, batch_size, use_cache_prefix
        )
    else:
        results = _evaluate_generation(
            model, tokenizer, task, template, examples, groups, batch_size, use_cache_prefix, max_new_tokens
        )
    return {
        "task": task.name,
        "split": split,
        "shots": shots,
        **results,
        "examples": len(examples),
        "prefix_cache": use_cache_prefix,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _evaluate_classification(
    model, tokenizer, task, template, examples, groups, calibrate_scores, batch_size, use_cache_prefix
) -> dict[str, Any]:
    words = label_words_for(task, template)
    label_ids = [_encode(tokenizer, word) for word in words]
    longest_label = max(len(ids) for ids in label_ids) - 1
    content_free = [template.format_query({"text": cf, "text_pair": cf}) for cf in CONTENT_FREE_INPUTS]
    raw = torch.zeros(len(examples), dtype=torch.long)
    calibrated = torch.zeros(len(examples), dtype=torch.long)
    used, prefix_tokens = [], 0
    for demonstrations, indices in groups:
        queries = [template.format_query(examples[i]) for i in indices]
        longest = max(len(_encode(tokenizer, q)) for q in queries + content_free) + longest_label
        kept, prefix_ids = fit_demonstrations(model, tokenizer, template, demonstrations, words, longest)
        prefix = template.build_prefix(kept, words)
        scores = score_labels(
            model, tokenizer, prefix, queries + content_free, words, batch_size, use_cache_prefix
        )
        example_scores, cf_scores = scores[: len(queries)], scores[len(queries) :]
        raw[indices] = example_scores.argmax(dim=-1)
        calibrated[indices] = calibrate(example_scores, cf_scores).argmax(dim=-1)
        used.append(len(kept))
        prefix_tokens = max(prefix_tokens, len(prefix_ids))
    labels = [example["label"] for example in examples]
    results: dict[str, Any] = {"demonstrations": min(used), "prefix_tokens": prefix_tokens}
    results["accuracy"] = _accuracy(raw.tolist(), labels)
    results.update(task.compute_metrics(raw.tolist(), labels))
    if calibrate_scores:
        results["calibrated_accuracy"] = _accuracy(calibrated.tolist(), labels)
        metrics = task.compute_metrics(calibrated.tolist(), labels)
        results.update({f"calibrated_{name}": value for name, value in metrics.items()})
    return results


def _accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    return sum(p == y for p, y in zip(predictions, labels)) / len(labels)


def _evaluate_generation(
    model, tokenizer, task, template, examples, groups, batch_size, use_cache_prefix, max_new_tokens
) -> dict[str, Any]:
    predictions: list[str] = [""] * len(examples)
    used, prefix_tokens = [], 0
    for demonstrations, indices in groups:
        contexts = [_encode(tokenizer, template.format_query(examples[i])) for i in indices]
        longest = max(map(len, contexts)) + max_new_tokens - 1
        kept, prefix_ids = fit_demonstrations(model, tokenizer, template, demonstrations, [], longest)
        outputs = generate_greedy(
            model, tokenizer, prefix_ids, contexts, max_new_tokens, "\n", batch_size, use_cache_prefix
        )
        for i, text in zip(indices, outputs):
            predictions[i] = text.strip()
        used.append(len(kept))
        prefix_tokens = max(prefix_tokens, len(prefix_ids))
    references = [example.get("references") or [example["target"]] for example in examples]
    metrics = task.compute_metrics(predictions, references)
    return {"demonstrations": min(used), "prefix_tokens": prefix_tokens, **metrics}
