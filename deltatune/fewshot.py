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
"[MASK]", "", averaged), the calibrated prediction is ``argmax_y p(y|x) / p_cf(y)``. **Batch calibration**
(Zhou et al. 2024, "Batch Calibration", §4) divides by the mean label probabilities over real unlabeled
inputs instead, ``p_bc(y) = mean_j p(y|x_j)``: the paper takes the test batch; here ``x_j`` are training
inputs (labels unused, `calibration_sample`), so the test set is never looked at and one query can be
calibrated alone. With 4 demonstrations on SmolLM2-135M it turns a 51-84% spread over draws into 80-86%
(docs/results/fewshot_smollm2.md). Generation (E2E) is greedy decoding that stops at a newline.

Speed: the demonstrations are one prefix shared by every example, encoded once (`prefix_cache.py`).
"""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from deltatune.errors import FewShotError
from deltatune.prefix_cache import (
    complete,
    context_length,
    encode_text,
    generate_greedy,
    prefix_token_ids,
    score_labels,
)

__all__ = ["FewShotError", "PromptTemplate", "calibrate", "complete", "evaluate_fewshot", "generate_greedy",
           "calibration_sample", "score_labels", "select_demonstrations", "template_for"]

Example = dict[str, Any]
# Zhao et al. (2021) average the calibration over these three content-free inputs.
CONTENT_FREE_INPUTS: tuple[str, ...] = ("N/A", "[MASK]", "")
# Prediction modes of label-word scoring; a mode's metrics are named ``<mode>_<metric>`` (raw: ``<metric>``).
CALIBRATIONS: tuple[str, ...] = ("calibrated", "batch_calibrated")


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

    def content_free_queries(self) -> list[str]:
        """The query filled with each of `CONTENT_FREE_INPUTS`, for contextual calibration."""
        return [self.format_query({"text": cf, "text_pair": cf}) for cf in CONTENT_FREE_INPUTS]


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
    examples: Sequence[Example],
    pool: Sequence[Example],
    shots: int,
    seed: int = 0,
    shared: list[Example] | None = None,
) -> list[tuple[list[Example], list[int]]]:
    """Groups ``(demonstrations, indices of examples)`` that cover every example once.

    Most examples share one set of demonstrations (`shared`, else the seeded draw: one cached prefix); an
    example that is itself one of them gets its own set drawn without it, so no example is ever shown its
    own answer.
    """
    shared = select_demonstrations(pool, shots, seed) if shared is None else shared
    shared_keys = {example_key(d) for d in shared}
    groups: dict[tuple | None, list[int]] = {}
    for i, example in enumerate(examples):
        key = example_key(example)
        groups.setdefault(key if key in shared_keys else None, []).append(i)
    return [
        (shared if key is None else select_demonstrations(pool, shots, seed, exclude={key}), indices)
        for key, indices in groups.items()
    ]


def calibration_sample(
    pool: Sequence[Example], size: int, seed: int = 0, exclude: set[tuple] | frozenset = frozenset()
) -> list[Example]:
    """`size` training examples drawn at random with a fixed seed, none with a key in `exclude`: the
    unlabeled inputs of batch calibration (their labels are never read, so the sample follows the training
    split's own label mix)."""
    indices = [i for i, example in enumerate(pool) if example_key(example) not in exclude]
    return [pool[i] for i in random.Random(f"calibration-{seed}").sample(indices, min(size, len(indices)))]


def candidate_seed(seed: int, draw: int) -> int:
    """Seed of candidate draw `draw` in `rank_demonstration_draws`; draw 0 is the plain seeded draw."""
    return seed + 1000 * draw


def rank_demonstration_draws(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: PromptTemplate,
    label_words: Sequence[str],
    pool: Sequence[Example],
    shots: int,
    seed: int = 0,
    candidates: int = 8,
    validation_size: int = 256,
    exclude: set[tuple] | frozenset = frozenset(),
    batch_size: int = 16,
    calibration_inputs: int = 256,
) -> dict[str, Any]:
    """Score `candidates` seeded draws of `shots` demonstrations on held-out training examples.

    With few demonstrations, which ones are drawn moves accuracy by tens of points (Zhao et al. 2021, §3;
    SmolLM2 on SST-2, 4-shot: 51-84% over 12 draws). Each candidate prefix scores the same `validation_size`
    other training examples (balanced over labels, none of them a candidate demonstration or in `exclude`,
    e.g. the evaluation examples), raw, contextually calibrated and batch calibrated over
    `calibration_inputs` other unlabeled training inputs (0: not). Draw 0 is the plain seeded draw.
    Returns ``draws``, ``accuracy``, ``calibrated_accuracy`` and ``batch_calibrated_accuracy`` (one per draw),
    ``validation_examples``, ``calibration_set`` (the batch calibration inputs), ``seconds``.
    """
    if not label_words or not pool or "label" not in pool[0]:
        raise FewShotError("choosing demonstrations scores label words: it needs a labelled classification task")
    started = time.perf_counter()
    draws = [select_demonstrations(pool, shots, candidate_seed(seed, i), exclude) for i in range(candidates)]
    used = set(exclude) | {example_key(d) for draw in draws for d in draw}
    validation = select_demonstrations(pool, validation_size, seed=candidate_seed(seed, candidates), exclude=used)
    if len({example["label"] for example in validation}) < 2:
        raise FewShotError(
            f"choosing demonstrations needs held-out training examples of at least two labels; the train split "
            f"has {len(validation)} left after the {candidates} candidate draws: use select_from=1"
        )
    reference = calibration_sample(pool, calibration_inputs, seed, used | {example_key(e) for e in validation})
    queries = [template.format_query(example) for example in validation]
    reference_queries = [template.format_query(example) for example in reference]
    labels = [example["label"] for example in validation]
    accuracies: dict[str, list[float]] = {}
    for draw in draws:
        prefix = template.build_prefix(draw, label_words)
        predicted = predict_labels(model, tokenizer, template, prefix, queries, label_words, batch_size,
                                   reference_queries=reference_queries)
        for mode, values in predicted.items():
            accuracies.setdefault(metric_name(mode, "accuracy"), []).append(_accuracy(values.tolist(), labels))
    return {"draws": draws, **accuracies, "validation_examples": len(validation), "calibration_set": reference,
            "seconds": round(time.perf_counter() - started, 2)}


def best_draw(ranking: dict[str, Any], by: str = "accuracy") -> int:
    """Index of the draw with the highest `by` accuracy on the held-out examples (ties: the earlier draw)."""
    return max(range(len(ranking[by])), key=lambda i: (ranking[by][i], -i))


def choose_demonstrations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: PromptTemplate,
    label_words: Sequence[str],
    pool: Sequence[Example],
    shots: int,
    seed: int = 0,
    candidates: int = 8,
    validation_size: int = 256,
    exclude: set[tuple] | frozenset = frozenset(),
    batch_size: int = 16,
    by: str = "accuracy",
) -> tuple[list[Example], dict[str, Any]]:
    """The best of `candidates` seeded draws (`rank_demonstration_draws`) by `by` (``accuracy``: raw
    label-word scores, ``calibrated_accuracy``), chosen on training data only: the demonstrations and a
    record of the choice."""
    ranking = rank_demonstration_draws(
        model, tokenizer, template, label_words, pool, shots, seed, candidates, validation_size, exclude, batch_size
    )
    best = best_draw(ranking, by)
    return ranking["draws"][best], _selection_record(ranking, chosen_draw=best)


