"""Metrics against numbers worked out by hand, and the E2E scores of the official script."""

from __future__ import annotations

import math
import shutil

import pytest

from deltatune.tasks import get_task
from deltatune.tasks.e2e import group_by_source, read_pairs
from deltatune.tasks.e2e_metrics import bleu, compute_e2e_metrics, nist, nist_length_penalty
from deltatune.tasks.metrics import compute_metrics

needs_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="METEOR, ROUGE-L and CIDEr run the coco-caption Java tools"
)


def test_accuracy_three_of_four():
    assert compute_metrics(["accuracy"], [1, 0, 1, 1], [1, 0, 0, 1]) == {"accuracy": 0.75}


def test_binary_scores_from_a_confusion_matrix():
    # references 1 1 1 0 0 0, predictions 1 1 0 0 0 1: TP = 2, FN = 1, TN = 2, FP = 1.
    # MCC = (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 − 1) / sqrt(3·3·3·3) = 1/3
    # F1 (class 1) = 2·P·R / (P + R) with P = R = 2/3 -> 2/3; accuracy 4/6.
    predictions, references = [1, 1, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0]
    scores = compute_metrics(["matthews_corrcoef", "f1", "accuracy"], predictions, references)
    assert scores == pytest.approx({"matthews_corrcoef": 1 / 3, "f1": 2 / 3, "accuracy": 4 / 6})
    assert list(scores) == ["matthews_corrcoef", "f1", "accuracy"]


def test_macro_f1():
    # class 0: TP 1, FP 0, FN 1 -> P 1, R 1/2, F1 2/3;  class 1: TP 1, FP 1, FN 0 -> F1 2/3;
    # class 2: TP 1, FP 0, FN 0 -> F1 1.  Mean = (2/3 + 2/3 + 1) / 3 = 7/9.
    scores = compute_metrics(["macro_f1"], [0, 1, 1, 2], [0, 0, 1, 2])
    assert scores["macro_f1"] == pytest.approx(7 / 9)


def test_correlations():
    # [1, 2, 3] vs [1, 3, 2]: deviations (−1, 0, 1) and (−1, 1, 0): covariance 1, variances 2 -> r = 1/2;
    # Spearman 1 − 6·Σd² / (n(n² − 1)) = 1 − 6·2 / 24 = 1/2.
    scores = compute_metrics(["pearson", "spearman"], [1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert scores == pytest.approx({"pearson": 0.5, "spearman": 0.5})
    assert compute_metrics(["pearson"], [1.0, 2.0, 4.0], [2.0, 4.0, 8.0])["pearson"] == pytest.approx(1.0)
    # a constant series has no correlation; reported as 0.0, never NaN
    assert compute_metrics(["pearson", "spearman"], [2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == {
        "pearson": 0.0,
        "spearman": 0.0,
    }


def test_task_compute_metrics_main_metric_first_and_subsets():
    task = get_task("mrpc")
    assert list(task.compute_metrics([1, 0, 1], [1, 1, 1])) == ["accuracy", "f1"]
    assert task.compute_metrics([1, 0, 1], [1, 1, 1], metrics=["f1"]) == pytest.approx({"f1": 0.8})
    with pytest.raises(ValueError, match="no metric"):
        task.compute_metrics([1], [1], metrics=["bleu"])
    with pytest.raises(ValueError, match="2 predictions but 3 references"):
        task.compute_metrics([1, 0], [1, 1, 1])


def test_nist_by_hand():
    # Segment 1: output "a b", references "a b c" and "a b"; segment 2: output "a", reference "a d".
    # Reference counts over the corpus: 7 words; a 3, b 2, c 1, d 1; "a b" 2, "b c" 1, "a d" 1, "a b c" 1.
    # info(a) = log2(7/3), info(b) = log2(7/2), info(a b) = log2(count(a) / count(a b)) = log2(3/2).
    # Unigrams: (info(a) + info(b) + info(a)) / 3 output unigrams; bigrams: info(a b) / 1 output bigram.
    # Length: 3 output words vs 7 reference words / 1.5 references per output -> r = 9/14 < 1, so
    # penalty exp(−β ln²(r)) with β = −ln 0.5 / ln² 1.5.
    information = (2 * math.log2(7 / 3) + math.log2(7 / 2)) / 3 + math.log2(3 / 2)
    beta = -math.log(0.5) / math.log(1.5) ** 2
    expected = information * math.exp(-beta * math.log(9 / 14) ** 2)  # ≈ 0.8792
    assert nist(["a b", "a"], [["a b c", "a b"], ["a d"]]) == pytest.approx(expected)
    assert nist_length_penalty(2 / 3) == pytest.approx(0.5)
    assert nist_length_penalty(1.2) == 1.0


def test_bleu_of_references_is_one():
    references = [["The Eagle is a cheap coffee shop near Burger King.", "A different sentence here."]]
    references.append(["Zizzi serves French food in the city centre, rated 5 out of 5."])
    assert bleu([refs[0] for refs in references], references) == pytest.approx(1.0)
    # upper/lower case of ASCII letters does not matter (mteval lower-cases)
    assert bleu([refs[0].upper() for refs in references], references) == pytest.approx(1.0)


@needs_java
def test_all_e2e_metrics_of_references():
    pytest.importorskip("pycocoevalcap", reason="METEOR, ROUGE-L and CIDEr come from pycocoevalcap==1.2")
    references = [
        [
            "The Eagle is a cheap coffee shop near Burger King.",
            "Near Burger King is The Eagle, a cheap cafe.",
        ],
        ["Zizzi serves French food in the city centre.", "In the city centre, Zizzi offers French food."],
    ]
    scores = compute_e2e_metrics([refs[0] for refs in references], references)
    assert list(scores) == ["bleu", "nist", "meteor", "rouge_l", "cider"]
    assert scores["bleu"] == pytest.approx(1.0)
    assert scores["meteor"] == pytest.approx(1.0)
    assert scores["rouge_l"] == pytest.approx(1.0)
    assert compute_e2e_metrics(["", "x"], references, metrics=["rouge_l", "bleu"]) == {
        "rouge_l": 0.0,
        "bleu": 0.0,
    }


@needs_java
@pytest.mark.slow
def test_e2e_scores_match_the_official_script(data_dir):
    """The check in shared/reference/e2e-metrics.md: first reference of each test MR with >= 2 references
    as the output, the others as references; numbers from the official measure_scores.py."""
    pytest.importorskip("pycocoevalcap", reason="METEOR, ROUGE-L and CIDEr come from pycocoevalcap==1.2")
    groups = [
        refs for _, refs in group_by_source(read_pairs(data_dir, "testset_w_refs.csv")) if len(refs) >= 2
    ]
    assert (len(groups), sum(len(refs) - 1 for refs in groups)) == (616, 4_063)
    scores = compute_e2e_metrics([refs[0] for refs in groups], [refs[1:] for refs in groups])
    official = {"bleu": 0.6046, "nist": 8.9029, "meteor": 0.4563, "rouge_l": 0.6381, "cider": 1.8572}
    assert scores == pytest.approx(official, abs=1e-4)
