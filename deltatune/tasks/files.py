"""The user's own data as a task: a CSV/TSV or JSON-lines file with one or two text columns and a label.

The label column decides the task kind: integers are class ids (classification), other numbers are
scores (regression), strings are class names (classification; ids follow sorted order unless
`label_names` gives the order). "dev" is `dev_path` if given, else a fixed seeded 10% of the rows held
out of "train".
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltatune.errors import DataError
from deltatune.tasks.generation import DEFAULT_COLUMNS
from deltatune.tasks.hf_datasets import file_task_source, is_dataset_path, open_dataset
from deltatune.tasks.sources import read_json_lines, read_table, split_off_dev
from deltatune.tasks.task import Task

INTEGER = re.compile(r"^[+-]?\d+$")


@dataclass
class Record:
    """One row of a user file: where it is, its text fields and its raw label."""

    path: Path | str  # a file, or a dataset ("data.parquet", "a datasets.DatasetDict (train split)")
    line: int
    texts: list[str]
    label: Any
    unit: str = "line"  # a dataset's rows: "row"

    def error(self, problem: str) -> DataError:
        return DataError(f"{self.path}, {self.unit} {self.line}: {problem}")


def read_csv_records(
    path: Path, text_columns: Sequence[str], label_column: str, delimiter: str
) -> list[Record]:
    """Rows of a CSV/TSV file (first line = header) with typed labels (see `typed_labels`)."""
    table = read_table(path, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL)
    missing = [name for name in [*text_columns, label_column] if name not in table.columns]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r}; the columns are {table.columns}"
                        + generation_hint(table.columns))
    text_indices = [table.column(name) for name in text_columns]
    label_index = table.column(label_column)
    records = []
    for line, fields in table.rows:
        record = Record(path, line, [fields[i] for i in text_indices], fields[label_index].strip())
        if not record.label:
            raise record.error(f"empty label in column {label_column!r}")
        records.append(record)
    for record, label in zip(records, typed_labels([r.label for r in records]), strict=True):
        record.label = label
    return records


def generation_hint(columns: Sequence[str]) -> str:
    """What to add to a missing-column error when the columns are a generation file's (`generation.FORMATS`): the
    --format to pass, which the classification reader cannot guess."""
    for file_format, fields in DEFAULT_COLUMNS.items():
        needed = [column for name, column in fields.items() if name != "input"]  # Alpaca's input may be absent
        if all(column in columns for column in needed):
            return (f". These are a generation file's columns ({file_format}): pass --format {file_format} "
                    f"(Python: format={file_format!r})")
    return ""


def typed_labels(texts: list[str]) -> list[int] | list[float] | list[str]:
    """CSV labels as ints if all are integers, else floats if all are numbers, else the strings."""
    if all(INTEGER.match(text) for text in texts):
        return [int(text) for text in texts]
    try:
        return [float(text) for text in texts]
    except ValueError:
        return texts


def read_jsonl_records(path: Path, text_columns: Sequence[str], label_column: str) -> list[Record]:
    """One JSON object per line; labels keep their JSON type (string, integer or number)."""
    records = dict_records(path, read_json_lines(path), text_columns, label_column)
    if not records:
        raise DataError(f"{path} is empty: expected one JSON object per line")
    return records


def dict_records(source: Path | str, rows: Iterable[tuple[int, dict]], text_columns: Sequence[str],
                 label_column: str, unit: str = "line") -> list[Record]:
    """Rows as mappings (a JSON-lines file's objects, a dataset's rows), numbered; labels keep their type."""
    records = []
    for line, row in rows:
        missing = [name for name in [*text_columns, label_column] if name not in row]
        if missing:
            raise DataError(f"{source}, {unit} {line}: no column {missing}; the columns are {list(row)}"
                            + generation_hint(row))
        record = Record(source, line, [row[name] for name in text_columns], row[label_column], unit)
        if not all(isinstance(value, str) for value in record.texts):
            raise record.error(f"text columns {list(text_columns)} must hold strings")
        if record.label is None or isinstance(record.label, list | dict):
            raise record.error(f"label {record.label!r} is not a class name, class id or score")
        if isinstance(record.label, bool):
            record.label = str(record.label).lower()
        records.append(record)
    return records


def label_kind(records: list[Record]) -> str:
    """``"int"`` (class ids), ``"float"`` (scores) or ``"str"`` (class names): the type of all labels."""
    if all(isinstance(r.label, str) for r in records):
        return "str"
    if all(isinstance(r.label, int) for r in records):
        return "int"
    if all(isinstance(r.label, int | float) for r in records):
        return "float"
    first_type = type(records[0].label)
    odd = next(r for r in records if type(r.label) is not first_type)
    raise odd.error(
        f"label {odd.label!r} is a {type(odd.label).__name__} but the first label is a {first_type.__name__}; "
        f"use one label type (class names, class ids or scores) in the whole file"
    )


def class_ids(
    records: list[Record], kind: str, label_names: Sequence[str] | None
) -> tuple[list[int], list[str]]:
    """Label ids and label names for classification records; out-of-range labels are `DataError`s."""
    if kind == "str":
        names = list(label_names) if label_names is not None else sorted({r.label for r in records})
        id_of = {name: i for i, name in enumerate(names)}
        for record in records:
            if record.label not in id_of:
                raise record.error(f"label {record.label!r} out of range: not one of label_names {names}")
        return [id_of[r.label] for r in records], names
    num_labels = len(label_names) if label_names is not None else max(r.label for r in records) + 1
    for record in records:
        if not 0 <= record.label < num_labels:
            raise record.error(f"label {record.label} out of range: class ids must be 0..{num_labels - 1}")
    names = list(label_names) if label_names is not None else [str(i) for i in range(num_labels)]
    return [r.label for r in records], names


def file_task(
    file_format: str,
    path: str | Path | None = None,
    text_columns: str | Sequence[str] = ("text",),
    label_column: str = "label",
    dev_path: str | Path | None = None,
    label_names: Sequence[str] | None = None,
    delimiter: str | None = None,
    name: str | None = None,
    data: Any = None,
) -> Task:
    """A task over the user's data, read now: a ``csv`` (or ``.tsv``) or ``jsonl`` file, a parquet or arrow file
    or a `save_to_disk` folder (`hf_datasets`), or a `datasets.Dataset` / `DatasetDict` in memory (`data`).

    Args:
        file_format: the task's name by default: ``"csv"``, ``"jsonl"``, ``"parquet"``, ``"arrow"``, ``"dataset"``
            (a file is read by its suffix, a folder as a dataset).
        path: the training data (also "dev", holding out a seeded 10%, unless `dev_path` is given or a
            DatasetDict has a validation split).
        text_columns: one column (single text) or two (text pair).
        label_column: class names, class ids (0..K-1) or scores.
        dev_path: a separate file for the "dev" split, same columns.
        label_names: class names in id order; fixes the id order (names) or the class count (ids); default: a
            dataset's `ClassLabel` names.
        delimiter: CSV field separator; default tab for ``.tsv`` files, comma otherwise.
        name: the task name (default: `file_format`).
        data: a `datasets.Dataset` or `DatasetDict` instead of `path`.
    """
    columns = [text_columns] if isinstance(text_columns, str) else list(text_columns)
    if len(columns) not in (1, 2):
        raise DataError(f"text_columns must name one or two columns (text, text pair), got {columns}")

    def read(file: str | Path, role: str = "train") -> list[Record]:
        file = Path(file).expanduser()
        if is_dataset_path(file):  # as the dev file: a DatasetDict's validation split, if it has one
            dataset = open_dataset(file)
            split = "dev" if role == "dev" and dataset.dev is not None else "train"
            return dataset_records(dataset, split, columns, label_column)
        if not file.is_file():
            raise DataError(f"data file {file} not found (resolved to {file.resolve()})")
        if file_format == "jsonl" or (file_format != "csv" and file.suffix.lower() in (".jsonl", ".json")):
            return read_jsonl_records(file, columns, label_column)
        separator = delimiter or ("\t" if file.suffix.lower() == ".tsv" else ",")
        return read_csv_records(file, columns, label_column, separator)

    source, splits = file_task_source(file_format, path, data)
    train = dataset_records(splits, "train", columns, label_column) if splits else read(source)
    dev = read(dev_path, "dev") if dev_path is not None else \
        dataset_records(splits, "dev", columns, label_column) if splits and splits.dev is not None else None
    if splits and label_names is None:
        label_names = splits.class_names(label_column)
    described = splits.source if splits else str(path)
    return records_task(train, dev, label_names, name or file_format,
                        f"user data from {described}" + (f" (dev: {dev_path})" if dev_path else ""), described)


def dataset_records(splits, split: str, columns: list[str], label_column: str) -> list[Record]:
    """The rows of a dataset's split as records, numbered from 1 ("row 3" in messages)."""
    records = dict_records(splits.where(split), splits.rows(split), columns, label_column, unit="row")
    if not records:
        raise DataError(f"{splits.where(split)} has no rows")
    return records


