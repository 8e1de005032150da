"""Tasks: what to train and evaluate on, read offline from the published files or from the dataset hub.

    from deltatune.tasks import get_task
    task = get_task("sst2")
    train = task.load("train", data_dir="../shared/data")
    scores = task.compute_metrics(predictions, [example["label"] for example in dev])

Built-in: GLUE (sst2, rte, mrpc, stsb, cola, mnli, qnli, qqp), E2E NLG (e2e) and BBC News (bbc-news); your own data
through "csv" / "jsonl". Metrics live in `deltatune.tasks.metrics` (E2E's in `e2e_metrics`).
"""

from deltatune.errors import DataError
from deltatune.tasks.catalog import TASK_NAMES, get_task
from deltatune.tasks.sources import DATA_DIR_ENV
from deltatune.tasks.task import Example, Task

__all__ = ["DATA_DIR_ENV", "TASK_NAMES", "DataError", "Example", "Task", "get_task"]
