"""LoRA on the 3-D expert parameters of mixture-of-experts models (methods/lora_experts.py), on the tiny Mixtral,
Qwen2-MoE, Qwen3-MoE, GPT-OSS (experts stored transposed), PhiMoE and DeepSeek-V3 of testing.TINY_ZOO.

References come from outside the code under test: the per-expert update written out by hand from the experts'
own weights (one expert's output computed with W[e] + s B[e] A[e]), Hugging Face peft's `target_parameters`
(its ParamWrapper) for the exported and imported adapters, and each example of a mixed batch run alone."""

from __future__ import annotations

import copy

import pytest
import torch

import deltatune
from deltatune.errors import DeltaTuneError, TargetError
from deltatune.formats.peft import export_peft
from deltatune.methods.lora_experts import ExpertLoRA
from deltatune.testing import tiny_model_of_type

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "phimoe", "deepseek_v3"]


def tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_model_of_type(kind)


def inputs(batch: int = 3, length: int = 7) -> dict[str, torch.Tensor]:
    ids = torch.randint(4, 500, (batch, length), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model, batch, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, **kwargs).logits


def randomise(model, task: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.task_parameters(task).values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("kind", MOE)
def test_every_step_of_a_task_is_exact(kind, tmp_path):
    """Init = base bit for bit; a trained delta changes the output; merge = unmerged (float) and unmerge restores
    the base weights bit for bit; save -> load onto a fresh base; a mixed batch = each row alone; gradients."""
    base, batch = tiny(kind), inputs()
    fresh, expected = copy.deepcopy(base), logits(base, batch)
    weights = {n: p.detach().clone() for n, p in base.named_parameters() if p.dim() == 3}
    model = deltatune.attach(base, deltatune.LoRA(r=4, targets=[], expert_parameters=EXPERTS), task="a")
    assert torch.equal(logits(model, batch), expected)
    randomise(model, "a", seed=5)
    trained = logits(model, batch)
    assert not torch.allclose(trained, expected, atol=1e-4)
    model.merge()
    torch.testing.assert_close(logits(model, batch), trained, atol=1e-5, rtol=0)
    model.unmerge()
    plain = {n.replace(".base_layer", ""): p for n, p in model.base_model.named_parameters() if p.dim() == 3
             and "lora_" not in n}
    assert all(torch.equal(plain[n], w) for n, w in weights.items())
    model.save_delta(tmp_path / "a")
    assert torch.equal(logits(deltatune.load_delta(copy.deepcopy(fresh), tmp_path / "a"), batch), trained)

    deltatune.attach(model, deltatune.LoRA(r=2, targets=[], expert_parameters=EXPERTS), task="b")
    randomise(model, "b", seed=6)
    tasks = ["a", "b", "base"]
    mixed = logits(model, batch, tasks=tasks)
    for i, task in enumerate(tasks):
        alone = logits(model.use(task), {k: v[i : i + 1] for k, v in batch.items()})[0]
        torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=0, msg=f"row {i} ({task})")

    model.use("a").train()
    model(**batch).logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.task_parameters("a").values())


