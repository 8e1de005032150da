"""Bottleneck adapters: counts by hand, placement before the residual add, per-task norms, no merging."""

from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from conftest import make_inputs, make_model
from torch import nn

import deltatune
from deltatune.cli import main as cli_main
from deltatune.methods.adapter import BottleneckAdapter, NormDelta

D, M = 32, 8  # tiny models' hidden size; the bottleneck used here
PER_ADAPTER = 2 * D * M + M + D  # W_down, b_down, W_up, b_up = 552
# (sub-layers with an adapter under houlsby, norms with a gain, norms with a bias too) in the tiny models
TINY = {
    "bert": (2 * 2, 1 + 2 * 2, True),  # 2 layers x (attention, FFN); embeddings LN + 2 LNs per layer
    "roberta": (2 * 2, 1 + 2 * 2, True),
    "gpt2": (2 * 2, 2 * 2 + 1, True),  # ln_1, ln_2 per block + ln_f
    "llama": (2 * 2, 2 * 2 + 1, False),  # RMSNorms: input/post-attention per layer + final norm
    "t5": (2 * 2 + 2 * 2, (2 * 2 + 1) + (2 * 3 + 1), False),  # enc + dec blocks (no cross-attn adapter)
}
# the feed-forward sub-layer an adapter is stored in (beside the module whose output it adapts)
FFN_SUBLAYER = {"bert": "BertOutput", "roberta": "RobertaOutput", "gpt2": "GPT2MLP", "llama": "LlamaMLP",
                "t5": "T5LayerFF"}


def adapters(model) -> dict[str, BottleneckAdapter]:
    return {n: c for n, c in model.components().items() if isinstance(c, BottleneckAdapter)}


