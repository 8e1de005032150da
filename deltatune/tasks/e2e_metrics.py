"""E2E NLG metrics computed exactly like the official E2E scorer (``measure_scores.py``), offline.

Each output is scored against all references of its meaning representation together:

- BLEU and NIST as mteval-v13a: 13a tokenisation after lower-casing ASCII letters only. BLEU (4-grams,
  closest reference length, ties to the shorter) comes from sacrebleu; NIST (5-grams, information
  weights from all references of the corpus) is implemented here since no package matches mteval's.
- METEOR 1.5 (``-l en -norm``), ROUGE-L (β = 1.2, best precision and best recall over references) and
  CIDEr-D (σ = 6, clipped, ×10) from the coco-caption scorers of PyPI ``pycocoevalcap==1.2``, after its
  Stanford PTB tokenizer (lower-cased, punctuation dropped). These need Java (``java`` on PATH; Debian:
  ``apt-get install default-jre-headless``).
- SER, the slot error rate (lower is better; `e2e_slots`, after Dušek et al. 2020): scored against each output's
  meaning representation, not its references, so it needs the `sources`.

CIDEr's document frequencies come from the references passed in, so score a whole corpus in one call.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import string
import subprocess
import tempfile
from collections import Counter
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import sacrebleu
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from deltatune.errors import MetricUnavailableError
from deltatune.tasks.e2e_slots import slot_error_rate

E2E_METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider", "ser")
COCO_METRICS = ("meteor", "rouge_l", "cider")
NIST_MAX_N = 5
ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)  # what Perl's lc does to bytes
LINE_BREAKS = str.maketrans({c: " " for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


def compute_e2e_metrics(
    predictions: Sequence[str], references: Sequence[Sequence[str]], metrics: Sequence[str] | None = None,
    sources: Sequence[str] | None = None,
) -> dict[str, float]:
    """Corpus-level E2E scores: ``{"bleu", "nist", "meteor", "rouge_l", "cider"}`` and, given `sources`, "ser"
    (or the `metrics` asked).

    `references[i]` holds all references of the source of `predictions[i]`, `sources[i]` that source (the MR:
    needed for "ser" only). BLEU, METEOR, ROUGE-L and SER are in [0, 1]; NIST and CIDEr are unbounded (about
    8-9 and 1.8-2.3 for good E2E systems).
    """
    every = E2E_METRICS if sources is not None else [name for name in E2E_METRICS if name != "ser"]
    names = list(every if metrics is None else metrics)
    unknown = [name for name in names if name not in E2E_METRICS]
    if unknown:
        raise ValueError(f"unknown E2E metric(s) {unknown}; known: {list(E2E_METRICS)}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{i}] must be a non-empty list of strings, got {refs!r}")
    # The official scorer reads one stripped line per text.
    hypotheses = [text.translate(LINE_BREAKS).strip() for text in predictions]
    reference_lists = [[ref.translate(LINE_BREAKS).strip() for ref in refs] for refs in references]
    scores: dict[str, float] = {}
    if "ser" in names:
        if sources is None or len(sources) != len(predictions) or not all(isinstance(s, str) for s in sources):
            raise ValueError("the slot error rate ('ser') is scored against each output's meaning representation: "
                             "pass sources=[MR of each prediction]")
        scores["ser"] = slot_error_rate(sources, hypotheses)["ser"]
    if "bleu" in names:
        scores["bleu"] = bleu(hypotheses, reference_lists)
    if "nist" in names:
        scores["nist"] = nist(hypotheses, reference_lists)
    if any(name in names for name in COCO_METRICS):
        scores.update(coco_scores(hypotheses, reference_lists, [n for n in names if n in COCO_METRICS]))
    return {name: scores[name] for name in names}


# ---- BLEU and NIST (mteval-v13a) ----


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU in [0, 1] as mteval-v13a computes it (sacrebleu with its exact tokenisation)."""
    max_refs = max(len(refs) for refs in references)
    # One stream per reference index; None (not "") where a source has fewer references, since an empty
    # string would count as a zero-length reference in the closest-length brevity penalty.
    streams = [
        [refs[k].translate(ASCII_LOWER) if k < len(refs) else None for refs in references]
        for k in range(max_refs)
    ]
    scorer = sacrebleu.BLEU(tokenize="13a", lowercase=False, force=True)
    return scorer.corpus_score([h.translate(ASCII_LOWER) for h in hypotheses], streams).score / 100


def mteval_words(text: str) -> tuple[str, ...]:
    """mteval-v13a's tokens: ASCII lower-casing, then 13a tokenisation."""
    return tuple(Tokenizer13a()(text.translate(ASCII_LOWER)).split())


