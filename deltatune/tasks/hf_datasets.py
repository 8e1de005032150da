"""Hugging Face `datasets` objects as the user's data: a `Dataset` or `DatasetDict` in memory, or read from a parquet
file, an arrow file or a `save_to_disk` folder. Their rows go through the same checks as a csv/jsonl file's
(`files.file_task` for classification and regression, `generation.generation_file_task` for generation).

Splits: a `Dataset` is the training data ("dev": a seeded 10% held out, or `dev_path`); a `DatasetDict` gives
"train" and, where it has one, "validation" (else "dev") as the dev split — never "test", whose labels the GLUE
datasets hide (-1). A `ClassLabel` label column gives the class names in id order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltatune.tasks.task import DataError

DATASET_SUFFIXES = (".parquet", ".arrow")
DEV_SPLITS = ("validation", "dev")


def is_dataset_path(path: str | Path) -> bool:
    """A parquet or arrow file, or a folder (written by `save_to_disk`)."""
    path = Path(path).expanduser()
    return path.suffix.lower() in DATASET_SUFFIXES or path.is_dir()


@dataclass
class DatasetSplits:
    """The training rows and the dev rows (None: hold some out) of one dataset, and where they came from."""

    source: str  # the path, or "a datasets.Dataset": what error messages name
    train: Any  # datasets.Dataset
    dev: Any | None
    dev_name: str | None = None  # the DatasetDict split that is "dev"
    from_dict: bool = False  # a DatasetDict: messages name the split

    def rows(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        """(row number from 1, row) of "train" or "dev"."""
        data = self.train if split == "train" else self.dev
        yield from enumerate(data, start=1)

    def where(self, split: str) -> str:
        """How messages name a split: "reviews.parquet" or "data/ (validation split)"."""
        return f"{self.source} ({'train' if split == 'train' else self.dev_name} split)" if self.from_dict \
            else self.source

    def class_names(self, column: str) -> list[str] | None:
        """The names of a `ClassLabel` column, in id order; None for any other column."""
        feature = (self.train.features or {}).get(column)
        return list(feature.names) if type(feature).__name__ == "ClassLabel" else None


def open_dataset(data: Any) -> DatasetSplits:
    """`data` (a `Dataset`, a `DatasetDict`, or the path of a parquet/arrow file or `save_to_disk` folder) as its
    train and dev splits; anything else is a `DataError` saying what is accepted."""
    if isinstance(data, str | Path):
        path = Path(data).expanduser()
        return _splits(read_dataset_path(path), str(path))
    return _splits(data, f"a datasets.{type(data).__name__}")


def file_task_source(file_format: str, path: Any, data: Any) -> tuple[Any, DatasetSplits | None]:
    """What a csv/jsonl/parquet/arrow/dataset task reads: `data` (in memory) or `path`, and its splits when it is
    a dataset (None: a csv/jsonl file, read row by row). Neither given is a `DataError`."""
    source = data if data is not None else path
    if source is None:
        raise DataError(f"task {file_format!r} needs path=... (a file or dataset folder) or data=... (a "
                        f"datasets.Dataset)")
    return source, open_dataset(source) if data is not None or is_dataset_path(source) else None


def read_dataset_path(path: Path) -> Any:
    """A parquet file, an arrow file (the IPC stream `datasets` writes, or an IPC file) or a `save_to_disk` folder,
    read into a `datasets.Dataset` / `DatasetDict` (arrow files memory-mapped, as `datasets` does)."""
    if not path.exists():
        raise DataError(f"data file {path} not found (resolved to {path.resolve()})")
    try:
        import datasets
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet/arrow files and dataset folders needs the `datasets` package: "
                        f"pip install datasets==5.2.0") from None
    try:
        if path.is_dir():
            return datasets.load_from_disk(str(path))
        if path.suffix.lower() == ".parquet":
            return datasets.Dataset(pq.read_table(path))
        try:
            return datasets.Dataset.from_file(str(path))  # `datasets`' own arrow files: the IPC stream format
        except pa.ArrowInvalid:
            with pa.memory_map(str(path)) as source:
                return datasets.Dataset(pa.ipc.open_file(source).read_all())
    except (pa.ArrowInvalid, OSError, FileNotFoundError, ValueError) as error:
        kind = "a dataset folder (datasets' save_to_disk)" if path.is_dir() else f"a {path.suffix[1:]} file"
        raise DataError(f"{path} cannot be read as {kind}: {error}") from None


def _splits(data: Any, source: str) -> DatasetSplits:
    kind = type(data).__name__
    if kind == "Dataset":
        return DatasetSplits(source, data, None)
    if kind == "DatasetDict":
        if "train" not in data:
            raise DataError(f"{source}: a DatasetDict needs a 'train' split; its splits are {list(data)}")
        dev_name = next((name for name in DEV_SPLITS if name in data), None)
        return DatasetSplits(source, data["train"], data[dev_name] if dev_name else None, dev_name, from_dict=True)
    if kind in ("IterableDataset", "IterableDatasetDict"):
        raise DataError(f"{source}: a streaming dataset cannot be held out from or read twice; load it without "
                        f"streaming=True (or take the rows you need: Dataset.from_list(list(data.take(n))))")
    raise DataError(f"expected a datasets.Dataset or DatasetDict (or the path of a parquet/arrow file or a "
                    f"save_to_disk folder), got {kind}")