def randomise(model, task: str, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.task_parameters(task).values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("arch", list(TINY))
def test_counts_match_the_formula(arch):
    sites, norms, with_bias = TINY[arch]
    model = deltatune.attach(make_model(arch), deltatune.Adapter(bottleneck=M), task="a")
    report = model.report(print_table=False)
    assert report.method_parameters == sites * PER_ADAPTER
    assert report.norm_parameters == norms * D * (2 if with_bias else 1)
    assert len(adapters(model)) == sites
    assert sum(isinstance(c, NormDelta) for c in model.components().values()) == norms
    assert model.trainable_parameters() == report.trainable


@pytest.mark.parametrize("arch", list(TINY))
def test_pfeiffer_placement_is_after_the_ffn_only(arch):
    sites = TINY[arch][0]
    model = deltatune.attach(make_model(arch), deltatune.Adapter(bottleneck=M, placement="pfeiffer"), task="a")
    names = list(adapters(model))
    sublayers = {type(model.base_model.get_submodule(n.rpartition(".")[0])).__name__ for n in names}
    assert len(names) == sites // 2 and sublayers == {FFN_SUBLAYER[arch]}
    assert model.report(print_table=False).method_parameters == sites // 2 * PER_ADAPTER


def test_train_norms_false_trains_no_norm():
    model = deltatune.attach(make_model("bert"), deltatune.Adapter(bottleneck=M, train_norms=False), task="a")
    assert model.report(print_table=False).norm_parameters == 0
    assert not any(isinstance(c, NormDelta) for c in model.components().values())


def test_adapter_acts_before_the_residual_add_and_norm():
    """BERT: LayerNorm(adapter(dropout(dense(x))) + input), the spot of Houlsby's code."""
    model = deltatune.attach(make_model("bert"), deltatune.Adapter(bottleneck=M), task="a")
    randomise(model, "a")
    self_output = model.base_model.bert.encoder.layer[0].attention.output
    seen = {}
    self_output.register_forward_pre_hook(lambda m, args: seen.update(inputs=args))
    self_output.LayerNorm.register_forward_pre_hook(lambda m, args: seen.update(norm_input=args[0]))
    with torch.no_grad():
        model(**make_inputs("bert"))
        hidden, residual = seen["inputs"]
        h = self_output.dense(hidden)
        adapter = self_output.adapter
        expected = h + adapter.adapter_up["a"](F.gelu(adapter.adapter_down["a"](h))) + residual
    torch.testing.assert_close(seen["norm_input"], expected)


def test_adapter_follows_gpt2_resid_dropout_and_llama_o_proj():
    names = set(adapters(deltatune.attach(make_model("gpt2"), deltatune.Adapter(bottleneck=M))))
    assert "transformer.h.0.attn.adapter" in names and "transformer.h.1.mlp.adapter" in names
    llama = deltatune.attach(make_model("llama"), deltatune.Adapter(bottleneck=M))
    layer = llama.base_model.model.layers[0]
    assert layer.self_attn.adapter.layer is layer.self_attn.o_proj
    assert layer.mlp.adapter.layer is layer.mlp.down_proj


@pytest.mark.parametrize("norm", [nn.LayerNorm(D), nn.LayerNorm(D, bias=False), "llama", "t5"])
def test_norm_delta_is_exact(norm):
    """Identity bit for bit at init; with Δg, Δb it equals the same norm class holding g + Δg, b + Δb."""
    if norm == "llama":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        norm = LlamaRMSNorm(D)
    elif norm == "t5":
        from transformers.models.t5.modeling_t5 import T5LayerNorm
        norm = T5LayerNorm(D)
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(2, 5, D)
    state = deltatune.delta.TaskState()
    wrapped = NormDelta(copy.deepcopy(norm), state)
    wrapped.add_task("a")
    state.active = "a"
    assert torch.equal(wrapped(x), norm(x))
    shifted = copy.deepcopy(norm)
    with torch.no_grad():
        for name, delta in wrapped.norm_delta["a"].items():
            delta.copy_(torch.randn_like(delta))
            getattr(shifted, name).add_(delta)
    torch.testing.assert_close(wrapped(x), shifted(x), atol=1e-6, rtol=0)
    state.active = None
    assert torch.equal(wrapped(x), norm(x))


def test_each_task_has_its_own_norms():
    inputs = make_inputs("llama")
    model = deltatune.attach(make_model("llama"), deltatune.Adapter(bottleneck=M), task="a")
    deltatune.attach(model, deltatune.Adapter(bottleneck=M, placement="pfeiffer"), task="b")
    with torch.no_grad():
        before_b = model.use("b")(**inputs).logits
    randomise(model.use("a"), "a")
    with torch.no_grad():
        model.use("b")
        assert torch.equal(model(**inputs).logits, before_b)
        for component in model.components().values():
            if isinstance(component, NormDelta):
                assert not torch.equal(component.norm_delta["a"]["weight"], component.norm_delta["b"]["weight"])


def test_adapters_cannot_be_merged():
    model = deltatune.attach(make_model("bert"), deltatune.Adapter(bottleneck=M), task="a")
    with pytest.raises(deltatune.MergeError, match="cannot be merged"):
        model.merge()
    with pytest.raises(deltatune.MergeError):
        model.merge_and_unload()
    assert model.tasks == ["a"] and adapters(model)


def test_removing_the_task_restores_the_plain_model():
    base = make_model("gpt2")
    inputs = make_inputs("gpt2")
    with torch.no_grad():
        expected = base(**inputs).logits
    model = deltatune.attach(base, deltatune.Adapter(bottleneck=M), task="a")
    randomise(model, "a")
    model.remove_task("a")
    assert not model.components()
    assert not any(m._forward_hooks for m in base.modules())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)


