"""Metrics of free-form generation (the user's own generation files), each in 0..100 and averaged over
examples or computed over the corpus as their authors define them; several references per example
are allowed (each example scored against its best-matching reference).

- ``chrf``: character n-gram F-score (Popović 2015), sacrebleu's corpus chrF (n=6, beta=2);
- ``sacrebleu``: corpus BLEU (Papineni et al. 2002) with sacrebleu's standard 13a tokenisation (Post 2018);
- ``rougeL``: ROUGE-L F1 (Lin 2004 §3.1: longest common subsequence of lowercased words), mean over examples;
- ``exact_match``: percentage of predictions equal to a reference after stripping surrounding whitespace.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

TEXT_METRICS = ("chrf", "sacrebleu", "rougeL", "exact_match")
WORD = re.compile(r"[a-z0-9]+")


def _references_by_position(references: Sequence[Sequence[str]]) -> list[list[str]]:
    """sacrebleu's layout: one list per reference position; examples with fewer references repeat their
    first (a duplicate reference changes neither BLEU's clipped counts nor chrF's best match)."""
    width = max(len(refs) for refs in references)
    return [[refs[i] if i < len(refs) else refs[0] for refs in references] for i in range(width)]


def chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(predictions), _references_by_position(references)).score)


def sacrebleu_score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), _references_by_position(references)).score)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one pair, on lowercased alphanumeric words."""
    hypothesis, target = WORD.findall(prediction.lower()), WORD.findall(reference.lower())
    common = lcs_length(hypothesis, target)
    if common == 0:
        return 0.0
    precision, recall = common / len(hypothesis), common / len(target)
    return 2 * precision * recall / (precision + recall)


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    scores = [max(rouge_l_f1(p, r) for r in refs) for p, refs in zip(predictions, references, strict=True)]
    return 100.0 * sum(scores) / len(scores)


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    hits = [any(p.strip() == r.strip() for r in refs) for p, refs in zip(predictions, references, strict=True)]
    return 100.0 * sum(hits) / len(hits)


FUNCTIONS = {"chrf": chrf, "sacrebleu": sacrebleu_score, "rougeL": rouge_l, "exact_match": exact_match}


def compute_text_metrics(
    predictions: Sequence[str], references: Sequence[Sequence[str]], metrics: Sequence[str] = TEXT_METRICS
) -> dict[str, float]:
    return {name: FUNCTIONS[name](predictions, references) for name in metrics}
