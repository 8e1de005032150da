"""Structural discovery (targets.py): W_q and W_v found by name, the q and v rows of fused projections, and
`targets="all-linear"`, on the tiny models of `testing.TINY_ZOO`.

The fused layouts are checked two ways, neither through the code under test: the output rows that a LoRA
update changes are compared with row numbers written out by hand from each model's attention code, and the
key/value cache of the first block (what attention actually reads as k and v) shows the keys untouched and
the values changed.
"""

from __future__ import annotations

import re

import pytest
import torch

import deltatune
from deltatune.core.architectures import (
    ADAPTER_SITES,
    DEFAULT_LORA_TARGETS,
    FINAL_MODULES,
    discover_adapter_sites,
    discover_final_norms,
    discover_query_value,
    final_modules,
    is_norm,
    resolve_lora_targets,
)
from deltatune.errors import TargetError
from deltatune.methods.lora import LoRALinear
from deltatune.testing import TINY_ZOO, tiny_model_of_type


def spans(*ranges: tuple[int, int]) -> list[int]:
    return [row for start, end in ranges for row in range(start, end)]


# hidden 32, 4 query heads of size 8 (2 key/value heads where the type has grouped-query attention).
# GPT-NeoX, BLOOM, Falcon (multi_query=False): per head h, rows [24h, 24h+8) q, [24h+8, 24h+16) k, [24h+16, 24h+24) v
PER_HEAD_Q, PER_HEAD_V = spans((0, 8), (24, 32), (48, 56), (72, 80)), spans((16, 24), (40, 48), (64, 72), (88, 96))
FUSED = {  # model type, config overrides -> (fused layer name, q rows + v rows, output rows)
    ("gpt_neox", ()): ("query_key_value", PER_HEAD_Q + PER_HEAD_V, 96),
    ("bloom", ()): ("query_key_value", PER_HEAD_Q + PER_HEAD_V, 96),
    ("falcon", (("multi_query", False),)): ("query_key_value", PER_HEAD_Q + PER_HEAD_V, 96),
    # Phi-3 [q (4 heads) | k (2) | v (2)]: q 0:32, k 32:48, v 48:64
    ("phi3", ()): ("qkv_proj", spans((0, 32), (48, 64)), 64),
    # Falcon-7B style multi-query: [q (4 heads) | k (1) | v (1)]
    ("falcon", ()): ("query_key_value", spans((0, 32), (40, 48)), 48),
    # Falcon-40B style new decoder architecture, 2 key/value heads: per group [q q k v] -> q 0:16, v 24:32, ...
    ("falcon", (("new_decoder_architecture", True), ("num_kv_heads", 2))):
        ("query_key_value", spans((0, 16), (24, 32), (32, 48), (56, 64)), 64),
    ("gpt2", ()): ("c_attn", spans((0, 32), (64, 96)), 96),  # Conv1D [q | k | v]
    ("modernbert", ()): ("Wqkv", spans((0, 32), (64, 96)), 96),  # view(3, heads, head_dim): [q | k | v]
}


def fused_model(kind: str, overrides: tuple) -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_model_of_type(kind, **dict(overrides))


