"""GLUE tasks: SST-2, RTE, MRPC, STS-B, CoLA, MNLI, QNLI and QQP, from the published files or the hub.

Local layout (``--data-dir`` / ``$DELTATUNE_DATA``)::

    glue/sst2/{train,dev}.tsv                 sentence, label
    glue/rte/{train,dev}.tsv                  sentence1, sentence2, label, idx
    glue/mrpc/msr_paraphrase_{train,test}.txt Quality, #1 ID, #2 ID, #1 String, #2 String
    glue/stsb/sts-{train,dev,test}.csv        genre, file, year, id, score, sentence1, sentence2 (no header)
    glue/cola/train.tsv, dev_{in,out_of}_domain.tsv   x, y
    glue/mnli/train.tsv, dev_matched.tsv, dev_mismatched.tsv
                                              index, promptID, pairID, genre, 4 parse columns, sentence1,
                                              sentence2, label1 (dev: label1..label5), gold_label
    glue/qnli/{train,dev}.tsv                 index, question, sentence, label
    glue/qqp/{train,dev}.tsv                  id, qid1, qid2, question1, question2, is_duplicate

All are tab-separated text with raw quote characters, so they are read with ``csv.QUOTE_NONE``.
MNLI and QNLI labels are words ("entailment", ...), read in the hub's label-id order. In QQP's train
file a question holding a line break splits its row in two short rows; GLUE's own reader skips rows
with too few fields (Wang et al. 2019's `QqpProcessor`), and so does this one.
"""

from __future__ import annotations

from pathlib import Path

from deltatune.errors import DataError
from deltatune.tasks.sources import (
    Table,
    hub_split,
    local_data_root,
    local_file,
    parse_class_id,
    read_table,
    split_off_dev,
)
from deltatune.tasks.task import Example, Loader, Task

MRPC_DEV_SIZE = 408  # GLUE's MRPC dev set: 408 pairs taken out of the Microsoft train file
STSB_COLUMNS = ("genre", "file", "year", "id", "score", "sentence1", "sentence2")
HUB_SPLIT_NAMES = {"train": "train", "dev": "validation", "test": "test"}
# MNLI's two dev sets: "matched" (the genres of its train set) and "mismatched" (other genres)
MNLI_DEV_FILES = {"dev": "dev_matched.tsv", "dev_mismatched": "dev_mismatched.tsv"}
MNLI_HUB_SPLITS = {"train": "train", "dev": "validation_matched", "dev_mismatched": "validation_mismatched"}
MNLI_LABELS = ["entailment", "neutral", "contradiction"]  # the hub's label ids 0, 1, 2
QNLI_LABELS = ["entailment", "not_entailment"]
# task -> (text column, text-pair column) in the hub's GLUE dataset
HUB_TEXT_COLUMNS = {
    "sst2": ("sentence", None),
    "cola": ("sentence", None),
    "rte": ("sentence1", "sentence2"),
    "mrpc": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"),
    "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
}


def labelled_examples(
    table: Table, text: str, text_pair: str | None, label: str, num_labels: int
) -> list[Example]:
    """Classification examples from named columns of a table; labels are checked to be class ids."""
    text_index, label_index = table.column(text), table.column(label)
    pair_index = table.column(text_pair) if text_pair else None
    return [
        {
            "text": fields[text_index],
            "text_pair": fields[pair_index] if pair_index is not None else None,
            "label": parse_class_id(table, line, fields[label_index], num_labels),
        }
        for line, fields in table.rows
    ]


def read_sst2(root: Path, split: str) -> list[Example]:
    table = read_table(local_file(root, f"glue/sst2/{split}.tsv", "sst2"))
    return labelled_examples(table, "sentence", None, "label", 2)


def read_rte(root: Path, split: str) -> list[Example]:
    table = read_table(local_file(root, f"glue/rte/{split}.tsv", "rte"))
    return labelled_examples(table, "sentence1", "sentence2", "label", 2)


def read_cola(root: Path, split: str) -> list[Example]:
    files = ["train.tsv"] if split == "train" else ["dev_in_domain.tsv", "dev_out_of_domain.tsv"]
    examples = []
    for name in files:
        table = read_table(local_file(root, f"glue/cola/{name}", "cola"))
        examples += labelled_examples(table, "x", None, "y", 2)
    return examples


def read_mrpc(root: Path, split: str) -> list[Example]:
    """MRPC; "dev" is a fixed seeded 408 pairs of the train file and "train" the rest.

    GLUE's own dev pairs are listed in a separate id file that is not part of the published corpus,
    so this dev set has the right size and label mix but not the same pairs as GLUE's.
    """
    name = "msr_paraphrase_test.txt" if split == "test" else "msr_paraphrase_train.txt"
    table = read_table(local_file(root, f"glue/mrpc/{name}", "mrpc"))
    # Some copies of the train file end with four made-up pairs whose ids are -1; they are not MRPC.
    first_id = table.column("#1 ID")
    table.rows = [(line, fields) for line, fields in table.rows if fields[first_id] != "-1"]
    examples = labelled_examples(table, "#1 String", "#2 String", "Quality", 2)
    if split == "test":
        return examples
    train, dev = split_off_dev(examples, table.path, size=MRPC_DEV_SIZE, dev_option=None)
    return dev if split == "dev" else train


