"""Generation from the user's files: readers and their errors, loss masks (prompt-completion, Alpaca, chat
templates), the target-only LM loss, generation metrics, mixed-task generation, and the CLI end to end."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import deltatune
from deltatune.errors import ChatTemplateError, DataError, LengthWarning
from deltatune.evaluate import task_loss
from deltatune.tasks import get_task
from deltatune.tasks.encoding import IGNORE_INDEX, collate
from deltatune.tasks.generation import PromptFormat, encode_examples
from deltatune.testing import tiny_model, tiny_tokenizer, with_random_deltas

# ChatML as SmolLM2-Instruct writes it, with the default system turn left out
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SMOLLM2_PATH = Path.home() / ".cache" / "deltatune" / "smollm2-135m-instruct"
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "name[Aromi], food[Thai]"},
    {"role": "assistant", "content": "Aromi serves Thai food."},
    {"role": "user", "content": "And the area?"},
    {"role": "assistant", "content": "It is in the city centre."},
]


def chat_tokenizer():
    """The tiny byte-level BPE tokenizer with ChatML's two special tokens and template (ids < TINY_VOCAB)."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def spans(tokenizer, ids: list[int], labels: list[int]) -> list[tuple[bool, str]]:
    """The sequence as runs of (trained?, decoded text)."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(ids, labels, strict=True):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    return [(trained, tokenizer.decode(tokens)) for trained, tokens in runs]


def check_assistant_mask(tokenizer, messages, expected_trained: list[str]) -> None:
    """The trained runs decode to exactly `expected_trained` (written by hand from the template), and every
    label is its own token (no shift, nothing else trained)."""
    ids, labels = PromptFormat("messages").encode({"messages": messages}, tokenizer)
    runs = spans(tokenizer, ids, labels)
    shown = "\n".join(f"{'TRAINED  ' if t else 'masked   '}{text!r}" for t, text in runs)
    assert [text for trained, text in runs if trained] == expected_trained, f"spans:\n{shown}"
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True)), shown
    # everything else is the template's text around the turns, masked
    masked = "".join(text for trained, text in runs if not trained)
    assert "<|im_start|>assistant\n" in masked and "name[Aromi]" in masked and "Be brief." in masked, shown


def test_two_turn_conversation_trains_exactly_the_assistant_tokens():
    tokenizer = chat_tokenizer()
    check_assistant_mask(tokenizer, CONVERSATION,
                         ["Aromi serves Thai food.<|im_end|>", "It is in the city centre.<|im_end|>"])
    last_only = PromptFormat("messages", assistant_turns="last")
    ids, labels = last_only.encode({"messages": CONVERSATION}, tokenizer)
    assert [t for trained, t in spans(tokenizer, ids, labels) if trained] == ["It is in the city centre.<|im_end|>"]


@pytest.mark.slow
@pytest.mark.skipif(not (SMOLLM2_PATH / "tokenizer.json").is_file(), reason="SmolLM2 not converted in the cache")
def test_smollm2_chat_template_mask():
    from deltatune.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    check_assistant_mask(tokenizer, CONVERSATION,
                         ["Aromi serves Thai food.<|im_end|>", "It is in the city centre.<|im_end|>"])
    # without a system turn the template inserts its default one: masked too
    ids, labels = PromptFormat("messages").encode({"messages": CONVERSATION[1:3]}, tokenizer)
    runs = spans(tokenizer, ids, labels)
    assert [t for trained, t in runs if trained] == ["Aromi serves Thai food.<|im_end|>"]
    assert "You are a helpful AI assistant named SmolLM" in runs[0][1]


def test_no_chat_template_names_the_option():
    tokenizer = tiny_tokenizer()
    with pytest.raises(ChatTemplateError, match="--chat-template FILE"):
        PromptFormat("messages").encode({"messages": CONVERSATION}, tokenizer)
    # a template given explicitly is used (and is what the delta records)
    fmt = PromptFormat("messages", chat_template=CHATML)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    ids, labels = fmt.encode({"messages": CONVERSATION}, tokenizer)
    assert sum(label != IGNORE_INDEX for label in labels) > 0 and fmt.to_dict()["chat_template"] == CHATML


@pytest.mark.parametrize("file_format", ["jsonl", "csv"])
def test_prompt_completion_masks_the_prompt_and_appends_eos(tmp_path, file_format):
    rows = [{"question": f"Q{i}: 2+{i}=", "answer": f" {2 + i}"} for i in range(20)]
    if file_format == "csv":
        path = tmp_path / "data.csv"
        path.write_text("question,answer\n" + "".join(f'"{r["question"]}","{r["answer"]}"\n' for r in rows))
    else:
        path = write_jsonl(tmp_path / "data.jsonl", rows)
    task = get_task(file_format, path=path, format="prompt-completion",
                    columns={"prompt": "question", "completion": "answer"})
    assert (task.kind, len(task.load("train")), len(task.load("dev"))) == ("generation", 18, 2)
    tokenizer = tiny_tokenizer()
    example = task.load("train")[0]
    ((ids, labels),) = encode_examples(task.prompt_format, [example], tokenizer, max_length=64)
    runs = spans(tokenizer, ids, labels)
    assert [(trained, text) for trained, text in runs] == [(False, example["prompt"]),
                                                           (True, example["target"] + "</s>")]
    dev = task.load("dev")[0]
    assert set(dev) == {"prompt", "references"} and len(dev["references"]) == 1


def test_alpaca_prompt_with_and_without_input(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "output": "hi"},
    ])
    task = get_task("jsonl", path=path, format="alpaca", dev_path=path)
    with_input, without = task.load("train")
    assert with_input["prompt"].endswith("### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert "### Input" not in without["prompt"] and without["prompt"].endswith("Say hi.\n\n### Response:\n")
    tokenizer = tiny_tokenizer()
    ((ids, labels), _) = encode_examples(task.prompt_format, task.load("train"), tokenizer, 512)
    assert [t for trained, t in spans(tokenizer, ids, labels) if trained] == ["5</s>"]


@pytest.mark.parametrize(("row", "problem"), [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "asistant", "content": "x"}]},
     "unknown role 'asistant'"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "turns out of order: message 1"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "turns out of order: message 2"),
    ({"messages": [{"role": "user", "content": "a"}]}, "must end with an assistant turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}, "is empty"),
    ({"messages": [{"role": "user"}]}, "'role' and 'content'"),
    ({"conversation": []}, "missing field"),
])
def test_bad_chat_rows_name_file_and_line(tmp_path, row, problem):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, good, row])
    with pytest.raises(DataError, match=rf"chat.jsonl, line 3: .*{problem}"):
        get_task("jsonl", path=path, format="messages")


@pytest.mark.parametrize(("row", "problem"), [
    ({"prompt": "p", "completion": ""}, "empty completion"),
    ({"prompt": "p"}, r"missing field\(s\) \['completion'\]"),
    ({"prompt": "p", "completion": 5}, "field 'completion' must be a string"),
])
def test_bad_prompt_completion_rows(tmp_path, row, problem):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}, row])
    with pytest.raises(DataError, match=rf"pc.jsonl, line 2: {problem}"):
        get_task("jsonl", path=path, format="prompt-completion")


@pytest.mark.parametrize("overlong", ["cut", "drop"])
def test_long_rows_are_counted_and_reported(tmp_path, overlong):
    rows = [{"prompt": "short ", "completion": "answer"}, {"prompt": "long " * 40, "completion": "answer " * 5},
            {"prompt": "mid " * 5, "completion": "answer " * 40}]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    task = get_task("jsonl", path=path, format="prompt-completion", dev_path=path)
    tokenizer = tiny_tokenizer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = encode_examples(task.prompt_format, task.load("train"), tokenizer, 30, overlong=overlong)
    (warning,) = [w for w in caught if issubclass(w.category, LengthWarning)]
    message = str(warning.message)
    assert "2 of 3 training rows are longer than --max-length 30" in message
    if overlong == "cut":  # the row whose prompt fills the 30 tokens has nothing left to learn: dropped
        assert "1 cut to 30 (" in message and "line 3" in message and "1 dropped (" in message and "line 2" in message
        assert len(items) == 2 and len(items[1][0]) == 30
    else:
        assert "0 cut" in message and "2 dropped" in message and len(items) == 1


# ---- the target-only loss ----------------------------------------------------------------------------
def method_config(method: str, arch: str):
    return {"lora": deltatune.LoRA(r=4, alpha=8), "bitfit": deltatune.BitFit(add_missing=arch == "llama"),
            "adapter": deltatune.Adapter(bottleneck=4), "prompt": deltatune.PromptTuning(length=3),
            "full": deltatune.FullFineTune(), "top_layers": deltatune.TopLayers(k=1),
            "prefix": deltatune.PrefixTuning(length=3, hidden=16)}[method]


def lm_batch(seed: int = 0) -> tuple[dict, torch.Tensor]:
    """Right-padded sequences whose first tokens are a prompt (label -100), then targets."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    from deltatune.tasks.encoding import Encoded

    for prompt_length, target_length in [(5, 3), (2, 7), (6, 1)]:
        ids = torch.randint(4, 400, (prompt_length + target_length,), generator=generator).tolist()
        items.append(Encoded(ids, None, [IGNORE_INDEX] * prompt_length + ids[prompt_length:]))
    batch = collate(items, pad_id=0)
    return batch, batch.pop("labels")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["lora", "bitfit", "adapter", "prompt", "full", "top_layers", "prefix"])