def records_task(train: list[Record], dev: list[Record] | None, label_names: Sequence[str] | None, name: str,
                 description: str, source: str) -> Task:
    """The classification or regression task of the records (the label type decides), "dev" being `dev` or a
    seeded share of `train`."""
    records = train + (dev or [])  # labels are checked before the holdout
    kind = label_kind(records)
    if kind == "float":
        if label_names is not None:
            raise DataError(f"{source}: the labels are scores (regression), so label_names does not apply")
        labels: list[Any] = [float(r.label) for r in records]
        names = None
        for record, score in zip(records, labels, strict=True):
            if not math.isfinite(score):
                raise record.error(f"score {record.label!r} is not a finite number")
    else:
        labels, names = class_ids(records, kind, label_names)
    examples = [
        {"text": r.texts[0], "text_pair": r.texts[1] if len(r.texts) == 2 else None, "label": label}
        for r, label in zip(records, labels, strict=True)
    ]
    if dev is None:
        splits = dict(zip(("train", "dev"), split_off_dev(examples, source), strict=True))
    else:
        splits = {"train": examples[: len(train)], "dev": examples[len(train) :]}
    return Task(
        name=name,
        kind="regression" if kind == "float" else "classification",
        metric_names=["pearson", "spearman"] if kind == "float" else ["accuracy", "macro_f1"],
        splits=("train", "dev"),
        loader=lambda split, data_dir: list(splits[split]),
        label_names=names,
        description=description,
    )