def read_stsb(root: Path, split: str) -> list[Example]:
    """STS-B similarity scores in [0, 5]; some rows carry extra trailing fields (sources), ignored."""
    table = read_table(
        local_file(root, f"glue/stsb/sts-{split}.csv", "stsb"),
        column_names=STSB_COLUMNS,
        allow_extra_fields=True,
    )
    examples = []
    for line, fields in table.rows:
        try:
            score = float(fields[4])
        except ValueError:
            raise table.error(line, f"score {fields[4]!r} is not a number") from None
        if not 0.0 <= score <= 5.0:
            raise table.error(line, f"score {score} out of range: expected 0..5")
        examples.append({"text": fields[5], "text_pair": fields[6], "label": score})
    return examples


def worded_examples(table: Table, text: str, text_pair: str, label: str, label_names: list[str],
                    skip: tuple[str, ...] = ()) -> list[Example]:
    """Classification examples whose label column holds the class name; rows labelled with one of `skip`
    are left out."""
    text_index, pair_index, label_index = table.column(text), table.column(text_pair), table.column(label)
    examples = []
    for line, fields in table.rows:
        word = fields[label_index]
        if word in skip:
            continue
        if word not in label_names:
            raise table.error(line, f"label {word!r} is not one of {label_names}")
        examples.append({"text": fields[text_index], "text_pair": fields[pair_index],
                         "label": label_names.index(word)})
    return examples


def read_mnli(root: Path, split: str) -> list[Example]:
    """MNLI premise/hypothesis pairs; "dev" is the matched dev set, "dev_mismatched" the other. The label
    is `gold_label` (the last column; the annotators' majority), "-" (no majority; only in MultiNLI's
    own files, GLUE removed those pairs) is skipped."""
    name = "train.tsv" if split == "train" else MNLI_DEV_FILES[split]
    table = read_table(local_file(root, f"glue/mnli/{name}", "mnli"))
    return worded_examples(table, "sentence1", "sentence2", "gold_label", MNLI_LABELS, skip=("-",))


def read_qnli(root: Path, split: str) -> list[Example]:
    table = read_table(local_file(root, f"glue/qnli/{split}.tsv", "qnli"))
    return worded_examples(table, "question", "sentence", "label", QNLI_LABELS)


def read_qqp(root: Path, split: str) -> list[Example]:
    table = read_table(local_file(root, f"glue/qqp/{split}.tsv", "qqp"), skip_short_rows=True)
    return labelled_examples(table, "question1", "question2", "is_duplicate", 2)


def read_from_hub(task_name: str, split: str) -> list[Example]:
    """A GLUE split from the dataset hub (``nyu-mll/glue``); "dev" is GLUE's validation split (MNLI's
    validation_matched)."""
    names = MNLI_HUB_SPLITS if task_name == "mnli" else HUB_SPLIT_NAMES
    rows = hub_split(task_name, "nyu-mll/glue", task_name, names[split])
    text_column, pair_column = HUB_TEXT_COLUMNS[task_name]
    examples = []
    for row in rows:
        if row["label"] == -1:
            raise DataError(
                f"the hub's GLUE {task_name} {split!r} split has no labels (GLUE keeps them private); "
                f"use --data-dir with the published files, which have them"
            )
        label = float(row["label"]) if task_name == "stsb" else int(row["label"])
        pair = row[pair_column] if pair_column else None
        examples.append({"text": row[text_column], "text_pair": pair, "label": label})
    return examples


def glue_loader(task_name: str, read_local) -> Loader:
    """A loader that reads the local files if a data folder is given, else the dataset hub."""

    def load(split: str, data_dir: Path | None) -> list[Example]:
        root = local_data_root(data_dir)
        return read_local(root, split) if root is not None else read_from_hub(task_name, split)

    return load


def glue_tasks() -> list[Task]:
    """The eight GLUE tasks, in the order papers list them (STS-B, with no label names, is the regression)."""

    def glue(name: str, read_local, metric_names: list[str], label_names: list[str] | None, description: str,
             splits: tuple[str, ...] = ("train", "dev")) -> Task:
        return Task(name=name, kind="classification" if label_names else "regression", metric_names=metric_names,
                    splits=splits, loader=glue_loader(name, read_local), label_names=label_names,
                    description=description)

    with_test = ("train", "dev", "test")
    return [  # name, reader, metrics, label names, description, splits
        glue("sst2", read_sst2, ["accuracy"], ["negative", "positive"], "SST-2 sentence sentiment (GLUE)"),
        glue("rte", read_rte, ["accuracy"], ["entailment", "not_entailment"],
             "RTE textual entailment, sentence pairs (GLUE)"),
        glue("mrpc", read_mrpc, ["accuracy", "f1"], ["not_equivalent", "equivalent"],
             "MRPC paraphrase, sentence pairs (GLUE); dev = seeded 408 pairs of the train file", with_test),
        glue("stsb", read_stsb, ["pearson", "spearman"], None, "STS-B sentence-pair similarity, scores 0-5 (GLUE)",
             with_test),
        glue("cola", read_cola, ["matthews_corrcoef"], ["unacceptable", "acceptable"],
             "CoLA grammatical acceptability (GLUE); dev = in-domain + out-of-domain"),
        glue("mnli", read_mnli, ["accuracy"], MNLI_LABELS,
             "MNLI entailment, 3 classes (GLUE); dev = matched, dev_mismatched = mismatched",
             ("train", "dev", "dev_mismatched")),
        glue("qnli", read_qnli, ["accuracy"], QNLI_LABELS, "QNLI question-answer entailment, from SQuAD (GLUE)"),
        glue("qqp", read_qqp, ["accuracy", "f1"], ["not_duplicate", "duplicate"],
             "QQP Quora question-pair paraphrase (GLUE)"),
    ]
