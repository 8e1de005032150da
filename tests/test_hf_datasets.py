"""`datasets` objects as the user's data (deltatune/tasks/hf_datasets.py): a Dataset / DatasetDict in memory, a parquet
file, an arrow file (stream and IPC file) and a save_to_disk folder give the examples the same rows give as a csv or
jsonl file, and train the same delta."""

from __future__ import annotations

import csv
import json

import pytest

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")

from deltatune.cli import main as cli_main  # noqa: E402
from deltatune.errors import DataError  # noqa: E402
from deltatune.tasks import get_task  # noqa: E402
from deltatune.training.loop import TrainConfig, train  # noqa: E402

COLUMNS = {"text_columns": ["review"], "label_column": "sentiment"}


def csv_rows(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def splits(task) -> dict:
    return {split: task.load(split) for split in task.splits}


def test_every_container_gives_the_csv_files_examples(sentiment_csv, tmp_path):
    """The same rows as csv, jsonl, parquet, arrow (stream and file), a save_to_disk folder and in memory:
    the same train and dev examples (the dev rows held out by the same seed) and the same label names."""
    rows = csv_rows(sentiment_csv)
    dataset = datasets.Dataset.from_list(rows)
    (tmp_path / "reviews.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset.to_parquet(str(tmp_path / "reviews.parquet"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    (stream,) = (tmp_path / "saved").glob("*.arrow")  # datasets' own arrow files: the IPC stream format
    with pa.OSFile(str(tmp_path / "ipc.arrow"), "wb") as sink, pa.ipc.new_file(sink, dataset.data.schema) as writer:
        writer.write_table(dataset.data.table)

    expected = get_task("csv", path=str(sentiment_csv), **COLUMNS)
    tasks = {
        "jsonl": get_task("jsonl", path=str(tmp_path / "reviews.jsonl"), **COLUMNS),
        "parquet": get_task("parquet", path=str(tmp_path / "reviews.parquet"), **COLUMNS),
        "arrow stream": get_task("arrow", path=str(stream), **COLUMNS),
        "arrow file": get_task("arrow", path=str(tmp_path / "ipc.arrow"), **COLUMNS),
        "folder": get_task("dataset", path=str(tmp_path / "saved"), **COLUMNS),
        "in memory": get_task("dataset", data=dataset, **COLUMNS),
    }
    assert len(expected.load("dev")) == round(len(rows) * 0.1)
    for container, task in tasks.items():
        assert splits(task) == splits(expected), container
        assert task.label_names == expected.label_names == ["negative", "positive"], container


def test_a_dataset_dicts_validation_split_and_class_label_names(tmp_path):
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["pos", "neg"])})  # not in sorted order
    train = datasets.Dataset.from_dict({"sentence": ["good", "bad", "fine"], "label": [0, 1, 0]}, features=features)
    validation = datasets.Dataset.from_dict({"sentence": ["awful"], "label": [1]}, features=features)
    test = datasets.Dataset.from_dict({"sentence": ["hidden"], "label": [-1]}, features=features)  # GLUE's test
    data = datasets.DatasetDict({"train": train, "validation": validation, "test": test})
    data.save_to_disk(str(tmp_path / "glue-like"))
    for task in (get_task("dataset", data=data, text_columns="sentence"),
                 get_task("dataset", path=str(tmp_path / "glue-like"), text_columns="sentence")):
        assert task.label_names == ["pos", "neg"]
        assert task.load("train") == [{"text": t, "text_pair": None, "label": y}
                                       for t, y in [("good", 0), ("bad", 1), ("fine", 0)]]
        assert task.load("dev") == [{"text": "awful", "text_pair": None, "label": 1}]
    # `deltatune eval --data-file FOLDER` scores the file whole (dev_path = the folder): its validation split
    scored = get_task("dataset", path=str(tmp_path / "glue-like"), dev_path=str(tmp_path / "glue-like"),
                      text_columns="sentence")
    assert scored.load("dev") == [{"text": "awful", "text_pair": None, "label": 1}]