def first_fused_layer(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return next(m for n, m in model.named_modules() if n.endswith(name) and not n.endswith("base_layer"))


@pytest.mark.parametrize("kind,overrides", list(FUSED))
def test_lora_changes_exactly_the_q_and_v_rows_of_a_fused_projection(kind, overrides):
    name, expected_rows, width = FUSED[kind, overrides]
    model = fused_model(kind, overrides)
    inputs = {"input_ids": torch.randint(4, 500, (2, 7), generator=torch.Generator().manual_seed(1))}
    seen = {}
    hook = first_fused_layer(model, name).register_forward_hook(lambda m, a, out: seen.__setitem__("base", out))
    with torch.no_grad():
        model(**inputs)
    hook.remove()

    delta_model = deltatune.attach(model, deltatune.LoRA(r=4), task="t")
    layer = first_fused_layer(delta_model, name)
    assert isinstance(layer, LoRALinear)
    with torch.no_grad():  # a trained-looking update: B != 0
        for B in layer.lora_B.values():
            B.normal_(generator=torch.Generator().manual_seed(2))
    hook = layer.register_forward_hook(lambda m, a, out: seen.__setitem__("lora", out))
    with torch.no_grad():
        delta_model(**inputs)
    hook.remove()
    assert seen["lora"].shape[-1] == width
    changed = ((seen["lora"] - seen["base"]).abs() > 0).flatten(0, -2).any(0)  # (width,): rows the update touched
    assert changed.nonzero().flatten().tolist() == sorted(expected_rows)
    assert layer.lora_A["t"].shape == (2 * 4, 32)  # one rank-4 A for q, one for v
    assert layer.lora_B["t"].shape == (len(expected_rows), 4)


@pytest.mark.parametrize("kind,overrides", [k for k in FUSED if k[0] != "modernbert"])  # ModernBERT: no cache
def test_fused_lora_leaves_the_keys_and_changes_the_values(kind, overrides):
    """What the first block's attention reads as k and v (its key/value cache): keys unchanged, values not."""
    ids = torch.randint(4, 500, (2, 7), generator=torch.Generator().manual_seed(1))

    def first_cache(model):
        with torch.no_grad():
            cache = model.base_model(input_ids=ids, use_cache=True).past_key_values
        return cache.layers[0].keys, cache.layers[0].values

    base_keys, base_values = first_cache(fused_model(kind, overrides))
    delta_model = deltatune.attach(fused_model(kind, overrides), deltatune.LoRA(r=4), task="t")
    with torch.no_grad():
        for name, tensor in delta_model.task_parameters("t").items():
            if name.endswith("lora_B"):
                tensor.normal_(generator=torch.Generator().manual_seed(2))
    keys, values = first_cache(delta_model.base_model)
    assert torch.equal(keys, base_keys)
    assert (values - base_values).abs().amin(dim=(0, 2, 3)).gt(0).all()  # every key/value head's values moved


@pytest.mark.parametrize("kind,expected", [
    ("albert", ["query", "value"]), ("deberta-v2", ["query_proj", "value_proj"]), ("mpnet", ["q", "v"]),
    ("gptj", ["q_proj", "v_proj"]), ("bart", ["q_proj", "v_proj"]), ("mixtral", ["q_proj", "v_proj"]),
])
def test_separate_query_and_value_projections_are_found_by_name(kind, expected):
    torch.manual_seed(0)
    model = deltatune.attach(tiny_model_of_type(kind), deltatune.LoRA(), task="t")
    adapted = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert sorted(adapted) == sorted(expected)
    assert all(m.whole for m in model.modules() if isinstance(m, LoRALinear))


def test_all_linear_adapts_every_block_linear_but_not_the_head():
    torch.manual_seed(0)
    base = tiny_model_of_type("llama")
    linears = {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    model = deltatune.attach(base, deltatune.LoRA(targets="all-linear"), task="t")
    adapted = {n for n, m in model.base_model.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == linears - {"score"}
    assert len(adapted) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 blocks


def test_unknown_fused_layout_is_refused_with_the_fix():
    torch.manual_seed(0)
    model = tiny_model_of_type("gpt_neox")
    model.config.model_type = "my_neox"  # a family whose query_key_value layout no table names
    with pytest.raises(TargetError, match=r"layout deltatune does not know.*targets=\['query_key_value'\]"):
        deltatune.attach(model, deltatune.LoRA())


TABLED = [kind for kind in TINY_ZOO if kind in DEFAULT_LORA_TARGETS]


@pytest.mark.parametrize("kind", TABLED)
def test_discovery_agrees_with_every_table_where_both_exist(kind):
    """The hand-written tables (written from each model's code) and what discovery reads from the structure."""
    torch.manual_seed(0)
    model = tiny_model_of_type(kind)
    assert discover_query_value(model) == resolve_lora_targets(model, DEFAULT_LORA_TARGETS[kind])
    if kind in ADAPTER_SITES:
        attention, ffn = discover_adapter_sites(model)
        names = [name for name, _ in model.named_modules()]
        for pattern, found in zip(ADAPTER_SITES[kind], (attention, ffn)):
            tabled = [name for name in names if re.search(pattern, name)]
            assert len(found) == len(tabled) and all(f.startswith(t.rpartition(".")[0] + ".") or f == t
                                                     for f, t in zip(found, tabled)), (found, tabled)
    if kind in FINAL_MODULES:
        assert discover_final_norms(model) == [n for n in final_modules(model) if is_norm(model.get_submodule(n))]


@pytest.mark.parametrize("kind,attention,ffn", [
    ("distilbert", "attention.out_lin", "ffn.lin2"),
    ("mpnet", "attention.attn.o", "output.dense"),
    ("deberta-v2", "attention.output.dense", "output.dense"),
    ("gpt_neox", "attention.dense", "mlp.dense_4h_to_h"),
    ("bloom", "self_attention.dense", "mlp.dense_4h_to_h"),
    ("gptj", "attn.out_proj", "mlp.fc_out"),
    ("opt", "self_attn.out_proj", "fc2"),
    ("mixtral", "self_attn.o_proj", "mlp"),  # the sparse MoE block: its experts are no nn.Linear
    ("bart", "self_attn.out_proj", "fc2"),  # encoder and decoder self-attention, not encoder_attn
])
def test_adapter_sites_are_the_sub_layer_outputs(kind, attention, ffn):
    torch.manual_seed(0)
    model = tiny_model_of_type(kind)
    found_attention, found_ffn = discover_adapter_sites(model)
    stacks = 2 if kind == "bart" else 1
    assert len(found_attention) == len(found_ffn) == 2 * stacks
    assert all(name.endswith(f".{i % 2}.{attention}") for i, name in enumerate(found_attention))
    assert all(name.endswith(f".{i % 2}.{ffn}") for i, name in enumerate(found_ffn))