def test_target_only_loss_equals_the_full_computation(arch, method):
    torch.manual_seed(0)
    model = deltatune.attach(tiny_model(arch, "causal-lm"), method_config(method, arch), task="t")
    with torch.no_grad():  # non-trivial deltas (LoRA's B and adapters' up start at zero)
        for tensor in model.task_parameters("t").values():
            tensor.add_(torch.randn_like(tensor) * 0.05)
    model.eval()  # no dropout: the two computations see the same network (gradients flow in eval mode too)
    batch, labels = lm_batch()
    task = deltatune.tasks.Task("lm", "generation", ["chrf"], ("train",), lambda s, d: [])
    trainable = [p for p in model.parameters() if p.requires_grad]

    full = task_loss(task, model(**batch), labels)
    full_grads = torch.autograd.grad(full, trainable)
    targets = model(**batch, target_labels=labels)
    target_grads = torch.autograd.grad(targets, trainable)
    assert torch.allclose(full, targets, atol=1e-5, rtol=0), (full.item(), targets.item())
    for p, a, b in zip(trainable, full_grads, target_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (p.shape, (a - b).abs().max().item())
    assert any(g.abs().sum() > 0 for g in target_grads)


# ---- the command line, end to end on a tiny Llama --------------------------------------------------------
@pytest.fixture
def tiny_chat_model(tmp_path) -> Path:
    """A tiny Llama causal LM and the ChatML tokenizer, saved as a model folder."""
    torch.manual_seed(0)
    folder = tmp_path / "tiny-llama"
    tiny_model("llama", "causal-lm").save_pretrained(folder)
    tokenizer = chat_tokenizer()
    tokenizer.eos_token = "<|im_end|>"  # the chat model's end of turn, as SmolLM2-Instruct's
    tokenizer.save_pretrained(folder)
    return folder


def chat_rows(count: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"name[R{i}], food[Thai]"},
                          {"role": "assistant", "content": f"R{i} serves Thai food."}]} for i in range(count)]


