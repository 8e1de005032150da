"""Every user-facing error in docs/errors.md, run as written there: the tables are parsed, so the
document and these tests cannot drift apart.

Command-line rows run `deltatune.cli.main` in this process and expect exit code 2, no stack trace and
the message on the last line of stderr (`deltatune: error: ...`, or argparse's `deltatune CMD: error:`).
Python rows evaluate the call and expect the exception class and the message.
"""

from __future__ import annotations

import csv
import json
import pickle
import shlex
import signal
from pathlib import Path

import pytest
import torch
from conftest import make_model
from safetensors.torch import load_file, save_file

import deltatune
from deltatune.cli import main as cli_main
from deltatune.formats.native import META_FILE, WEIGHTS_FILE
from deltatune.testing import tiny_tokenizer

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


def doc_table(section: str) -> list[list[str]]:
    """The rows (cells, backticks removed) of the table under `## section` in docs/errors.md."""
    rows, inside = [], False
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            inside = line[3:].strip() == section
        elif inside and line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip().strip("`") for cell in line.strip().strip("|").split("|")])
    header, *body = rows
    assert body, f"no table under '## {section}' in {DOC}"
    return body


CLI_ROWS = doc_table("Command line")
API_ROWS = doc_table("Python API")


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_own_signal_handlers():
    """One torch thread (tiny models run faster so on a busy machine); afterwards pytest's SIGINT and
    SIGTERM handlers back (train() leaves its own when it raises)."""
    threads = torch.get_num_threads()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path


def damaged_copy(source: Path, target: Path, change) -> Path:
    """A copy of delta `source` with `change(tensors, meta)` applied (it may also rewrite files)."""
    target.mkdir()
    tensors, meta = load_file(source / WEIGHTS_FILE), json.loads((source / META_FILE).read_text())
    change(tensors, meta)
    save_file(tensors, target / WEIGHTS_FILE)
    (target / META_FILE).write_text(json.dumps(meta))
    return target


class _RunsCode:
    def __reduce__(self):  # a hostile pickle calls a function while being loaded
        return (print, ("this must never run",))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """The things the tables' `{placeholders}` name."""
    root = tmp_path_factory.mktemp("inputs")
    paths = {"missing": root / "missing", "file": root / "a-file.txt"}
    paths["file"].write_text("not a folder\n")
    for name, kind in [("model", "classification"), ("regression_model", "regression")]:
        make_model("bert", kind=kind).save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
        paths[name] = root / name
    texts = [f"the movie was {word} ." for word in ["great", "bleak", "funny", "weak"] * 16]
    paths["csv"] = write_csv(root / "reviews.csv", [["review", "sentiment"]] + [
        [text, "positive" if i % 2 == 0 else "negative"] for i, text in enumerate(texts)])
    paths["scores_csv"] = write_csv(root / "scores.csv", [["review", "score"]] + [
        [text, "4.5" if i % 2 == 0 else "0.5"] for i, text in enumerate(texts)])
    paths["bad_csv"] = write_csv(root / "bad.csv", [["review", "sentiment"], ["good", "positive"], ["a", "b", "c"]])
    paths["four_rows_csv"] = write_csv(root / "four-rows.csv", [["review", "sentiment"]] + [
        [text, "positive" if i % 2 == 0 else "negative"] for i, text in enumerate(texts[:4])])
    paths["unlabelled_csv"] = write_csv(root / "unlabelled.csv", [["review", "sentiment"], ["no label", ""]])
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    for name, rows in {
        "chat": [{"messages": turn}] * 8,
        "bad_role_chat": [{"messages": turn}, {"messages": [turn[0], {"role": "asistant", "content": "x"}]}],
        "unordered_chat": [{"messages": [turn[0], turn[0], turn[1]]}],
        "empty_completion": [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": ""}],
    }.items():
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(row) + "\n" for row in rows))

    model = deltatune.attach(make_model("bert"), deltatune.LoRA(r=2), task="csv", label_names=["negative", "positive"])
    paths["delta"] = model.save_delta(root / "delta")
    paths["gpt2_delta"] = deltatune.attach(make_model("gpt2"), deltatune.LoRA(), task="csv").save_delta(
        root / "gpt2_delta")
    for name, change in {
        "label_number_delta": lambda tensors, meta: meta.update(label_names=7),
        "no_base_delta": lambda tensors, meta: meta.pop("base"),
        "string_rank_delta": lambda tensors, meta: meta["config"].update(r="2"),
        "hostile_delta": lambda tensors, meta: meta.update(task="../../x"),
        "nan_delta": lambda tensors, meta: tensors["classifier.bias"].fill_(float("nan")),
    }.items():
        paths[name] = damaged_copy(paths["delta"], root / name, change)
    paths["truncated_delta"] = damaged_copy(paths["delta"], root / "truncated_delta", lambda tensors, meta: None)
    weights = paths["truncated_delta"] / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    paths["not_json_delta"] = damaged_copy(paths["delta"], root / "not_json_delta", lambda tensors, meta: None)
    (paths["not_json_delta"] / META_FILE).write_text("{")
    for name, payload in [("pickle_delta", None), ("code_pickle_delta", pickle.dumps({"x": _RunsCode()}, protocol=2))]:
        paths[name] = damaged_copy(paths["delta"], root / name, lambda tensors, meta: None)
        (paths[name] / WEIGHTS_FILE).unlink()
        if payload is None:
            torch.save(load_file(paths["delta"] / WEIGHTS_FILE), paths[name] / "delta.bin")
        else:
            (paths[name] / "delta.pt").write_bytes(payload)

    paths["lora_run"] = root / "lora_run"  # a run with a LoRA checkpoint, to resume with another method
    assert cli_main(["train", "--model", str(paths["model"]), "--task", "csv", "--data-file", str(paths["csv"]),
                     "--text-columns", "review", "--label-column", "sentiment", "--method", "lora",
                     "--max-steps", "1", "--checkpoint-every", "1", "--out", str(paths["lora_run"]),
                     "--no-progress"]) == 0
    return paths


