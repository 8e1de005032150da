"""Label-word predictions, raw and calibrated: the decision rule of zero-/few-shot classification.

A frozen LM scores each class's verbalizer word after the prompt (`prefix_cache.score_labels`); the raw
prediction is the best-scoring word. A prompt leans towards some words whatever the input, so two
calibrations divide the label probabilities by a reference distribution (`calibrate`):

- **contextual** (Zhao et al. 2021, "Calibrate Before Use", §5): the mean over content-free inputs
  ("N/A", "[MASK]", "");
- **batch** (Zhou et al. 2024, "Batch Calibration", ICLR, arXiv:2309.17249): the mean over real unlabeled inputs,
  ``p_bc(y) = mean_j p(y|x_j)``. The paper takes the test batch; deltatune takes training inputs with
  their labels unread (`demonstrations.calibration_sample`), so the test set is never looked at.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from deltatune.prompting.prefix_cache import score_labels

# Zhao et al. (2021) average the calibration over these three content-free inputs.
CONTENT_FREE_INPUTS: tuple[str, ...] = ("N/A", "[MASK]", "")
# Prediction modes of label-word scoring; a mode's metrics are named ``<mode>_<metric>`` (raw: ``<metric>``).
CALIBRATIONS: tuple[str, ...] = ("calibrated", "batch_calibrated")


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


def mode_of(name: str) -> str:
    """The prediction mode a metric name belongs to (``raw``, ``calibrated``, ``batch_calibrated``)."""
    return next((mode for mode in CALIBRATIONS if name.startswith(mode + "_")), "raw")


def predict_labels(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: Any,
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


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    return sum(p == y for p, y in zip(predictions, labels)) / len(labels)
