"""Hugging Face peft interop, checked against the real peft: the same adapter computes the same logits in
both libraries, in both directions. Also: deltatune's in-place LoRA forward trains exactly like peft's."""

from __future__ import annotations

import json
import re

import pytest
import torch

import deltatune
from deltatune.cli import main
from deltatune.errors import DeltaError
from deltatune.formats.peft import export_peft, read_peft
from tests.conftest import make_inputs, make_model

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")  # peft warns about Conv1D fan_in_fan_out, missing heads, ...
ATOL = 1e-5


def randomise(tensors, seed: int = 3) -> None:
    """Non-zero values everywhere (LoRA's B starts at zero, which would hide a wrong B layout)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in tensors:
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs).logits


def trained_delta(arch: str, config, kind: str = "classification"):
    model = deltatune.attach(make_model(arch, kind=kind), config, task="t")
    randomise(model.task_parameters("t").values())
    return model


# ---- deltatune -> peft --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch, config",
    [
        ("bert", deltatune.LoRA(r=4, alpha=8)),
        ("roberta", deltatune.LoRA(r=4, alpha=8, dropout=0.1)),
        ("llama", deltatune.LoRA(r=4, alpha=16, use_rslora=True)),
        ("gpt2", deltatune.LoRA(r=4, alpha=8)),  # fused c_attn q, v slices -> rank-8 block LoRA
        ("gpt2", deltatune.LoRA(r=2, alpha=4, use_rslora=True)),
    ],
)
def test_lora_export_loads_in_peft(arch, config, tmp_path):
    model = trained_delta(arch, config)
    inputs = make_inputs(arch)
    model.save_delta(tmp_path / "delta")
    export_peft(tmp_path / "delta", tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(make_model(arch), tmp_path / "peft")
    torch.testing.assert_close(logits(peft_model, inputs), logits(model, inputs), atol=ATOL, rtol=0)
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] == "SEQ_CLS"
    assert saved["use_rslora"] == config.use_rslora and saved["lora_dropout"] == config.dropout


def test_export_key_names_are_peft_s(tmp_path):
    """Exactly the keys peft's own save_pretrained writes for the same LoRA + head."""
    export_peft(trained_delta("bert", deltatune.LoRA(r=4)), tmp_path / "ours")
    reference = get_peft_model(
        make_model("bert"), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS",
                                       modules_to_save=["pooler"])  # SEQ_CLS adds the classifier
    )
    reference.save_pretrained(tmp_path / "theirs")
    ours = load_safetensors(tmp_path / "ours")
    theirs = load_safetensors(tmp_path / "theirs")
    assert ours.keys() == theirs.keys()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in ours
    assert "base_model.model.classifier.weight" in ours


def load_safetensors(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_gpt2_fused_slices_export_as_an_exact_block_lora(tmp_path):
    model = trained_delta("gpt2", deltatune.LoRA(r=4, alpha=8))
    export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["fan_in_fan_out"]) == (8, 16, True)  # same alpha/r
    tensors = load_safetensors(tmp_path / "peft")
    B = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]  # (3d, 2r), d = 32
    assert B.shape == (96, 8)
    assert B[32:64].abs().sum() == 0  # k rows: no update
    assert B[:32, 4:].abs().sum() == 0 and B[64:, :4].abs().sum() == 0  # q uses A's first r rows, v the rest
    ours = model.task_parameters("t")["transformer.h.0.attn.c_attn.lora_B"]
    torch.testing.assert_close(B[:32, :4], ours[:32])  # q's block
    torch.testing.assert_close(B[64:, 4:], ours[32:])  # v's block


def test_mixed_ranks_use_peft_rank_pattern(tmp_path):
    """Fused slices (rank 2r in peft) beside plain layers (rank r): per-module ranks via rank_pattern."""
    model = trained_delta("gpt2", deltatune.LoRA(r=2, alpha=8, targets=["c_attn[0/3]", "c_attn[2/3]", "c_proj"]))
    export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 2 and set(config["rank_pattern"].values()) == {4}
    peft_model = PeftModel.from_pretrained(make_model("gpt2"), tmp_path / "peft")
    inputs = make_inputs("gpt2")
    torch.testing.assert_close(logits(peft_model, inputs), logits(model, inputs), atol=ATOL, rtol=0)
    with pytest.raises(DeltaError, match="rank_pattern"):  # deltatune gives a task one rank: refused, not bent
        deltatune.load_delta(make_model("gpt2"), tmp_path / "peft")


