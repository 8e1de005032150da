"""Zero- and few-shot prompting baselines: what a frozen LM does with no parameters changed at all.

Brown et al. 2020 (GPT-3, §2): a large LM solves a new task when the prompt shows k solved examples
(k-shot) or none (zero-shot)::

    Translate from Russian to English:
    стол => table
    сыр => cheese
    дом =>                      -> " home"

Classification is **label-word scoring**: each class has a verbalizer word (" negative" / " positive");
the prediction is ``argmax_y log p(word_y | prompt)``, summing over the word's tokens when it has several,
reported raw and after two calibrations (`calibration.py`): contextual (Zhao et al. 2021, content-free
inputs) and batch (Zhou et al. 2024, unlabeled training inputs). With 4 demonstrations on SmolLM2-135M
batch calibration turns a 51-84% spread over draws into 80-85% (docs/results/fewshot_smollm2.md).
Demonstrations are drawn, and optionally chosen on training data, by `demonstrations.py`. Generation (E2E)
is greedy decoding that stops at a newline.

Speed: the demonstrations are one prefix shared by every example, encoded once (`prefix_cache.py`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from deltatune.errors import FewShotError
from deltatune.prompting.calibration import (
    CALIBRATIONS,
    CONTENT_FREE_INPUTS,
    accuracy,
    calibrate,
    metric_name,
    mode_of,
    predict_labels,
)
from deltatune.prompting.demonstrations import (
    best_draw,
    calibration_sample,
    choose_demonstrations,
    example_key,
    fit_demonstrations,
    longest_continuation,
    plan_demonstrations,
    rank_demonstration_draws,
    select_demonstrations,
    selection_record,
)
from deltatune.prompting.prefix_cache import (
    complete,
    encode_text,
    generate_greedy,
    score_labels,
)

__all__ = ["CONTENT_FREE_INPUTS", "FewShotError", "PromptTemplate", "best_draw", "calibrate", "calibration_sample",
           "choose_demonstrations", "complete", "evaluate_fewshot", "example_key", "generate_greedy",
           "plan_demonstrations", "predict_labels", "rank_demonstration_draws", "score_labels",
           "select_demonstrations", "template_for"]

Example = dict[str, Any]


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
    "bbc-headlines": PromptTemplate("Headline: {text}\nTopic:"),
    "e2e": PromptTemplate("MR: {source}\nSentence:"),
}
GENERIC_CLASSIFICATION = PromptTemplate("Text: {text}\nLabel:")
GENERIC_PAIR_CLASSIFICATION = PromptTemplate("Text 1: {text}\nText 2: {text_pair}\nLabel:")
GENERIC_GENERATION = PromptTemplate("Input: {source}\nOutput:")
# a generation file's prompt is built by its own format (prompt-completion, Alpaca, chat): `file_sources`
FILE_GENERATION = PromptTemplate("{source}")


def template_for(task: Any, has_pair: bool = False) -> PromptTemplate:
    """The task's template from `TEMPLATES`, else a generic one for its kind."""
    if task.name in TEMPLATES:
        return TEMPLATES[task.name]
    if task.kind == "generation":
        return GENERIC_GENERATION if task.prompt_format is None else FILE_GENERATION
    if task.kind == "classification":
        return GENERIC_PAIR_CLASSIFICATION if has_pair else GENERIC_CLASSIFICATION
    raise FewShotError(
        f"few-shot prompting scores classes or generates text; task {task.name!r} is {task.kind}"
    )


def file_sources(task: Any, tokenizer: PreTrainedTokenizerBase, examples: list[Example]) -> list[Example]:
    """A generation file's examples as prompting examples: ``source`` is the prompt its format builds (the
    Alpaca prompt; a conversation up to its last assistant turn, rendered by the chat template with the
    assistant's header), ``target`` (train) or ``references`` (dev) what follows it."""
    converted = []
    for example in examples:
        if "messages" in example:
            messages = example["messages"] if "references" in example else example["messages"][:-1]
            source = task.prompt_format.render(tokenizer, messages, add_generation_prompt=True)
            answer = ({"references": example["references"]} if "references" in example
                      else {"target": example["messages"][-1]["content"]})
        else:
            source = example["prompt"]
            answer = {key: example[key] for key in ("target", "references") if key in example}
        converted.append({"source": source, **answer})
    return converted