def ngram_counts(words: tuple[str, ...], max_n: int) -> Counter:
    """Counts of all n-grams (as word tuples) of length 1..max_n."""
    return Counter(words[i : i + n] for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


def nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = NIST_MAX_N) -> float:
    """Corpus NIST as mteval-v13a (as edited for E2E's varying number of references) computes it.

    info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn)), counting over all references of the corpus
    (for unigrams: total reference words / count). NIST = Σ_n [Σ info × clipped hypothesis n-gram count]
    / [hypothesis n-grams], clipping each count at its largest count in any single reference, times
    exp(-β·ln²(r)) for r = hypothesis words / average reference words (no penalty when r >= 1), where
    the average is total reference words ÷ the mean number of references per output.
    """
    hypothesis_words = [mteval_words(h) for h in hypotheses]
    reference_words = [[mteval_words(r) for r in refs] for refs in references]

    corpus_counts: Counter = Counter()
    total_reference_words = 0
    for refs in reference_words:
        for ref in refs:
            corpus_counts.update(ngram_counts(ref, max_n))
            total_reference_words += len(ref)

    def information(ngram: tuple[str, ...]) -> float:
        # mteval tests its (n-1)-gram string for truth, and Perl's "0" is false: a bigram starting with
        # the word "0" is weighed like a unigram. Kept for exact agreement.
        has_context = len(ngram) > 1 and ngram[:-1] != ("0",)
        context_count = corpus_counts[ngram[:-1]] if has_context else total_reference_words
        return math.log2(context_count / corpus_counts[ngram])

    information_sum = [0.0] * (max_n + 1)  # by n-gram length; index 0 unused
    hypothesis_ngrams = [0] * (max_n + 1)
    for hyp, refs in zip(hypothesis_words, reference_words, strict=True):
        max_reference_counts: Counter = Counter()
        for ref in refs:
            max_reference_counts |= ngram_counts(ref, max_n)  # |= keeps the larger count
        for ngram, count in ngram_counts(hyp, max_n).items():
            if ngram in max_reference_counts:
                information_sum[len(ngram)] += information(ngram) * min(count, max_reference_counts[ngram])
        for n in range(1, max_n + 1):
            hypothesis_ngrams[n] += max(len(hyp) - n + 1, 0)

    score = sum(information_sum[n] / max(hypothesis_ngrams[n], 1) for n in range(1, max_n + 1))
    mean_references = sum(len(refs) for refs in references) / len(references)
    return score * nist_length_penalty(hypothesis_ngrams[1] / (total_reference_words / mean_references))


def nist_length_penalty(ratio: float) -> float:
    """1 for ratio >= 1, else exp(-β·ln²(ratio)) with β set so that a ratio of 2/3 gives 0.5 (mteval)."""
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) ** 2
    return math.exp(-beta * math.log(ratio) ** 2)


# ---- METEOR, ROUGE-L, CIDEr (coco-caption) ----


def coco_package() -> Path:
    """The installed ``pycocoevalcap`` folder, after checking that it and Java are usable."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise MetricUnavailableError(
            "METEOR, ROUGE-L and CIDEr need the coco-caption scorers: pip install pycocoevalcap==1.2 "
            "(or ask only for metrics=['bleu', 'nist'])"
        )
    if shutil.which("java") is None:
        raise MetricUnavailableError(
            "METEOR, ROUGE-L and CIDEr need Java for the METEOR 1.5 and Stanford tokenizer jars: install a "
            "Java runtime (Debian/Ubuntu: apt-get install default-jre-headless), or ask only for "
            "metrics=['bleu', 'nist']"
        )
    return Path(spec.submodule_search_locations[0])


def ptb_tokenize(texts: list[str]) -> list[str]:
    """coco-caption's PTBTokenizer: Stanford PTB tokens, lower-cased, punctuation tokens dropped.

    Same command and punctuation list as ``pycocoevalcap.tokenizer.ptbtokenizer``, but the temporary
    file goes to the system temp folder (theirs goes into site-packages, which may be read-only), and
    all texts go through one JVM start.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, STANFORD_CORENLP_3_4_1_JAR

    jar = coco_package() / "tokenizer" / STANFORD_CORENLP_3_4_1_JAR
    with tempfile.TemporaryDirectory(prefix="deltatune-ptb-") as folder:
        text_file = Path(folder) / "sentences.txt"
        text_file.write_text("\n".join(texts), encoding="utf-8")
        command = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines"]
        result = subprocess.run([*command, "-lowerCase", str(text_file)], capture_output=True, check=False)
    if result.returncode != 0:
        raise MetricUnavailableError(f"the Stanford PTB tokenizer failed: {result.stderr.decode()[-2000:]}")
    lines = result.stdout.decode("utf-8").split("\n")
    lines += [""] * (len(texts) - len(lines))  # trailing empty texts may yield no output line
    punctuation = set(PUNCTUATIONS)
    return [
        " ".join(w for w in line.rstrip().split(" ") if w not in punctuation) for line in lines[: len(texts)]
    ]


@cache
def meteor_scorer() -> Any:
    """One METEOR 1.5 process for the whole session: starting it (JVM + 61 MB table) takes seconds."""
    coco_package()
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def coco_scores(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], metrics: Sequence[str] = COCO_METRICS
) -> dict[str, float]:
    """METEOR, ROUGE-L and CIDEr-D of the corpus with the coco-caption scorers, after PTB tokenisation."""
    coco_package()
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    tokenized = ptb_tokenize([*hypotheses, *(ref for refs in references for ref in refs)])
    results: dict[int, list[str]] = {i: [text] for i, text in enumerate(tokenized[: len(hypotheses)])}
    gold: dict[int, list[str]] = {}
    position = len(hypotheses)
    for i, refs in enumerate(references):
        gold[i] = tokenized[position : position + len(refs)]
        position += len(refs)
    scorers = {"meteor": meteor_scorer, "rouge_l": Rouge, "cider": Cider}
    return {name: float(scorers[name]().compute_score(gold, results)[0]) for name in metrics}