def test_parameter_counts_are_per_expert_ranks():
    """Mixtral (2 experts, d 32, d_ff 64), r 4: gate_up (2, 128, 32): A 2x4x32 + B 2x128x4; down (2, 32, 64):
    A 2x4x64 + B 2x32x4; two blocks -> 2 x (256 + 1024 + 512 + 256) = 4096, plus q_proj/v_proj's LoRA."""
    model = deltatune.attach(tiny("mixtral"), deltatune.LoRA(r=4, expert_parameters=EXPERTS), task="t")
    counts = {k: v.numel() for k, v in model.task_parameters("t").items()}
    per_block = 2 * 4 * 32 + 2 * 128 * 4 + 2 * 4 * 64 + 2 * 32 * 4
    assert sum(n for k, n in counts.items() if ".experts." in k) == 2 * per_block == 4096
    # q_proj (32 out) and v_proj (2 key/value heads of 8: 16 out) in two blocks, and the 2-label head `score`
    assert sum(n for k, n in counts.items() if ".experts." not in k) == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4) + 2 * 32
    assert counts["model.layers.0.mlp.experts.gate_up_proj.lora_A"] == 2 * 4 * 32


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])  # (E, d_out, d_in) and transposed (E, d_in, d_out)
def test_one_expert_computes_with_its_own_low_rank_update(kind):
    model = deltatune.attach(tiny(kind), deltatune.LoRA(r=3, alpha=6, targets=[], expert_parameters=EXPERTS),
                             task="t")
    randomise(model, "t", seed=2)
    experts = next(m for m in model.modules() if isinstance(m, ExpertLoRA))
    params = model.task_parameters("t")
    prefix = next(k for k in params if k.endswith("gate_up_proj.lora_A")).removesuffix("gate_up_proj.lora_A")
    A, B = params[prefix + "gate_up_proj.lora_A"][1], params[prefix + "gate_up_proj.lora_B"][1]  # expert 1
    W = experts.base_layer.gate_up_proj[1]
    hand = W + 2.0 * ((B @ A).T if kind == "gpt_oss" else B @ A)  # alpha / r = 2; GPT-OSS stores W[e] (d_in, d_out)
    seen = {}
    original = type(experts.base_layer).forward

    def spy(module, hidden, *args, **kwargs):
        seen.setdefault("gate_up", module.gate_up_proj[1].detach().clone())  # the first block's experts
        return original(module, hidden, *args, **kwargs)

    type(experts.base_layer).forward = spy
    try:
        logits(model, inputs(1, 3))
    finally:
        type(experts.base_layer).forward = original
    torch.testing.assert_close(seen["gate_up"], hand, atol=1e-6, rtol=0)


def test_expert_parameters_from_the_command_line_round_trip(tmp_path):
    from deltatune.cli import method_settings

    options = method_settings("lora", ["expert_parameters=experts.gate_up_proj,experts.down_proj", "targets=[]"])
    assert options == {"expert_parameters": EXPERTS, "targets": []}
    model = deltatune.attach(tiny("qwen3_moe"), deltatune.methods.registry.build_config("lora", options), task="t")
    adapted = {k.rsplit(".", 2)[-2] for k in model.task_parameters("t") if ".experts." in k}
    assert adapted == {"gate_up_proj", "down_proj"}
    model.save_delta(tmp_path / "t")
    assert deltatune.load_delta(tiny("qwen3_moe"), tmp_path / "t").task_info["t"]["config"].expert_parameters == EXPERTS


def test_bad_expert_parameters_are_refused_by_name():
    with pytest.raises(TargetError, match=r"match no parameter.*3-D parameters are named"):
        deltatune.attach(tiny("mixtral"), deltatune.LoRA(expert_parameters=["experts.up_proj"]))
    with pytest.raises(TargetError, match="needs a 3-D"):
        deltatune.attach(tiny("mixtral"), deltatune.LoRA(expert_parameters=["q_proj.weight"]))
    with pytest.raises(TargetError, match="DoRA on expert_parameters"):
        deltatune.attach(tiny("mixtral"), deltatune.DoRA(expert_parameters=EXPERTS))
    with pytest.raises(DeltaTuneError, match="no dropout"):
        deltatune.methods.registry.build_config("lora", {"expert_parameters": EXPERTS, "dropout": 0.1})


# ---- Hugging Face peft's target_parameters --------------------------------------------------------------
peft = pytest.importorskip("peft")


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_export_runs_in_peft_and_a_peft_adapter_runs_here(kind, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    batch = inputs()
    model = deltatune.attach(tiny(kind), deltatune.LoRA(r=4, alpha=8, expert_parameters=EXPERTS), task="t")
    randomise(model, "t", seed=3)
    model.save_delta(tmp_path / "delta")
    export_peft(tmp_path / "delta", tmp_path / "peft")
    theirs = PeftModel.from_pretrained(tiny(kind), tmp_path / "peft")
    torch.testing.assert_close(logits(theirs, batch), logits(model, batch), atol=1e-5, rtol=0)

    config = LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"], target_parameters=EXPERTS)
    peft_model = get_peft_model(tiny(kind), config)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(4)
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    ours = deltatune.load_delta(tiny(kind), tmp_path / "adapter")
    assert sorted(ours.task_info[ours.active_task]["config"].expert_parameters) == sorted(EXPERTS)  # peft sorts
    torch.testing.assert_close(logits(ours, batch), logits(peft_model, batch), atol=1e-5, rtol=0)
