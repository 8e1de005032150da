"""Which solved examples a k-shot prompt shows: seeded balanced draws, and choosing among draws.

With a handful of demonstrations, which ones are drawn moves a small LM's accuracy by tens of points
(Zhao et al. 2021, §3; SmolLM2 on SST-2, 4-shot: 51-84% over 12 draws). `select_demonstrations` draws
them with a seed; `plan_demonstrations` makes sure no example is shown its own answer;
`rank_demonstration_draws` scores several draws on held-out training examples so that one can be chosen
on training data only; `calibration_sample` holds out the unlabeled inputs of batch calibration;
`fit_demonstrations` drops demonstrations until the prompt fits the model's context.
"""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from deltatune.errors import FewShotError
from deltatune.prompting.calibration import CALIBRATIONS, accuracy, metric_name, predict_labels
from deltatune.prompting.prefix_cache import context_length, encode_text, prefix_token_ids

Example = dict[str, Any]


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
    template: Any,
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
    longest = longest_continuation(tokenizer, [*queries, *template.content_free_queries(), *reference_queries],
                                   label_words)
    labels = [example["label"] for example in validation]
    accuracies: dict[str, list[float]] = {}
    for draw in draws:
        kept, _ = fit_demonstrations(model, tokenizer, template, draw, label_words, longest)
        prefix = template.build_prefix(kept, label_words)
        predicted = predict_labels(model, tokenizer, template, prefix, queries, label_words, batch_size,
                                   reference_queries=reference_queries)
        for mode, values in predicted.items():
            accuracies.setdefault(metric_name(mode, "accuracy"), []).append(accuracy(values.tolist(), labels))
    return {"draws": draws, **accuracies, "validation_examples": len(validation), "calibration_set": reference,
            "seconds": round(time.perf_counter() - started, 2)}


def best_draw(ranking: dict[str, Any], by: str = "accuracy") -> int:
    """Index of the draw with the highest `by` accuracy on the held-out examples (ties: the earlier draw)."""
    return max(range(len(ranking[by])), key=lambda i: (ranking[by][i], -i))


def choose_demonstrations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: Any,
    label_words: Sequence[str],
    pool: Sequence[Example],
    shots: int,
    by: str = "accuracy",
    **ranking_options: Any,
) -> tuple[list[Example], dict[str, Any]]:
    """The best draw of `rank_demonstration_draws` (`ranking_options`: seed, candidates, validation_size, ...)
    by `by` (``accuracy``: raw label-word scores, ``calibrated_accuracy``, ``batch_calibrated_accuracy``),
    chosen on training data only: the demonstrations and a record of the choice."""
    ranking = rank_demonstration_draws(model, tokenizer, template, label_words, pool, shots, **ranking_options)
    best = best_draw(ranking, by)
    return ranking["draws"][best], selection_record(ranking, chosen_draw=best)


def selection_record(ranking: dict[str, Any], **chosen: int) -> dict[str, Any]:
    record = {"candidates": len(ranking["draws"]), "validation_examples": ranking["validation_examples"], **chosen}
    for mode in ("raw", *CALIBRATIONS):
        if metric_name(mode, "accuracy") in ranking:
            name = "validation_accuracies" if mode == "raw" else f"validation_{mode}_accuracies"
            record[name] = [round(a, 4) for a in ranking[metric_name(mode, "accuracy")]]
    return {**record, "seconds": ranking["seconds"]}


def longest_continuation(tokenizer: PreTrainedTokenizerBase, queries: Sequence[str], label_words: Sequence[str]) -> int:
    """Tokens the longest query plus the longest label word (all but its last token) add after the prefix."""
    longest_label = max((len(encode_text(tokenizer, word)) for word in label_words), default=1) - 1
    return max(len(encode_text(tokenizer, query)) for query in queries) + longest_label


def fit_demonstrations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: Any,
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