def test_generation_rows_from_a_dataset_equal_the_jsonl_files(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"what is {i} + {i}?"},
                          {"role": "assistant", "content": str(2 * i)}]} for i in range(20)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "chat.parquet"))
    from_file = get_task("jsonl", path=str(tmp_path / "chat.jsonl"), format="messages")
    strip = [{k: v for k, v in e.items() if k != "where"} for e in from_file.load("train")]
    for task in (get_task("parquet", path=str(tmp_path / "chat.parquet"), format="messages"),
                 get_task("dataset", data=datasets.Dataset.from_list(rows), format="messages")):
        assert [{k: v for k, v in e.items() if k != "where"} for e in task.load("train")] == strip
        assert task.load("dev") == from_file.load("dev") and task.kind == "generation"
    pairs = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"q": "a", "a": "b"}] * 3),
                                  "validation": datasets.Dataset.from_list([{"q": "c", "a": "d"}])})
    task = get_task("dataset", data=pairs, format="prompt-completion", columns={"prompt": "q", "completion": "a"})
    assert task.load("dev") == [{"prompt": "c", "references": ["d"]}] and len(task.load("train")) == 3


def test_parquet_and_in_memory_data_train_the_csv_files_delta(tiny_model_dir, sentiment_csv, tmp_path):
    dataset = datasets.Dataset.from_list(csv_rows(sentiment_csv))
    dataset.to_parquet(str(tmp_path / "reviews.parquet"))
    common = ["--model", str(tiny_model_dir), "--method", "lora", "--max-steps", "4", "--batch-size", "8",
              "--seed", "2", "--precision", "fp32", "--no-progress", "--text-columns", "review",
              "--label-column", "sentiment"]
    assert cli_main(["train", "--task", "csv", "--data-file", str(sentiment_csv), "--out", str(tmp_path / "csv"),
                     *common]) == 0
    assert cli_main(["train", "--task", "parquet", "--data-file", str(tmp_path / "reviews.parquet"),
                     "--out", str(tmp_path / "parquet"), *common]) == 0
    train(TrainConfig(model=str(tiny_model_dir), task="dataset", method="lora", out=str(tmp_path / "memory"),
                      task_options={"data": dataset, **COLUMNS}, max_steps=4, batch_size=8, seed=2,
                      progress=False))
    weights = {name: (tmp_path / name / "delta" / "delta.safetensors").read_bytes()
               for name in ("csv", "parquet", "memory")}
    assert weights["parquet"] == weights["csv"] and weights["memory"] == weights["csv"]
    assert "not saved" in (tmp_path / "memory" / "config.yaml").read_text()  # named, not copied


def test_bad_datasets_are_refused_naming_the_row_or_the_split(tmp_path):
    with pytest.raises(DataError, match=r"a datasets.Dataset, row 1: no column \['sentiment'\]; the columns are "):
        get_task("dataset", data=datasets.Dataset.from_list([{"review": "a", "stars": 1}]), **COLUMNS)
    with pytest.raises(DataError, match=r"a datasets.Dataset, row 2: label None is not a class name"):  # a gap
        get_task("dataset", data=datasets.Dataset.from_list([{"review": "a", "sentiment": "x"}, {"review": "b"}]),
                 **COLUMNS)
    with pytest.raises(DataError, match=r"needs a 'train' split; its splits are \['validation'\]"):
        get_task("dataset", data=datasets.DatasetDict({"validation": datasets.Dataset.from_list([{"a": "b"}])}))
    with pytest.raises(DataError, match="streaming"):
        get_task("dataset", data=datasets.Dataset.from_list([{"text": "a", "label": 0}]).to_iterable_dataset())
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="broken.parquet cannot be read as a parquet file"):
        get_task("parquet", path=str(tmp_path / "broken.parquet"))
