"""What a new user meets first on the command line: the prompting floor on their own file, and errors that say
what to type (issue 32's rough edges). `eval`'s whole-file scoring is in test_train.py / test_generation.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deltatune.cli import main
from deltatune.testing import tiny_model, tiny_tokenizer


@pytest.fixture
def tiny_lm(tmp_path) -> Path:
    """A tiny random Llama causal LM and tokenizer, saved as a model folder."""
    torch.manual_seed(0)
    folder = tmp_path / "tiny-llama"
    tiny_model("llama", "causal-lm").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


# a short chat template: the tiny model's context is 128 tokens (the Alpaca prompt alone takes 180 of its tokens)
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def generation_file(path: Path, file_format: str, count: int, start: int = 0) -> Path:
    """`count` rows of a prompt-completion or chat file."""
    rows = [{"prompt": f"name[R{i}], food[Thai] ->", "completion": f" R{i} serves Thai food."}
            if file_format == "prompt-completion" else
            {"messages": [{"role": "user", "content": f"name[R{i}], food[Thai]"},
                          {"role": "assistant", "content": f"R{i} serves Thai food."}]}
            for i in range(start, start + count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("file_format", ["prompt-completion", "messages"])
def test_prompting_baselines_score_the_users_file(tiny_lm, tmp_path, capsys, file_format):
    """`eval --method zero-shot|few-shot --task jsonl --data-file F [--dev-file G] --format ...`: G scored whole
    (else F whole), the same numbers as the library on that file; few-shot draws its demonstrations from F."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.prompting.fewshot import evaluate_fewshot
    from deltatune.tasks import get_task

    train = generation_file(tmp_path / "train.jsonl", file_format, 12)
    dev = generation_file(tmp_path / "dev.jsonl", file_format, 5, start=100)
    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
    chat = {"chat_template": CHAT_TEMPLATE} if file_format == "messages" else {}
    files = ["--task", "jsonl", "--data-file", str(train), "--format", file_format,
             *(["--chat-template", str(tmp_path / "chat.jinja")] if chat else [])]
    assert main(["eval", "--model", str(tiny_lm), "--method", "zero-shot", *files, "--dev-file", str(dev)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rows"] == {"dev": 5}
    expected = evaluate_fewshot(AutoModelForCausalLM.from_pretrained(tiny_lm), AutoTokenizer.from_pretrained(tiny_lm),
                                get_task("jsonl", path=str(dev), dev_path=str(dev), format=file_format, **chat))
    metrics = ["chrf", "sacrebleu", "rougeL", "exact_match"]
    assert {m: result["dev"][m] for m in metrics} == pytest.approx({m: expected[m] for m in metrics})

    assert main(["eval", "--model", str(tiny_lm), "--method", "few-shot", "--shots", "1", *files]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rows"] == {"dev": 12} and result["dev"]["demonstrations"] == 1


@pytest.mark.parametrize(("name", "text", "fix"), [
    ("rows.jsonl", '{"instruction": "Say hi.", "output": "Hi."}\n', "--format alpaca"),
    ("rows.csv", "prompt,completion\nSay hi.,Hi.\n", "--format prompt-completion"),
    ("rows.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n', "--format messages"),
])
def test_a_generation_file_without_format_is_told_to_pass_it(tiny_lm, tmp_path, capsys, name, text, fix):
    data = tmp_path / name
    data.write_text(text)
    assert main(["train", "--model", str(tiny_lm), "--task", data.suffix[1:], "--data-file", str(data),
                 "--method", "lora", "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert "no column" in error and fix in error


def test_bitfit_on_a_bias_free_model_gives_the_command_lines_spelling(tiny_lm, tmp_path, capsys):
    data = generation_file(tmp_path / "train.jsonl", "prompt-completion", 8)
    assert main(["train", "--model", str(tiny_lm), "--task", "jsonl", "--data-file", str(data),
                 "--format", "prompt-completion",
                 "--method", "bitfit", "--out", str(tmp_path / "run"), "--max-steps", "1"]) == 2
    assert "-o add_missing=true" in capsys.readouterr().err


def test_a_folder_that_is_no_delta_names_where_a_runs_delta_is(tiny_lm, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--model", str(tiny_lm), "--delta", str(tmp_path / "empty")]) == 2
    error = capsys.readouterr().err
    assert "is not a deltatune delta" in error and "RUN/delta" in error