def test_params_table_shows_the_adapter_row():
    """The table's counts are those of adapters attached to a RoBERTa-large built on the meta device (no
    memory), and the hand formulas."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["params", "--arch", "roberta-large"]) == 0
    row = next(line for line in out.getvalue().splitlines() if line.startswith("Adapters (dim 64)"))
    assert "6,343,680" in row  # 24 layers x 2 adapters x (2 x 1024 x 64 + 64 + 1024)
    assert "100,352" in row  # 49 LayerNorms (embeddings + 2 per layer) x (g, b) x 1024
    large = RobertaConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                          vocab_size=50265, max_position_embeddings=514, type_vocab_size=1)
    with torch.device("meta"):
        attached = deltatune.attach(RobertaForSequenceClassification(large), deltatune.Adapter(bottleneck=64))
    report = attached.report(print_table=False)
    assert (report.method_parameters, report.norm_parameters) == (6_343_680, 100_352)


def test_t5_adapters_follow_self_attention_and_ffn_not_cross_attention():
    model = deltatune.attach(make_model("t5"), deltatune.Adapter(bottleneck=M))
    sublayers = [type(model.base_model.get_submodule(n.rpartition(".")[0])).__name__ for n in adapters(model)]
    assert sorted(set(sublayers)) == ["T5LayerFF", "T5LayerSelfAttention"] and len(sublayers) == 8


def test_lora_wrapping_the_hooked_layer_keeps_the_adapter():
    """Llama's adapter hooks o_proj itself: a LoRA task on o_proj, added and removed, changes nothing."""
    inputs = make_inputs("llama")
    model = deltatune.attach(make_model("llama"), deltatune.Adapter(bottleneck=M), task="a")
    randomise(model, "a")
    with torch.no_grad():
        expected = model(**inputs).logits
    deltatune.attach(model, deltatune.LoRA(r=2, targets=["o_proj", "down_proj"]), task="l")
    randomise(model, "l")
    with torch.no_grad():
        assert torch.equal(model.use("a")(**inputs).logits, expected)
        model.remove_task("l")
        assert torch.equal(model.use("a")(**inputs).logits, expected)


# Per architecture, the first attention sub-layer: the module whose input is the residual stream r, the
# module whose input is r + branch (the next norm, before any other computation), the adapter's name.
RESIDUAL_POINTS = {
    "bert": ("encoder.layer.0.attention.self", "encoder.layer.0.attention.output.LayerNorm",
             "encoder.layer.0.attention.output.adapter"),
    "roberta": ("encoder.layer.0.attention.self", "encoder.layer.0.attention.output.LayerNorm",
                "encoder.layer.0.attention.output.adapter"),
    "gpt2": ("h.0.ln_1", "h.0.ln_2", "h.0.attn.adapter"),
    "llama": ("layers.0.input_layernorm", "layers.0.post_attention_layernorm", "layers.0.self_attn.adapter"),
    "t5": ("encoder.block.0.layer.0.layer_norm", "encoder.block.0.layer.1.layer_norm",
           "encoder.block.0.layer.0.adapter"),
}


def first_input(model: nn.Module, suffix: str, seen: dict, key: str):
    name, module = next((n, m) for n, m in model.named_modules() if n.endswith(suffix))

    def hook(module, args, kwargs):
        seen.setdefault(key, args[0] if args else kwargs["hidden_states"])

    return module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("arch", list(TINY))
def test_the_adapter_sees_the_sublayer_output_before_the_residual_add(arch):
    """Houlsby et al. 2019 §3.1 (Fig. 2): the adapter takes the sub-layer's output after its projection and
    dropout, and its output (plus its skip connection) is what is added to the residual stream, before
    the norm. In training mode, with dropout on and the same random draws: r + branch + adapter(branch),
    where the branch comes from a plain copy of the base. An adapter before the dropout, after the norm,
    or on the pre-attention norm gives another sum."""
    residual_at, sum_at, adapter_name = RESIDUAL_POINTS[arch]
    plain = make_model(arch)
    model = deltatune.attach(make_model(arch), deltatune.Adapter(bottleneck=M, train_norms=False), task="a")
    randomise(model, "a")
    adapter = next(a for n, a in adapters(model).items() if n.endswith(adapter_name))
    sums = {}
    for key, net in [("plain", plain), ("adapted", model)]:
        net.train()
        seen = {}
        handles = [first_input(net, residual_at, seen, "residual"), first_input(net, sum_at, seen, "sum")]
        torch.manual_seed(5)
        with torch.no_grad():
            net(**make_inputs(arch))
        for handle in handles:
            handle.remove()
        sums[key] = seen
    torch.testing.assert_close(sums["adapted"]["residual"], sums["plain"]["residual"])  # same stream so far
    branch = sums["plain"]["sum"] - sums["plain"]["residual"]
    with torch.no_grad():
        adapted_branch = adapter.adapter_up["a"](F.gelu(adapter.adapter_down["a"](branch)))
        expected = sums["plain"]["residual"] + branch + adapted_branch
    assert not torch.allclose(expected, sums["plain"]["sum"], atol=1e-3)  # the adapter changes the sum
    torch.testing.assert_close(sums["adapted"]["sum"], expected, atol=1e-5, rtol=1e-4)
