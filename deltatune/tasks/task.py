"""What a task is: its kind, labels, splits, how to load its examples and how to score predictions.

A `Task` is plain data plus two functions. Example shapes, by `kind`:

- classification / regression: ``{"text": str, "text_pair": str | None, "label": int | float}``
- generation, "train" split: ``{"source": str, "target": str}`` (one example per reference)
- generation, evaluation splits: ``{"source": str, "references": list[str]}`` (all references of a source)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from deltatune.errors import DataError

TaskKind = Literal["classification", "regression", "generation"]
Example = dict[str, Any]
# (split, data_dir) -> examples; data_dir None means "DELTATUNE_DATA, else the dataset hub".
Loader = Callable[[str, Path | None], list[Example]]


@dataclass(frozen=True)
class Task:
    """One benchmark task (or the user's own file) with its data loader and metrics.

    Attributes:
        name: registry name, e.g. ``"sst2"``.
        kind: ``"classification"``, ``"regression"`` or ``"generation"``.
        metric_names: metrics `compute_metrics` reports; the first is the one "keep best" uses.
        splits: the split names `load` accepts, e.g. ``("train", "dev")``.
        loader: reads one split; called by `load`, which validates the split name and applies `limit`.
        label_names: class names in label-id order (classification only).
        description: one line for listings and reports.
        prompt_format: generation from the user's files: how examples become prompts and targets
            (a `deltatune.tasks.generation.PromptFormat`, saved with the delta); None for built-in tasks.
    """

    name: str
    kind: TaskKind
    metric_names: list[str]
    splits: tuple[str, ...]
    loader: Loader
    label_names: list[str] | None = None
    description: str = ""
    prompt_format: Any = None

    @property
    def num_labels(self) -> int:
        """Classes for classification, 1 for regression (one score), 0 for generation."""
        if self.kind == "classification":
            return len(self.label_names or [])
        return 1 if self.kind == "regression" else 0

    def load(self, split: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Example]:
        """Examples of one split, in a fixed order; `limit` keeps the first `limit` of them.

        Data is read from `data_dir`, else from the folder in ``$DELTATUNE_DATA``, else from the dataset
        hub (needs the `datasets` package and network access).
        """
        if split not in self.splits:
            raise DataError(f"task {self.name!r} has no split {split!r}; its splits are {list(self.splits)}")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        examples = self.loader(split, Path(data_dir).expanduser() if data_dir is not None else None)
        return examples if limit is None else examples[:limit]

    def compute_metrics(
        self, predictions: Sequence[Any], references: Sequence[Any], metrics: Sequence[str] | None = None,
        sources: Sequence[str] | None = None,
    ) -> dict[str, float]:
        """Score predictions against references; returns ``{metric name: value}`` in `metric_names` order.

        Classification takes class ids, regression floats, generation strings against lists of
        reference strings (all references of one source). `metrics` picks a subset of `metric_names`
        (e.g. skip the slow METEOR during training). `sources`: each prediction's input (E2E: the MR), which
        the slot error rate is scored against.
        """
        # Imported here so that listing tasks does not import scikit-learn, scipy or sacrebleu.
        from deltatune.tasks.metrics import compute_metrics

        names = list(self.metric_names if metrics is None else metrics)
        unknown = [name for name in names if name not in self.metric_names]
        if unknown:
            raise ValueError(
                f"task {self.name!r} has no metric {unknown}; its metrics are {self.metric_names}"
            )
        return compute_metrics(names, predictions, references, sources)