def label_words_for(task: Any, template: PromptTemplate) -> list[str]:
    """Verbalizer words in label-id order."""
    names = list(task.label_names or [])
    words = list(template.label_words) if template.label_words else [" " + n.replace("_", " ") for n in names]
    if names and len(words) != len(names):
        raise FewShotError(f"template for {task.name!r} has {len(words)} label words for {len(names)} labels")
    return words


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
    if task.kind == "generation" and task.prompt_format is not None:  # the user's file: its own prompts
        examples, pool = file_sources(task, tokenizer, examples), file_sources(task, tokenizer, pool)
    template = template_for(task, has_pair=examples[0].get("text_pair") is not None)
    evaluated = {example_key(example) for example in examples}
    modes = ["raw", *CALIBRATIONS] if calibrate else ["raw"]
    started = time.perf_counter()
    ranking, plain_draw, reference = _draws_and_reference(
        model, tokenizer, task, template, pool, evaluated, shots, seed, select_from, validation_size, batch_size,
        calibration_inputs if batch_calibration else 0,
    )
    if not reference and "batch_calibrated" in modes:  # off, or evaluating on the train split itself
        modes.remove("batch_calibrated")
    selection, chosen = None, None
    if ranking:
        # each reported number uses the draw that was best for it on the held-out examples
        chosen = {mode: best_draw(ranking, metric_name(mode, "accuracy")) for mode in modes}
        selection = selection_record(
            ranking, **{"chosen_draw" + ("" if mode == "raw" else f"_{mode}"): draw for mode, draw in chosen.items()}
        )
    if classification:
        results = _classify_with_draws(model, tokenizer, task, template, examples, pool, shots, seed, modes,
                                       reference, plain_draw, ranking, chosen, batch_size, use_cache_prefix)
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


def _draws_and_reference(model, tokenizer, task, template, pool, evaluated, shots, seed, select_from, validation_size,
                         batch_size, calibration_inputs) -> tuple[dict | None, list[Example] | None, list[Example]]:
    """(the ranking of `select_from` draws or None, the one plain draw or None, the unlabeled training inputs
    of batch calibration). The calibration inputs are none of the evaluated examples, none of the
    demonstrations (`calibration_inputs` 0: no batch calibration)."""
    if select_from > 1 and shots > 0:
        if task.kind != "classification":
            raise FewShotError(
                f"choosing demonstrations (select_from={select_from}) scores label words, and task {task.name!r} "
                f"is {task.kind}; use select_from=1 (one seeded draw)"
            )
        ranking = rank_demonstration_draws(
            model, tokenizer, template, label_words_for(task, template), pool, shots, seed, select_from,
            validation_size, exclude=evaluated, batch_size=batch_size, calibration_inputs=calibration_inputs,
        )
        return ranking, None, ranking["calibration_set"]
    if calibration_inputs:
        plain_draw = select_demonstrations(pool, shots, seed)  # what plan_demonstrations would share
        evaluated_or_shown = evaluated | {example_key(d) for d in plain_draw}
        return None, plain_draw, calibration_sample(pool, calibration_inputs, seed, evaluated_or_shown)
    return None, None, []


def _classify_with_draws(model, tokenizer, task, template, examples, pool, shots, seed, modes, reference,
                        plain_draw, ranking, chosen, batch_size, use_cache_prefix) -> dict[str, Any]:
    """Classification metrics for every mode: with the plain draw, or (`chosen`: mode -> draw) each mode's
    numbers from the draw best for it, one pass per distinct draw."""
    reference_queries = [template.format_query(example) for example in reference]

    def run(shared: list[Example] | None) -> dict[str, Any]:
        groups = plan_demonstrations(examples, pool, shots, seed, shared=shared)
        return _evaluate_classification(model, tokenizer, task, template, examples, groups, modes,
                                        reference_queries, batch_size, use_cache_prefix)

    if chosen is None:
        return run(plain_draw)
    results = {}
    for draw in dict.fromkeys(chosen.values()):
        outcome = run(ranking["draws"][draw])
        results.update({name: value for name, value in outcome.items() if chosen[mode_of(name)] == draw})
    return results


def _evaluate_classification(
    model, tokenizer, task, template, examples, groups, modes, reference_queries, batch_size, use_cache_prefix
) -> dict[str, Any]:
    words = label_words_for(task, template)
    content_free = template.content_free_queries()
    predicted = {mode: torch.zeros(len(examples), dtype=torch.long) for mode in modes}
    used, prefix_tokens = [], 0
    for demonstrations, indices in groups:
        queries = [template.format_query(examples[i]) for i in indices]
        longest = longest_continuation(tokenizer, [*queries, *content_free, *reference_queries], words)
        kept, prefix_ids = fit_demonstrations(model, tokenizer, template, demonstrations, words, longest)
        prefix = template.build_prefix(kept, words)
        # reference_queries is empty exactly when batch calibration is off
        outcome = predict_labels(model, tokenizer, template, prefix, queries, words, batch_size, use_cache_prefix,
                                 reference_queries=reference_queries)
        for mode in modes:
            predicted[mode][indices] = outcome[mode]
        used.append(len(kept))
        prefix_tokens = max(prefix_tokens, len(prefix_ids))
    labels = [example["label"] for example in examples]
    results: dict[str, Any] = {"demonstrations": min(used), "prefix_tokens": prefix_tokens}
    for mode, values in predicted.items():
        metrics = {"accuracy": accuracy(values.tolist(), labels), **task.compute_metrics(values.tolist(), labels)}
        results.update({metric_name(mode, name): value for name, value in metrics.items()})
    return results


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
    metrics = task.compute_metrics(predictions, references, sources=[example.get("source") for example in examples])
    return {"demonstrations": min(used), "prefix_tokens": prefix_tokens, **metrics}