def _selection_record(ranking: dict[str, Any], **chosen: int) -> dict[str, Any]:
    record = {"candidates": len(ranking["draws"]), "validation_examples": ranking["validation_examples"], **chosen}
    for mode in ("raw", *CALIBRATIONS):
        if metric_name(mode, "accuracy") in ranking:
            name = "validation_accuracies" if mode == "raw" else f"validation_{mode}_accuracies"
            record[name] = [round(a, 4) for a in ranking[metric_name(mode, "accuracy")]]
    return {**record, "seconds": ranking["seconds"]}


def calibrate(log_scores: torch.Tensor, reference_log_scores: torch.Tensor) -> torch.Tensor:
    """``p(y|x) / mean_r p(y|r)``, renormalised; both normalised over labels first.

    With content-free references ("N/A", ...) this is contextual calibration (Zhao et al. 2021, §5:
    W = diag(p_cf)^-1, b = 0); with real unlabeled inputs it is batch calibration (Zhou et al. 2024).
    log_scores: (N, labels); reference_log_scores: (R, labels). Returns probabilities (N, labels).
    """
    probs = log_scores.softmax(dim=-1)
    reference = reference_log_scores.softmax(dim=-1).mean(dim=0)
    calibrated = probs / reference
    return calibrated / calibrated.sum(dim=-1, keepdim=True)