def test_causal_lm_export(tmp_path):
    model = trained_delta("llama", deltatune.LoRA(r=4), kind="causal-lm")
    export_peft(model, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    peft_model = PeftModel.from_pretrained(make_model("llama", kind="causal-lm"), tmp_path / "peft")
    inputs = make_inputs("llama")
    torch.testing.assert_close(logits(peft_model, inputs), logits(model, inputs), atol=ATOL, rtol=0)


def test_cli_export(tmp_path, capsys):
    trained_delta("bert", deltatune.LoRA(r=4)).save_delta(tmp_path / "delta")
    assert main(["export", "--delta", str(tmp_path / "delta"), "--format", "peft", str(tmp_path / "out")]) == 0
    peft_model = PeftModel.from_pretrained(make_model("bert"), tmp_path / "out")
    reloaded = deltatune.load_delta(make_model("bert"), tmp_path / "delta")
    inputs = make_inputs("bert")
    torch.testing.assert_close(logits(peft_model, inputs), logits(reloaded, inputs), atol=ATOL, rtol=0)


def test_methods_without_peft_equivalent_are_refused(tmp_path):
    model = deltatune.attach(make_model("bert"), deltatune.BitFit(), task="t")
    with pytest.raises(DeltaError, match="no peft equivalent"):
        export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


# ---- peft -> deltatune --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch, targets, rslora",
    [("bert", ["query", "value"], False), ("roberta", ["query", "key", "dense"], False),
     ("llama", ["q_proj", "v_proj"], True), ("gpt2", ["c_attn"], False)],
)
def test_peft_lora_loads_in_deltatune(arch, targets, rslora, tmp_path):
    head = {"bert": "classifier", "roberta": "classifier", "llama": "score", "gpt2": "score"}[arch]
    config = LoraConfig(r=4, lora_alpha=12, target_modules=targets, use_rslora=rslora, modules_to_save=[head])
    peft_model = get_peft_model(make_model(arch), config)
    randomise([p for p in peft_model.parameters() if p.requires_grad])  # LoRA A, B and the head copy
    peft_model.save_pretrained(tmp_path / "adapter")
    inputs = make_inputs(arch)
    ours = deltatune.load_delta(make_model(arch), tmp_path / "adapter")
    torch.testing.assert_close(logits(ours, inputs), logits(peft_model, inputs), atol=ATOL, rtol=0)
    assert ours.task_info[ours.active_task]["config"].use_rslora == rslora


def test_peft_adapter_without_head_uses_the_model_s_head(tmp_path):
    peft_model = get_peft_model(make_model("bert"), LoraConfig(r=4, target_modules=["query", "value"]))
    randomise([p for p in peft_model.parameters() if p.requires_grad])
    peft_model.save_pretrained(tmp_path / "adapter")
    _, meta = read_peft(tmp_path / "adapter")
    assert meta["head_keys"] == [] and meta["method"] == "lora"
    ours = deltatune.load_delta(make_model("bert"), tmp_path / "adapter", task="sst2")
    inputs = make_inputs("bert")
    torch.testing.assert_close(logits(ours, inputs), logits(peft_model, inputs), atol=ATOL, rtol=0)


def test_peft_options_deltatune_cannot_compute_are_refused(tmp_path):
    """(DoRA, `use_dora`, is read: tests/test_dora_ia3.py.)"""
    refused = [("bias", {"lora_bias": True}), ("dora_ranks", {"use_dora": True, "rank_pattern": {"query": 2}})]
    for name, options in refused:
        config = LoraConfig(r=4, target_modules=["query", "value"], **options)
        get_peft_model(make_model("bert"), config).save_pretrained(tmp_path / name)
        with pytest.raises(DeltaError, match=next(iter(options)) if name == "bias" else "rank_pattern"):
            deltatune.load_delta(make_model("bert"), tmp_path / name)


@pytest.mark.parametrize("kind, config, refusal", [
    ("lora", LoraConfig(r=4, target_modules=["query", "value"]),
     "is neither LoRA A/B of a linear layer nor a modules_to_save head; deltatune cannot load it exactly"),
    ("prompt", PromptTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS"),
     "unexpected key 'base_model.model.bert.pooler.dense.weight' in a peft prompt-tuning adapter"),
])
def test_a_peft_key_that_is_neither_the_method_s_nor_a_head_is_refused_by_name(kind, config, refusal, tmp_path):
    from safetensors.torch import save_file

    get_peft_model(make_model("bert"), config).save_pretrained(tmp_path / kind)
    tensors = load_safetensors(tmp_path / kind)
    read_peft(tmp_path / kind)  # as saved: read
    tensors["base_model.model.bert.pooler.dense.weight"] = torch.zeros(32, 32)  # a base weight, not a head's
    save_file(tensors, tmp_path / kind / "adapter_model.safetensors")
    with pytest.raises(DeltaError, match=re.escape(refusal)):
        read_peft(tmp_path / kind)


