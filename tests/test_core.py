"""The foundation's promises: parameter counts equal hand-computed formulas, GPT-2's q/v slices,
plain torch modules, clear errors, atomic saves, and the `params` table."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_inputs, make_model
from torch import nn

import deltatune
from deltatune.cli import main as cli_main

D, FF, L, R = 32, 64, 2, 4  # tiny models: hidden, FFN width, layers (see deltatune.testing.tiny_model)


def lora_pair(d_in: int, d_out: int, r: int = R) -> int:
    return r * d_in + d_out * r  # A (r x d_in) + B (d_out x r)


# hand-computed LoRA counts with the default W_q, W_v targets
LORA_COUNTS = {
    "bert": L * 2 * lora_pair(D, D),
    "roberta": L * 2 * lora_pair(D, D),
    "gpt2": L * 2 * lora_pair(D, D),  # q and v slices of c_attn only
    "llama": L * (lora_pair(D, D) + lora_pair(D, 16)),  # GQA: v_proj has 2 kv heads x 8 = 16 outputs
    # encoder self-attention q,v; decoder self- and cross-attention q,v (T5 inner dim = 4 heads x 8)
    "t5": L * 2 * lora_pair(D, D) + L * 4 * lora_pair(D, D),
}
# BitFit: q,k,v, attention output, LN1, FFN in, FFN out, LN2 biases per layer
BITFIT_COUNTS = {
    "bert": L * (3 * D + D + D + FF + D + D),
    "roberta": L * (3 * D + D + D + FF + D + D),
    "gpt2": L * (3 * D + D + D + FF + D + D),
    # no native biases: add_missing puts them on every linear layer (q, k(16), v(16), o, gate, up, down)
    "llama": L * (D + 16 + 16 + D + FF + FF + D),
    # encoder: q,k,v,o + wi, wo; decoder: self q,k,v,o + cross q,k,v,o + wi, wo
    "t5": L * (4 * D + FF + D) + L * (8 * D + FF + D),
}


def test_lora_count_matches_formula(arch):
    model = deltatune.attach(make_model(arch), deltatune.LoRA(r=R), task="t")
    assert model.report(print_table=False).method_parameters == LORA_COUNTS[arch]


def test_bitfit_count_matches_formula(arch):
    config = deltatune.BitFit(add_missing=arch in {"llama", "t5"})
    model = deltatune.attach(make_model(arch), config, task="t")
    assert model.report(print_table=False).method_parameters == BITFIT_COUNTS[arch]


def test_bitfit_on_a_biasless_model_says_how_to_fix(arch):
    if arch not in {"llama", "t5"}:
        pytest.skip("model has biases")
    with pytest.raises(deltatune.TargetError, match="add_missing=True"):
        deltatune.attach(make_model(arch), deltatune.BitFit(), task="t")


def test_bitfit_subset_trains_only_named_biases():
    model = deltatune.attach(make_model("bert"), deltatune.BitFit(subset=["query", "intermediate.dense"]))
    keys = list(model.task_parameters(roles=("method",)))
    assert len(keys) == 2 * L and all(".query." in k or ".intermediate.dense." in k for k in keys)
    assert model.report(print_table=False).method_parameters == L * (D + FF)


def test_full_counts_every_weight_and_the_head():
    base = make_model("bert")
    total = sum(p.numel() for p in base.parameters())
    # the task head: the classifier and BERT's pooler that feeds it (D x D + D)
    head = sum(p.numel() for p in base.classifier.parameters()) + D * D + D
    model = deltatune.attach(base, deltatune.FullFineTune())
    report = model.report(print_table=False)
    assert (report.method_parameters, report.head_parameters) == (total - head, head)
    assert model.trainable_parameters() == total


def test_gpt2_lora_adapts_only_q_and_v_slices():
    model = deltatune.attach(make_model("gpt2"), deltatune.LoRA(r=R), task="t")
    c_attn = model.base_model.transformer.h[0].attn.c_attn
    assert c_attn.slices == [(0, D), (2 * D, 3 * D)]
    with torch.no_grad():
        for tensor in model.task_parameters("t").values():
            tensor.normal_()
    before = c_attn.base_layer.weight.detach().clone()  # Conv1D: (d_in, 3*d)
    model.merge()
    after = c_attn.base_layer.weight.detach()
    assert torch.equal(after[:, D : 2 * D], before[:, D : 2 * D]), "the k slice must not change"
    assert not torch.equal(after[:, :D], before[:, :D]) and not torch.equal(after[:, 2 * D :], before[:, 2 * D :])


def test_lora_merge_is_w_plus_scaled_ba():
    """W' = W + (alpha/r) B A, checked by hand on one layer."""
    model = deltatune.attach(make_model("bert"), deltatune.LoRA(r=2, alpha=6), task="t")
    query = model.base_model.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        query.lora_B["t"].normal_()
    W = query.base_layer.weight.detach().clone()
    expected = W + 3.0 * query.lora_B["t"] @ query.lora_A["t"]
    model.merge()
    torch.testing.assert_close(query.base_layer.weight, expected)
    model.unmerge()
    assert torch.equal(query.base_layer.weight, W)


