"""Where built-in task data comes from, and reading delimited files with line numbers for errors.

Lookup order: the `data_dir` argument (``--data-dir``), else the folder in ``$DELTATUNE_DATA``, else the
dataset hub through the `datasets` package (imported only then), else a `DataError` naming both options.
A local folder is laid out like the benchmark files as published: ``glue/sst2/train.tsv``,
``e2e/devset.csv``, ...
"""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import os
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from deltatune.errors import DataError

DATA_DIR_ENV = "DELTATUNE_DATA"
DEV_FRACTION = 0.1  # the share of a task's rows held out as "dev" when it has no dev split of its own
T = TypeVar("T")


def local_data_root(data_dir: Path | None) -> Path | None:
    """The local data folder to read (`data_dir`, else ``$DELTATUNE_DATA``), or None to use the hub."""
    if data_dir is not None:
        root, given_by = Path(data_dir), "--data-dir"
    elif os.environ.get(DATA_DIR_ENV):
        root, given_by = Path(os.environ[DATA_DIR_ENV]).expanduser(), f"${DATA_DIR_ENV}"
    else:
        return None
    if not root.is_dir():
        raise DataError(f"data folder {root} (from {given_by}) does not exist or is not a folder")
    return root


def local_file(root: Path, relative: str, task_name: str) -> Path:
    """``root / relative``, or a `DataError` saying where it looked."""
    path = root / relative
    if not path.is_file():
        raise DataError(
            f"task {task_name!r}: missing file {relative!r} in data folder {root} (looked for {path}). "
            f"Point --data-dir / ${DATA_DIR_ENV} at a folder laid out like the published files "
            f"(e.g. glue/sst2/train.tsv, e2e/devset.csv)."
        )
    return path


def datasets_installed() -> bool:
    """Whether the `datasets` package (the dataset-hub client) can be imported."""
    return importlib.util.find_spec("datasets") is not None


def hub_split(task_name: str, dataset: str, config: str | None, split: str) -> Any:
    """One split of a dataset-hub dataset; raises the "no data" `DataError` if `datasets` is missing."""
    if not datasets_installed():
        raise DataError(
            f"no data for task {task_name!r}: either point --data-dir (or ${DATA_DIR_ENV}) at a folder "
            f"holding the benchmark files (e.g. glue/sst2/train.tsv, e2e/devset.csv), or "
            f"`pip install deltatune[hub]` (the `datasets` package) and have access to the Hugging Face "
            f"dataset hub."
        )
    import datasets  # only here: the offline path never needs it

    return datasets.load_dataset(dataset, config, split=split)


@dataclass
class Table:
    """A delimited file read into memory: column names and ``(line number, fields)`` rows."""

    path: Path
    columns: list[str]
    rows: list[tuple[int, list[str]]]

    def column(self, name: str) -> int:
        """Index of column `name`, or a `DataError` listing the columns that exist."""
        if name not in self.columns:
            raise DataError(f"{self.path}: no column {name!r}; the columns are {self.columns}")
        return self.columns.index(name)

    def error(self, line: int, problem: str) -> DataError:
        """A `DataError` pointing at one line of the file."""
        return DataError(f"{self.path}, line {line}: {problem}")


def read_json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON-lines file; a line that is not a JSON object
    is a `DataError` naming the file and line."""
    with open(path, encoding="utf-8-sig") as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, line {line}: malformed JSON ({error.msg})") from None
            if not isinstance(value, dict):
                raise DataError(f"{path}, line {line}: expected a JSON object, found {type(value).__name__}")
            yield line, value


def read_table(
    path: Path,
    *,
    delimiter: str = "\t",
    quoting: int = csv.QUOTE_NONE,
    column_names: Sequence[str] | None = None,
    allow_extra_fields: bool = False,
    skip_short_rows: bool = False,
) -> Table:
    """Read a delimited file; the first line is the header unless `column_names` are given.

    GLUE files are read with ``csv.QUOTE_NONE``: their text holds raw quote characters. A UTF-8 byte
    order mark (MRPC) is dropped. Blank lines are skipped; a row with the wrong number of fields is a
    `DataError` naming the line (`allow_extra_fields` tolerates trailing extras, as STS-B has;
    `skip_short_rows` drops rows with too few fields, as GLUE's reader of QQP does).
    """
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting, strict=True)
        records: list[tuple[int, list[str]]] = []
        last_line = 0
        try:
            for fields in reader:
                first_line, last_line = last_line + 1, reader.line_num  # a quoted field may span lines
                if fields:
                    records.append((first_line, fields))
        except csv.Error as error:
            raise DataError(f"{path}, line {reader.line_num}: malformed row ({error})") from error
    if column_names is None:
        if not records:
            raise DataError(f"{path} is empty: expected a header line and data rows")
        columns = [name.strip() for name in records.pop(0)[1]]
    else:
        columns = list(column_names)
    if skip_short_rows:
        records = [(line, fields) for line, fields in records if len(fields) >= len(columns)]
    table = Table(path, columns, records)
    if not records:
        raise DataError(f"{path} has no data rows")
    for line, fields in records:
        if len(fields) != len(columns) and not (allow_extra_fields and len(fields) > len(columns)):
            raise table.error(
                line, f"malformed row: expected {len(columns)} fields {columns}, found {len(fields)}"
            )
    return table


def parse_class_id(table: Table, line: int, text: str, num_labels: int) -> int:
    """An integer class id in ``0..num_labels-1`` read from a file, or a `DataError` for that line."""
    try:
        label = int(text)
    except ValueError:
        raise table.error(line, f"label {text!r} is not an integer class id") from None
    if not 0 <= label < num_labels:
        raise table.error(line, f"label {label} out of range: expected 0..{num_labels - 1}")
    return label


def split_off_dev(rows: list[T], source: str | Path, fraction: float = DEV_FRACTION, size: int | None = None,
                  dev_option: str | None = "--dev-file", seed: int = 0) -> tuple[list[T], list[T]]:
    """``(train, dev)``: a fixed seeded `fraction` of `rows` (rounded), or `size` rows, held out as "dev" (the same
    rows on every run and machine), both parts in file order. Rows too few to leave a row in each part are a
    `DataError` when the task is read, before any training (an empty dev set has nothing to score); it names
    `dev_option`, the option that gives a dev file instead, where there is one."""
    held = size if size is not None else round(len(rows) * fraction)
    if not 0 < held < len(rows):
        enough = size + 1 if size is not None else next(n for n in itertools.count(2) if 0 < round(n * fraction) < n)
        share = f"{size} rows" if size is not None else f"{fraction:.0%}"
        fix = f"pass {dev_option} or at least {enough} rows" if dev_option else f"it needs at least {enough} rows"
        raise DataError(f"{source}: {len(rows)} row{'s' * (len(rows) != 1)}: too few to hold out a dev set "
                        f"({share}); {fix}")
    held_out = set(random.Random(seed).sample(range(len(rows)), held))
    return ([row for i, row in enumerate(rows) if i not in held_out],
            [row for i, row in enumerate(rows) if i in held_out])


def stratified_holdout(labels: Sequence[Any], fraction: float, seed: int = 0) -> set[int]:
    """A fixed random `fraction` of the indices of each label (rounded), so both parts keep the label mix."""
    indices_by_label: dict[Any, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        indices_by_label[label].append(index)
    held_out: set[int] = set()
    rng = random.Random(seed)
    for label in sorted(indices_by_label):
        indices = indices_by_label[label]
        held_out.update(rng.sample(indices, round(len(indices) * fraction)))
    return held_out