def fill(text: str, inputs: dict[str, Path], out: Path) -> str:
    values = {name: str(path) for name, path in inputs.items()}
    values["data"] = f"--data-file {inputs['csv']} --text-columns review --label-column sentiment"
    return text.format(out=out, **values)


@pytest.mark.parametrize("error, command, message", CLI_ROWS, ids=[row[0] for row in CLI_ROWS])
def test_cli_error(error, command, message, inputs, tmp_path, capsys):
    argv = shlex.split(fill(command, inputs, tmp_path / "run"))
    assert argv[0] == "deltatune", f"row {error!r}: a command starts with 'deltatune'"
    try:
        code = cli_main(argv[1:])
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    stderr = capsys.readouterr().err
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(("deltatune: error: ", f"deltatune {argv[1]}: error: ")), last
    assert fill(message, inputs, tmp_path / "run") in last


@pytest.mark.parametrize("error, call, exception, message", API_ROWS, ids=[row[0] for row in API_ROWS])
def test_api_error(error, call, exception, message, inputs, capsys):
    namespace = {
        **inputs, "deltatune": deltatune, "bert": lambda: make_model("bert"), "gpt2": lambda: make_model("gpt2"),
        "model": deltatune.attach(make_model("bert"), deltatune.LoRA(r=2), task="sst2"),
    }
    with pytest.raises(getattr(deltatune, exception)) as raised:
        eval(call, namespace)
    assert message in str(raised.value)
    assert "this must never run" not in capsys.readouterr().out


def test_every_error_type_is_defined_in_errors_py():
    """deltatune/errors.py holds every exception and warning class of the package: a class deriving from an
    exception (a builtin one, or one of errors.py's) anywhere else is listed here."""
    import ast
    import builtins

    import deltatune.errors as errors

    known = {name for module in (builtins, errors) for name, value in vars(module).items()
             if isinstance(value, type) and issubclass(value, BaseException)}
    package = Path(deltatune.__file__).parent
    elsewhere = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "errors.py" and path.parent == package:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            bases = [ast.unparse(base).rpartition(".")[2] for base in getattr(node, "bases", [])]
            if isinstance(node, ast.ClassDef) and any(base in known for base in bases):
                elsewhere.append(f"{path.relative_to(package)}: {node.name}")
    assert elsewhere == [], "error types defined outside deltatune/errors.py"