def test_targets_by_suffix_list_and_regex():
    by_suffix = deltatune.attach(make_model("bert"), deltatune.LoRA(r=R, targets=["key", "output.dense"]))
    names = {k.rsplit(".", 1)[0] for k in by_suffix.task_parameters(roles=("method",))}
    assert names == {f"bert.encoder.layer.{i}.{m}" for i in range(L)
                     for m in ("attention.self.key", "attention.output.dense", "output.dense")}
    by_regex = deltatune.attach(make_model("bert"), deltatune.LoRA(r=R, targets=r".*layer\.1\..*query"))
    assert {k.rsplit(".", 1)[0] for k in by_regex.task_parameters(roles=("method",))} == {
        "bert.encoder.layer.1.attention.self.query"
    }


def test_unknown_target_lists_the_candidates():
    with pytest.raises(deltatune.TargetError) as error:
        deltatune.attach(make_model("bert"), deltatune.LoRA(targets=["q_proj"]))
    message = str(error.value)
    assert "q_proj" in message and "query" in message and "intermediate.dense" in message


def test_plain_torch_module():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    with pytest.raises(deltatune.TargetError, match=r"no default LoRA targets.*'0', '2'"):
        deltatune.attach(mlp, deltatune.LoRA())
    x = torch.randn(5, 8)
    expected = mlp(x)
    model = deltatune.attach(mlp, deltatune.LoRA(r=2, targets=["0", "2"]), heads=None)
    assert torch.equal(model(x), expected)
    assert model.trainable_parameters() == lora_pair(8, 16, 2) + lora_pair(16, 3, 2)
    bitfit = deltatune.attach(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), deltatune.BitFit(),
                              heads=None)
    assert bitfit.trainable_parameters() == 16 + 3


def test_unknown_task_lists_the_loaded_tasks():
    model = deltatune.attach(make_model("bert"), deltatune.LoRA(), task="sst2")
    deltatune.attach(model, deltatune.BitFit(), task="rte")
    with pytest.raises(deltatune.TaskError, match=r"'mnli'.*\['sst2', 'rte'\]"):
        model.use("mnli")


def test_delta_for_another_base_names_the_model_it_was_made_for(tmp_path):
    model = deltatune.attach(make_model("bert"), deltatune.LoRA(), task="t")
    model.save_delta(tmp_path / "d")
    with pytest.raises(deltatune.DeltaError, match=r"made for base model .*bert.*BertForSequenceClassification"):
        deltatune.load_delta(make_model("gpt2"), tmp_path / "d")


def test_same_architecture_other_weights_warns(tmp_path):
    deltatune.attach(make_model("bert", seed=0), deltatune.LoRA(), task="t").save_delta(tmp_path / "d")
    with pytest.warns(UserWarning, match="different weights"):
        deltatune.load_delta(make_model("bert", seed=1), tmp_path / "d")


