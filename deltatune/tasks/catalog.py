"""Task name -> task: the only place the built-in tasks are listed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deltatune.errors import DataError
from deltatune.tasks.bbc import bbc_headlines_task, bbc_task
from deltatune.tasks.e2e import e2e_task
from deltatune.tasks.files import file_task
from deltatune.tasks.generation import generation_file_task
from deltatune.tasks.glue import glue_tasks
from deltatune.tasks.preference import preference_file_task
from deltatune.tasks.task import Task


def _glue(name: str) -> Callable[[], Task]:
    return lambda: next(task for task in glue_tasks() if task.name == name)


BUILT_IN_TASKS: dict[str, Callable[[], Task]] = {
    "sst2": _glue("sst2"),
    "rte": _glue("rte"),
    "mrpc": _glue("mrpc"),
    "stsb": _glue("stsb"),
    "cola": _glue("cola"),
    "mnli": _glue("mnli"),
    "qnli": _glue("qnli"),
    "qqp": _glue("qqp"),
    "e2e": e2e_task,
    "bbc-news": bbc_task,
    "bbc-headlines": bbc_headlines_task,
}
# the user's data: a file is read by its suffix (csv/tsv, jsonl, parquet, arrow), a folder as a `save_to_disk`
# dataset, `data=` in Python as a datasets.Dataset / DatasetDict (tasks/hf_datasets.py)
FILE_FORMATS = ("csv", "jsonl", "parquet", "arrow", "dataset")
TASK_NAMES: tuple[str, ...] = (*BUILT_IN_TASKS, *FILE_FORMATS)


def get_task(name: str, **options: Any) -> Task:
    """The task called `name`; the `FILE_FORMATS` take the user's data as options: `path` (a file or a
    `save_to_disk` folder) or `data` (a `datasets.Dataset` / `DatasetDict` in memory).

    Examples: ``get_task("csv", path="reviews.csv", text_columns=["review"], label_column="stars")``,
    ``get_task("dataset", data=load_from_disk("imdb"), text_columns="text")``
    (see `deltatune.tasks.files.file_task` for all options, `generation.generation_file_task` with `format`).
    """
    if name in FILE_FORMATS:
        if "path" not in options and "data" not in options:
            raise DataError(
                f"task {name!r} needs path=... (your {name} file) or data=... (a datasets.Dataset), plus "
                f"text_columns and label_column"
            )
        if options.pop("preference", False):  # DPO/SimPO pairs (training.preference)
            return preference_file_task(name, **options)
        if options.get("format"):  # generation: prompt-completion, alpaca or messages
            return generation_file_task(name, **options)
        options.pop("format", None)
        return file_task(name, **options)
    if name not in BUILT_IN_TASKS:
        raise DataError(
            f"unknown task {name!r}; the tasks are {list(TASK_NAMES)}. For your own data use 'csv' or "
            f"'jsonl' with a path to a .csv/.tsv/.jsonl file, its text column(s) and its label column."
        )
    if options:
        raise DataError(f"task {name!r} takes no options, got {sorted(options)} (options are for csv/jsonl)")
    return BUILT_IN_TASKS[name]()