# ---- prompt tuning ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, kind", [("gpt2", "classification"), ("llama", "causal-lm")])
def test_prompt_export_and_import(arch, kind, tmp_path):
    model = trained_delta(arch, deltatune.PromptTuning(length=5), kind=kind)
    inputs = make_inputs(arch)
    export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(make_model(arch, kind=kind), tmp_path / "peft")
    expected = logits(model, inputs)
    torch.testing.assert_close(logits(peft_model, inputs), expected, atol=ATOL, rtol=0)
    back = deltatune.load_delta(make_model(arch, kind=kind), tmp_path / "peft")
    torch.testing.assert_close(logits(back, inputs), expected, atol=ATOL, rtol=0)


def test_peft_prompt_loads_in_deltatune(tmp_path):
    peft_model = get_peft_model(make_model("gpt2"), PromptTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS"))
    randomise([p for p in peft_model.parameters() if p.requires_grad])
    peft_model.save_pretrained(tmp_path / "adapter")
    ours = deltatune.load_delta(make_model("gpt2"), tmp_path / "adapter")
    inputs = make_inputs("gpt2")
    torch.testing.assert_close(logits(ours, inputs), logits(peft_model, inputs), atol=ATOL, rtol=0)


def test_encoder_prompts_are_refused_both_ways(tmp_path):
    """deltatune puts a BERT prompt after [CLS], peft in front: the same prompt would be another model."""
    with pytest.raises(DeltaError, match="CLS"):
        export_peft(trained_delta("bert", deltatune.PromptTuning(length=3)), tmp_path / "out")
    peft_model = get_peft_model(make_model("bert"), PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"))
    peft_model.save_pretrained(tmp_path / "adapter")
    base = make_model("bert")
    with pytest.raises(DeltaError, match="CLS"):
        deltatune.load_delta(base, tmp_path / "adapter")


# ---- the LoRA forward: in-place fused accumulation equals peft's textbook path -----------------------
@pytest.mark.parametrize("arch, targets", [("bert", None), ("gpt2", ["c_attn"]), ("gpt2", None)])
def test_lora_training_step_matches_peft(arch, targets, tmp_path):
    """Same gradients for A, B and the head as peft (fp32): plain layers, whole and sliced fused layers."""
    model = trained_delta(arch, deltatune.LoRA(r=4, alpha=8, targets=targets))
    export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(make_model(arch), tmp_path / "peft", is_trainable=True)
    inputs = {**make_inputs(arch), "labels": torch.tensor([0, 1, 1])}
    for m in (model, peft_model):
        m.eval()(**inputs).loss.backward()  # eval: no dropout, so both see the same function
    ours = {k: p.grad for k, p in model.task_parameters("t").items()}
    theirs = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    for key, grad in ours.items():
        name = key.replace(".lora_A", ".lora_A.default.weight").replace(".lora_B", ".lora_B.default.weight")
        head = next((h for h in ("score", "classifier", "bert.pooler") if key.startswith(h + ".")), None)
        if head:  # the task head (BERT: the classifier and the pooler that feeds it)
            name = f"{head}.modules_to_save.default.{key[len(head) + 1:]}"
        reference = theirs["base_model.model." + name]
        if reference.shape != grad.shape:  # GPT-2 q, v slices: the diagonal blocks of peft's (3d, 2r) B
            reference = torch.cat([reference[:32, :4], reference[64:, 4:]])
        torch.testing.assert_close(grad, reference, atol=1e-5, rtol=1e-4)


def test_lora_under_bf16_autocast_stays_close_to_fp32():
    """The fast path (bf16 autocast) runs through the in-place GEMM with matching dtypes and stays close."""
    model = trained_delta("bert", deltatune.LoRA(r=4))
    inputs = make_inputs("bert")
    expected = logits(model, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = logits(model, inputs)
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), expected, atol=0.05, rtol=0.05)


def test_the_registry_says_which_methods_export_to_peft(tmp_path):
    """`MethodEntry.peft` is the one list: every peft type deltatune reads is some entry's translation, and a method
    without one is refused by name (the dummy method of tests/test_registry_dummy.py too)."""
    from conftest import make_model

    from deltatune.formats import peft as peft_format
    from deltatune.methods.registry import METHODS

    exported = {name for name, entry in METHODS.items() if entry.peft is not None}
    assert exported == {"lora", "dora", "ia3", "prompt", "prefix"}
    assert {METHODS[name].peft.peft_type for name in exported} == {"LORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING"}
    for name, entry in METHODS.items():
        if entry.peft is None:
            delta = deltatune.attach(make_model("bert"), entry.config(), task="t").save_delta(tmp_path / name)
            with pytest.raises(deltatune.DeltaError, match=f"{name} deltas have no peft equivalent"):
                peft_format.export_peft(delta, tmp_path / f"{name}-peft")


# ---- prefix tuning ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prefix_export_and_import_match_peft(arch, tmp_path):
    """deltatune -> peft -> deltatune: the same causal-LM logits (Llama: prefixes per key/value head)."""
    model = deltatune.attach(make_model(arch, kind="causal-lm"), deltatune.PrefixTuning(length=5, hidden=16), task="t")
    randomise(model.trained_parameters("t").values())
    inputs = make_inputs(arch)
    export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_virtual_tokens"]) == ("PREFIX_TUNING", 5)
    assert config["prefix_projection"] is False  # the file holds the folded prefixes
    peft_model = PeftModel.from_pretrained(make_model(arch, kind="causal-lm"), tmp_path / "peft")
    expected = logits(model, inputs)
    torch.testing.assert_close(logits(peft_model, inputs), expected, atol=ATOL, rtol=0)
    back = deltatune.load_delta(make_model(arch, kind="causal-lm"), tmp_path / "peft")
    torch.testing.assert_close(logits(back, inputs), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("projection", [False, True])
def test_peft_prefix_loads_in_deltatune(arch, projection, tmp_path):
    """A prefix trained in peft (with or without its MLP, `prefix_projection`) runs the same in deltatune."""
    from peft import PrefixTuningConfig

    config = PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM", prefix_projection=projection,
                                encoder_hidden_size=16)
    peft_model = get_peft_model(make_model(arch, kind="causal-lm"), config)
    randomise([p for p in peft_model.parameters() if p.requires_grad])
    peft_model.save_pretrained(tmp_path / "adapter")
    inputs = make_inputs(arch)
    ours = deltatune.load_delta(make_model(arch, kind="causal-lm"), tmp_path / "adapter")
    torch.testing.assert_close(logits(ours, inputs), logits(peft_model, inputs), atol=ATOL, rtol=0)


def test_t5_prefix_is_refused_both_ways(tmp_path):
    """peft's T5 prefix reaches only the decoder's self-attention, deltatune's also the encoder's."""
    with pytest.raises(DeltaError, match="encoder"):
        export_peft(trained_delta("t5", deltatune.PrefixTuning(length=3, hidden=8), kind="seq2seq"), tmp_path / "x")


# ---- PiSSA (Meng et al. 2024): portable both ways as a plain LoRA of the original base -------------------------
def test_pissa_delta_exports_as_a_lora_that_peft_runs_on_the_original_base(tmp_path):
    model = deltatune.attach(make_model("bert"), deltatune.LoRA(r=4, alpha=8, init="pissa"), task="t")
    randomise([p for p in model.trained_parameters("t").values()])
    inputs = make_inputs("bert")
    export_peft(model, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 8
    peft_model = PeftModel.from_pretrained(make_model("bert"), tmp_path / "peft")
    torch.testing.assert_close(logits(peft_model, inputs), logits(model, inputs), atol=ATOL, rtol=0)


def test_peft_pissa_adapter_loads_once_converted_and_is_refused_as_trained(tmp_path):
    # no modules_to_save: peft 0.21.2's converted adapter then names the head so that peft itself cannot reload it
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights="pissa")
    peft_model = get_peft_model(make_model("bert"), config)  # its base weights are now the residual
    peft_model.peft_config["default"].init_lora_weights = True  # peft's recipe: the initial adapter, saved plain
    peft_model.save_pretrained(tmp_path / "initial")
    peft_model.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():  # "training": the adapter moves away from its PiSSA start
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    inputs = make_inputs("bert")
    expected = logits(peft_model, inputs)
    peft_model.save_pretrained(tmp_path / "trained")
    with pytest.raises(DeltaError, match="residual base"):
        deltatune.load_delta(make_model("bert"), tmp_path / "trained")
    peft_model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")
    ours = deltatune.load_delta(make_model("bert"), tmp_path / "converted")
    torch.testing.assert_close(logits(ours, inputs), expected, atol=ATOL, rtol=0)