def test_delta_json_describes_the_delta(tmp_path):
    model = deltatune.attach(make_model("bert"), deltatune.LoRA(r=R, alpha=8), task="sst2",
                             label_names=["negative", "positive"])
    model.save_delta(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    assert meta["method"] == "lora" and meta["task"] == "sst2"
    assert meta["config"] == {"r": R, "alpha": 8, "dropout": 0.0, "targets": None, "use_rslora": False,
                              "init": "default", "pissa_niter": 0, "expert_parameters": None}
    assert meta["label_names"] == ["negative", "positive"]
    assert meta["base"]["model_type"] == "bert" and len(meta["base"]["shape_fingerprint"]) == 16
    assert meta["num_parameters"] == LORA_COUNTS["bert"] + D * 2 + 2 + D * D + D  # LoRA, classifier, pooler


def test_loading_under_another_name_and_refusing_duplicates(tmp_path):
    trained = deltatune.attach(make_model("bert"), deltatune.LoRA(), task="sst2")
    trained.save_delta(tmp_path / "d")
    model = deltatune.load_delta(make_model("bert"), tmp_path / "d", task="sst2_copy")
    assert model.tasks == ["sst2_copy"]
    with pytest.raises(deltatune.TaskError, match="already exists"):
        model.add_delta(tmp_path / "d", task="sst2_copy")
    assert model.tasks == ["sst2_copy"]


def test_interrupted_save_keeps_the_previous_delta(tmp_path, monkeypatch):
    model = deltatune.attach(make_model("bert"), deltatune.LoRA(), task="t")
    inputs = make_inputs("bert")
    model.save_delta(tmp_path / "d")
    with torch.no_grad():
        first = model(**inputs).logits
        for tensor in model.task_parameters().values():
            tensor.add_(1.0)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("deltatune.formats.native.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        model.save_delta(tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp folder left behind
    with torch.no_grad():
        reloaded = deltatune.load_delta(make_model("bert"), tmp_path / "d")(**inputs).logits
    assert torch.equal(reloaded, first)


def test_pickle_delta_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    torch.save({"x": torch.zeros(1)}, tmp_path / "d" / "adapter_model.bin")
    with pytest.raises(deltatune.DeltaError, match="pickle"):
        deltatune.load_delta(make_model("bert"), tmp_path / "d")


def test_params_cli_roberta_large(capsys):
    assert cli_main(["params", "--arch", "roberta-large"]) == 0
    out = capsys.readouterr().out
    lora_row = next(line for line in out.splitlines() if line.startswith("LoRA"))
    assert f"{2 * 24 * 2 * 1024 * 8:,}" in lora_row and "0.2213%" in lora_row
    bitfit_row = next(line for line in out.splitlines() if line.startswith("BitFit"))
    assert f"{24 * (3 * 1024 + 1024 + 1024 + 4096 + 1024 + 1024):,}" in bitfit_row
    assert "355,361,794" in out  # RoBERTa-large with a 2-class head


def test_params_cli_gpt2_counts_the_q_v_slices(capsys):
    assert cli_main(["params", "--arch", "gpt2-medium"]) == 0
    lora_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("LoRA"))
    assert "786,432" in lora_row


@pytest.mark.parametrize("name", ["", "../etc", "a/b", "base", "copy", "training", "x" * 65])
def test_bad_task_names_are_refused(name):
    with pytest.raises(deltatune.TaskError):
        deltatune.attach(make_model("bert"), deltatune.LoRA(), task=name)


# ---- the task head takes in BERT's pooler ------------------------------------------------------------------
def test_bert_head_trains_its_own_pooler_and_the_base_keeps_its():
    """BERT's classifier reads the pooler (dense + tanh over [CLS]); each task trains its own copy with the
    classifier, as RoBERTa's classification head (dense + tanh + out_proj) trains with every method."""
    base = make_model("bert")
    frozen = base.bert.pooler.dense.weight.detach().clone()
    model = deltatune.attach(base, deltatune.LoRA(r=R), task="t")
    assert {k for k in model.head_keys("t") if "pooler" in k} == {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    optimizer = torch.optim.SGD(model.task_parameters("t").values(), lr=1.0)
    model(**make_inputs("bert"), labels=torch.tensor([0, 1, 1])).loss.backward()
    pooler = model.task_parameters("t")["bert.pooler.dense.weight"]
    assert pooler.grad is not None and pooler.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(pooler.detach(), frozen)  # the task's copy trained ...
    base_pooler = model.base_model.bert.pooler.base_layer.dense.weight  # ... not the base's
    torch.testing.assert_close(base_pooler, frozen, atol=0, rtol=0)


def test_a_delta_saved_without_the_pooler_runs_with_the_models_own(tmp_path):
    """A delta from before the pooler was part of the head (or a peft adapter with modules_to_save=["classifier"])
    trained with the base's pooler: loaded, it runs with that pooler and gives the outputs it gave."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = deltatune.attach(make_model("bert"), deltatune.LoRA(r=R), task="t")
    with torch.no_grad():  # a trained LoRA and classifier; the pooler copy left as the base's
        for key, tensor in model.task_parameters("t").items():
            if "pooler" not in key:
                tensor.normal_(0, 0.3)
    inputs = make_inputs("bert")
    expected = model.eval()(**inputs).logits
    model.save_delta(tmp_path / "d")
    tensors = load_file(tmp_path / "d" / "delta.safetensors")
    save_file({k: v for k, v in tensors.items() if "pooler" not in k}, tmp_path / "d" / "delta.safetensors")
    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    meta["head_keys"] = [k for k in meta["head_keys"] if "pooler" not in k]
    (tmp_path / "d" / "delta.json").write_text(json.dumps(meta))
    loaded = deltatune.load_delta(make_model("bert"), tmp_path / "d")
    torch.testing.assert_close(loaded.eval()(**inputs).logits, expected, atol=1e-6, rtol=0)
    # the classifier is not filled in that way: a delta without it does not fit
    save_file({k: v for k, v in tensors.items() if "classifier" not in k}, tmp_path / "d" / "delta.safetensors")
    with pytest.raises(deltatune.DeltaError):
        deltatune.load_delta(make_model("bert"), tmp_path / "d")