def metric_name(mode: str, metric: str) -> str:
    """``accuracy`` for raw predictions, ``calibrated_accuracy`` / ``batch_calibrated_accuracy`` otherwise."""
    return metric if mode == "raw" else f"{mode}_{metric}"


def _mode_of(name: str) -> str:
    return next((mode for mode in sorted(CALIBRATIONS, key=len, reverse=True) if name.startswith(mode + "_")), "raw")


def predict_labels(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: PromptTemplate,
    prefix: str,
    queries: list[str],
    label_words: Sequence[str],
    batch_size: int = 16,
    use_cache_prefix: bool = True,
    reference_queries: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """Label predictions for `queries` after `prefix` by mode: ``raw``, ``calibrated`` (contextual, with the
    template's content-free queries) and, given unlabeled `reference_queries`, ``batch_calibrated``. All
    queries are scored in one batched pass."""
    content_free = template.content_free_queries()
    scores = score_labels(model, tokenizer, prefix, [*queries, *content_free, *reference_queries], label_words,
                          batch_size, use_cache_prefix)
    n, c = len(queries), len(content_free)
    example_scores = scores[:n]
    predicted = {"raw": example_scores.argmax(dim=-1),
                 "calibrated": calibrate(example_scores, scores[n : n + c]).argmax(dim=-1)}
    if reference_queries:
        predicted["batch_calibrated"] = calibrate(example_scores, scores[n + c :]).argmax(dim=-1)
    return predicted


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
        prefix_ids = prefix_token_ids(tokenizer, template.build_prefix(kept, label_words))
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
    select_from: int = 1,
    validation_size: int = 256,
    calibration_inputs: int = 256,
) -> dict[str, Any]:
    """k-shot prompting of a frozen causal LM on `split` of `task` (a `Task` or its name).

    Classification: the task's metrics on raw label-word predictions; when `calibrate`, also with
    ``calibrated_`` in front (contextual calibration) and ``batch_calibrated_`` (batch calibration over
    `calibration_inputs` unlabeled training inputs, `calibration_sample`; 0: not). Generation: the task's
    metrics on greedy outputs. Demonstrations come from the train split (seeded, balanced over labels); with
    ``select_from > 1`` (classification) the best of that many draws on `validation_size` held-out training
    examples (`rank_demonstration_draws`; record under ``selection``): each mode's metrics use the draw best
    for that mode (one more pass per distinct draw). Also reports ``examples``, ``shots`` asked,
    ``demonstrations`` used (fewer when the context is too short), ``prefix_tokens``, ``calibration_examples``
    and ``seconds`` (choosing, prompting and scoring; data loading excluded).
    """
    if isinstance(task, str):
        from deltatune.tasks import get_task

        task = get_task(task)
    examples = task.load(split, data_dir=data_dir, limit=limit)
    if not examples:
        raise FewShotError(f"no examples in split {split!r} of task {task.name!r}")
    classification = task.kind == "classification"
    batch_calibration = classification and calibrate and calibration_inputs > 0
    pool = task.load("train", data_dir=data_dir) if shots > 0 or batch_calibration else []
    template = template_for(task, has_pair=examples[0].get("text_pair") is not None)
    evaluated = {example_key(example) for example in examples}
    modes = ["raw", *CALIBRATIONS] if calibrate else ["raw"]
    choosing = select_from > 1 and shots > 0
    started = time.perf_counter()
    selection, reference = None, []
    if choosing:
        if not classification:
            raise FewShotError(
                f"choosing demonstrations (select_from={select_from}) scores label words, and task {task.name!r} "
                f"is {task.kind}; use select_from=1 (one seeded draw)"
            )
        ranking = rank_demonstration_draws(
            model, tokenizer, template, label_words_for(task, template), pool, shots, seed, select_from,
            validation_size, exclude=evaluated, batch_size=batch_size,
            calibration_inputs=calibration_inputs if batch_calibration else 0,
        )
        reference = ranking["calibration_set"]
    elif batch_calibration:  # none of the evaluated examples, none of the demonstrations
        shown = {example_key(d) for d in select_demonstrations(pool, shots, seed)}
        reference = calibration_sample(pool, calibration_inputs, seed, evaluated | shown)
    if not reference and "batch_calibrated" in modes:  # off, or evaluating on the train split itself
        modes.remove("batch_calibrated")
    if choosing:
        # each reported number uses the draw that was best for it on the held-out examples
        chosen = {mode: best_draw(ranking, metric_name(mode, "accuracy")) for mode in modes}
        selection = _selection_record(
            ranking, **{"chosen_draw" + ("" if mode == "raw" else f"_{mode}"): draw for mode, draw in chosen.items()}
        )
    if classification:
        reference_queries = [template.format_query(example) for example in reference]

        def run(shared: list[Example] | None) -> dict[str, Any]:
            groups = plan_demonstrations(examples, pool, shots, seed, shared=shared)
            return _evaluate_classification(model, tokenizer, task, template, examples, groups, modes,
                                            reference_queries, batch_size, use_cache_prefix)

        if selection is None:
            results = run(None)
        else:  # one pass per distinct chosen draw; each mode keeps the numbers of its own draw
            results = {}
            for draw in dict.fromkeys(chosen.values()):
                outcome = run(ranking["draws"][draw])
                results.update({name: value for name, value in outcome.items() if chosen[_mode_of(name)] == draw})
        results["calibration_examples"] = len(reference)
    else:
        groups = plan_demonstrations(examples, pool, shots, seed)
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
        **({"selection": selection} if selection else {}),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _evaluate_classification(
    model, tokenizer, task, template, examples, groups, modes, reference_queries, batch_size, use_cache_prefix
) -> dict[str, Any]:
    words = label_words_for(task, template)
    label_ids = [encode_text(tokenizer, word) for word in words]
    longest_label = max(len(ids) for ids in label_ids) - 1
    content_free = template.content_free_queries()
    predicted = {mode: torch.zeros(len(examples), dtype=torch.long) for mode in modes}
    used, prefix_tokens = [], 0
    for demonstrations, indices in groups:
        queries = [template.format_query(examples[i]) for i in indices]
        longest = max(len(encode_text(tokenizer, q)) for q in queries + content_free + reference_queries)
        kept, prefix_ids = fit_demonstrations(model, tokenizer, template, demonstrations, words,
                                              longest + longest_label)
        prefix = template.build_prefix(kept, words)
        outcome = predict_labels(model, tokenizer, template, prefix, queries, words, batch_size, use_cache_prefix,
                                 reference_queries=reference_queries if "batch_calibrated" in modes else ())
        for mode in modes:
            predicted[mode][indices] = outcome[mode]
        used.append(len(kept))
        prefix_tokens = max(prefix_tokens, len(prefix_ids))
    labels = [example["label"] for example in examples]
    results: dict[str, Any] = {"demonstrations": min(used), "prefix_tokens": prefix_tokens}
    for mode, values in predicted.items():
        metrics = {"accuracy": _accuracy(values.tolist(), labels), **task.compute_metrics(values.tolist(), labels)}
        results.update({metric_name(mode, name): value for name, value in metrics.items()})
    return results


def _accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    return sum(p == y for p, y in zip(predictions, labels)) / len(labels)


def _evaluate_generation(
    model, tokenizer, task, template, examples, groups, batch_size, use_cache_prefix, max_new_tokens
) -> dict[str, Any]:
    predictions: list[str] = [""] * len(examples)
    used, prefix_tokens = [], 0
    for demonstrations, indices in groups:
        contexts = [encode_text(tokenizer, template.format_query(examples[i])) for i in indices]
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
