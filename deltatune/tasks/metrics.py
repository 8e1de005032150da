"""Task metrics by name, computed with scikit-learn and SciPy (E2E's text metrics: `e2e_metrics`).

Every function takes ``(predictions, references)`` and returns a float; `compute_metrics` runs several by
name. Correlations of a constant series are undefined; we report 0.0 for them, as scikit-learn does for
the Matthews coefficient, so that "keep the best checkpoint" comparisons never meet a NaN.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import stats
from sklearn import metrics as sk

from deltatune.tasks import e2e_metrics, text_metrics


def accuracy(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Fraction of predictions equal to the reference class."""
    return float(sk.accuracy_score(references, predictions))


def binary_f1(predictions: Sequence[int], references: Sequence[int]) -> float:
    """F1 of the positive class (label 1), as GLUE reports for MRPC."""
    return float(sk.f1_score(references, predictions, pos_label=1, average="binary", zero_division=0))


def macro_f1(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in references or predictions."""
    return float(sk.f1_score(references, predictions, average="macro", zero_division=0))


def matthews_corrcoef(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Matthews correlation (CoLA's metric): (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))."""
    return float(sk.matthews_corrcoef(references, predictions))


def _correlation(statistic: Callable, predictions: Sequence[float], references: Sequence[float]) -> float:
    predictions_array, references_array = np.asarray(predictions, float), np.asarray(references, float)
    if np.ptp(predictions_array) == 0 or np.ptp(references_array) == 0:
        return 0.0  # undefined for a constant series (see module docstring)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(statistic(predictions_array, references_array)[0])


def pearson(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Pearson correlation of predicted and reference scores."""
    return _correlation(stats.pearsonr, predictions, references)


def spearman(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Spearman rank correlation of predicted and reference scores."""
    return _correlation(stats.spearmanr, predictions, references)


LABEL_METRICS: dict[str, Callable[[Any, Any], float]] = {
    "accuracy": accuracy,
    "f1": binary_f1,
    "macro_f1": macro_f1,
    "matthews_corrcoef": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}
METRIC_NAMES = (*LABEL_METRICS, *e2e_metrics.E2E_METRICS, *text_metrics.TEXT_METRICS)


def compute_metrics(
    names: Sequence[str], predictions: Sequence[Any], references: Sequence[Any], sources: Sequence[str] | None = None
) -> dict[str, float]:
    """``{name: value}`` for each metric in `names` (label metrics and E2E text metrics may not mix). `sources`:
    each prediction's input text, for the metrics scored against it (E2E's slot error rate)."""
    unknown = [name for name in names if name not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {list(METRIC_NAMES)}")
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    for family, compute in [(e2e_metrics.E2E_METRICS, e2e_metrics.compute_e2e_metrics),
                            (text_metrics.TEXT_METRICS, text_metrics.compute_text_metrics)]:
        chosen = [name for name in names if name in family]
        if chosen:
            if len(chosen) != len(names):
                raise ValueError(f"cannot mix text metrics {chosen} with other metrics in one call")
            if family is e2e_metrics.E2E_METRICS:
                return compute(predictions, references, metrics=names, sources=sources)
            return compute(predictions, references, metrics=names)
    return {name: LABEL_METRICS[name](predictions, references) for name in names}