@pytest.mark.parametrize("method", ["lora", "bitfit", "adapter", "prompt", "full", "top_layers", "prefix"])
def test_cli_trains_evaluates_and_generates_a_chat_delta(tmp_path, tiny_chat_model, capsys, method):
    from deltatune.cli import main

    rows = chat_rows(30)
    data, dev = write_jsonl(tmp_path / "chat.jsonl", rows[:27]), write_jsonl(tmp_path / "dev.jsonl", rows[27:])
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_chat_model), "--task", "jsonl", "--data-file", str(data),
                 "--dev-file", str(dev), "--format", "messages", "--method", method, "--out", str(out),
                 "--max-steps", "3",
                 *(["-o", "add_missing=true"] if method == "bitfit" else []),  # Llama has no biases
                 "--batch-size", "4", "--no-progress", "--precision", "fp32"]) == 0
    meta = json.loads((out / "delta" / "delta.json").read_text())
    assert meta["prompt_format"]["format"] == "messages" and meta["prompt_format"]["chat_template"] == CHATML
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["final"]) == {"chrf", "sacrebleu", "rougeL", "exact_match"}
    capsys.readouterr()

    assert main(["eval", "--model", str(tiny_chat_model), "--delta", str(out / "delta"), "--task", "jsonl",
                 "--data-file", str(dev)]) == 0  # the file given is scored whole
    result = json.loads(capsys.readouterr().out)
    assert result["rows"] == {"dev": 3}
    assert result["dev"] == pytest.approx(summary["final"])  # the same prompts as during training
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(set(r) == {"split", "messages", "prediction", "references"} for r in rows)

    assert main(["generate", "--model", str(tiny_chat_model), "--delta", str(out / "delta"), "--max-new-tokens", "5",
                 "name[R1], food[Thai]"]) == 0
    streamed = capsys.readouterr().out
    # the reference: the same prompt built by hand from the template, greedy
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.delta import load_delta

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    model = load_delta(AutoModelForCausalLM.from_pretrained(tiny_chat_model), out / "delta").eval()
    prompt = "<|im_start|>user\nname[R1], food[Thai]<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                  do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    assert streamed.strip() == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True).strip()
    # predict: the same prompt, batched with another, no data file needed
    assert main(["predict", "--model", str(tiny_chat_model), "--delta", str(out / "delta"), "--max-new-tokens", "5",
                 "name[R1], food[Thai]", "a longer message than the first one, to pad the other"]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert first == {"input": "name[R1], food[Thai]", "output": streamed.strip()}


# ---- mixed-task generation ---------------------------------------------------------------------------------
def mixed_model(arch: str) -> deltatune.DeltaModel:
    """Every method on one tiny causal LM, twice for LoRA and prompt tuning (other shapes), randomised."""
    torch.manual_seed(0)
    model = tiny_model(arch, "causal-lm")
    configs = {"lora_a": deltatune.LoRA(r=2, alpha=4), "lora_b": deltatune.LoRA(r=4, alpha=8),
               "bitfit": deltatune.BitFit(add_missing=arch == "llama"), "adapter": deltatune.Adapter(bottleneck=4),
               "prompt_a": deltatune.PromptTuning(length=3), "prompt_b": deltatune.PromptTuning(length=5)}
    return with_random_deltas(model, configs)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("tasks", [
    # every mixable method in one batch (top_layers' mixed blocks do not decode with a KV cache yet)
    ["lora_a", "prompt_b", "base", "adapter", "bitfit", "prompt_a", "lora_b"],
    ["lora_a", "lora_b", "base", "lora_a"],  # no prompt
])
def test_mixed_generate_equals_generating_row_by_row(arch, tasks):
    model = mixed_model(arch)
    generator = torch.Generator().manual_seed(7)
    lengths = [3 + (4 * i) % 6 for i in range(len(tasks))]
    width = max(lengths)
    input_ids = torch.zeros(len(tasks), width, dtype=torch.long)  # left padding
    attention_mask = torch.zeros_like(input_ids)
    for i, length in enumerate(lengths):
        input_ids[i, width - length :] = torch.randint(4, 400, (length,), generator=generator)
        attention_mask[i, width - length :] = 1
    options = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(input_ids=input_ids, attention_mask=attention_mask, tasks=tasks, **options)
        assert mixed.shape == (len(tasks), width + 6)
        for i, task in enumerate(tasks):
            model.use(task)
            row = input_ids[i : i + 1, width - lengths[i] :]
            alone = model.generate(input_ids=row, attention_mask=torch.ones_like(row), **options)
            assert mixed[i, width:].tolist() == alone[0, lengths[i]:].tolist(), (i, task)
    model.use("lora_a")
    assert model.task_state.per_example is None and model.active_task == "lora_a"


# ---- metrics ------------------------------------------------------------------------------------------------
def test_generation_metrics_by_hand():
    from deltatune.tasks.text_metrics import compute_text_metrics

    # LCS("the cat sat", "the cat on the mat sat") = 3 words: P = 3/3, R = 3/6, F1 = 2/3
    scores = compute_text_metrics(["The cat sat", "a dog"], [["the cat on the mat sat"], ["x", " a dog "]])
    assert scores["rougeL"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert scores["exact_match"] == 50.0  # the second matches its second reference (whitespace stripped)
    perfect = compute_text_metrics(["a b c d e f"], [["a b c d e f"]])
    assert perfect["sacrebleu"] == pytest.approx(100) and perfect["chrf"] == pytest.approx(100)
    assert compute_text_metrics(["zzz"], [["a b c d e"]])["chrf"] < 5


def test_mixed_generate_refuses_prefix_rows_instead_of_ignoring_their_prefix():
    model = mixed_model("llama")
    model = deltatune.attach(model, deltatune.PrefixTuning(length=2, hidden=8), task="prefix").eval()
    ids = torch.randint(4, 400, (2, 5))
    with pytest.raises(deltatune.TaskError, match=r"prefix tasks \(\['prefix'\]\) cannot share a mixed-task generate"):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), tasks=["prefix", "lora_a"],
                       max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert model.task_state.per_example is None


def test_mixed_generate_refuses_top_layers_rows_instead_of_crashing():
    model = mixed_model("gpt2")
    model = deltatune.attach(model, deltatune.TopLayers(k=1), task="top").eval()
    ids = torch.randint(4, 400, (2, 5))
    with pytest.raises(deltatune.TaskError, match=r"top_layers tasks \(\['top'\]\) cannot share a mixed-task generate"):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), tasks=["top", "lora_a"],
                       max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert model.task_state.per_example is None
    model.use("top")  # alone, it generates
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                         pad_token_id=0)
    assert out.shape == (2, 7)


def test_eval_of_an_e2e_delta_writes_the_outputs_it_scored(tmp_path, tiny_chat_model, capsys, data_dir):
    """Built-in E2E: `eval --out` writes predictions.jsonl (each MR, its output, its references), and the
    printed metrics are those outputs' scores against those references."""
    from transformers import AutoModelForCausalLM

    from deltatune.cli import main
    from deltatune.tasks import get_task

    model = deltatune.attach(AutoModelForCausalLM.from_pretrained(tiny_chat_model), deltatune.LoRA(r=2), task="e2e")
    model.save_delta(tmp_path / "delta")
    assert main(["eval", "--model", str(tiny_chat_model), "--delta", str(tmp_path / "delta"), "--task", "e2e",
                 "--split", "test", "--limit", "3", "--data-dir", str(data_dir), "--out", str(tmp_path / "out")]) == 0
    printed = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["split"] == "test" and r["references"] for r in rows)
    expected = get_task("e2e").compute_metrics([r["prediction"] for r in rows], [r["references"] for r in rows],
                                               sources=[r["source"] for r in rows])
    assert "ser" in printed["test"]
    assert printed["test"] == pytest.approx(expected)
