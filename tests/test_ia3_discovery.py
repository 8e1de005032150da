"""(IA)³ sites found from structure (architectures.discover_key_value, discover_ffn_outputs) on model types that
IA3_TARGETS does not name: the output rows a rescaling changes on fused projections are compared with rows
written out by hand from each model's attention code (keys and values changed, queries not), the FFN's second
linear layer with its name in each model's code, and discovery with the table where both exist."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.core.architectures import IA3_TARGETS, discover_ffn_outputs, discover_key_value, resolve_lora_targets
from deltatune.errors import TargetError
from deltatune.methods.ia3 import IA3Scales
from deltatune.testing import TINY_ZOO, tiny_model_of_type


def spans(*ranges: tuple[int, int]) -> list[int]:
    return [row for start, end in ranges for row in range(start, end)]


# hidden 32, 4 query heads of size 8. Per head h ([q_h, k_h, v_h]): k rows [24h+8, 24h+16), v [24h+16, 24h+24)
PER_HEAD_KV = spans(*[(24 * h + 8, 24 * h + 24) for h in range(4)])
FUSED = {  # model type, config overrides -> (fused layer name, k rows + v rows, output rows)
    ("gpt_neox", ()): ("query_key_value", PER_HEAD_KV, 96),
    ("bloom", ()): ("query_key_value", PER_HEAD_KV, 96),
    ("deberta", ()): ("in_proj", PER_HEAD_KV, 96),  # view(..., heads, -1).chunk(3): per head [q k v]
    ("phi3", ()): ("qkv_proj", spans((32, 64)), 64),  # [q (4 heads) | k (2) | v (2)]
    ("falcon", ()): ("query_key_value", spans((32, 48)), 48),  # multi-query: [q (4) | k (1) | v (1)]
    # new decoder architecture, 2 key/value heads: per group [q q k v] -> k 16:24, v 24:32, k 48:56, v 56:64
    ("falcon", (("new_decoder_architecture", True), ("num_kv_heads", 2))):
        ("query_key_value", spans((16, 32), (48, 64)), 64),
    ("gpt_bigcode", ()): ("c_attn", spans((32, 48)), 48),  # multi-query [q (4 heads) | k (1) | v (1)]
    ("modernbert", ()): ("Wqkv", spans((32, 96)), 96),  # [q | k | v]
}


def tiny(kind: str, overrides: tuple = ()) -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_model_of_type(kind, **dict(overrides))


@pytest.mark.parametrize("kind,overrides", list(FUSED))
def test_ia3_rescales_exactly_the_k_and_v_rows_of_a_fused_projection(kind, overrides):
    name, expected_rows, width = FUSED[kind, overrides]
    model = tiny(kind, overrides)
    assert kind not in IA3_TARGETS  # found from structure, not a table
    layer = next(m for n, m in model.named_modules() if n.endswith(name))
    inputs = {"input_ids": torch.randint(4, 500, (2, 7), generator=torch.Generator().manual_seed(1))}
    seen = {}

    def run(model, key):  # the first block's layer output (a hook registered after (IA)³'s sees its rescaling)
        hook = layer.register_forward_hook(lambda m, a, out: seen.setdefault(key, out.clone()))
        with torch.no_grad():
            model(**inputs)
        hook.remove()

    run(model, "base")
    delta_model = deltatune.attach(model, deltatune.IA3(), task="t")
    with torch.no_grad():
        for tensor in delta_model.task_parameters("t").values():
            tensor.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(2))
    run(delta_model, "scaled")
    base, scaled = seen["base"], seen["scaled"]
    assert scaled.shape[-1] == width
    changed = ((scaled - base).abs() > 0).flatten(0, -2).any(0)
    assert changed.nonzero().flatten().tolist() == expected_rows
    assert isinstance(layer.ia3, IA3Scales) and layer.ia3.ia3_l["t"].numel() == len(expected_rows)


@pytest.mark.parametrize("kind,ffn", [
    ("albert", "ffn_output"),  # one layer shared across depth: the model is one block
    ("distilbert", "ffn.lin2"), ("mpnet", "output.dense"), ("deberta-v2", "output.dense"), ("modernbert", "mlp.Wo"),
    ("gpt_neox", "mlp.dense_4h_to_h"), ("falcon", "mlp.dense_4h_to_h"), ("gptj", "mlp.fc_out"), ("phi", "mlp.fc2"),
    ("gpt_bigcode", "mlp.c_proj"), ("funnel", "ffn.linear_2"), ("bart", "fc2"),
    ("deepseek_v3", "down_proj"),  # a dense first block's mlp.down_proj, then the shared experts' down_proj
    ("qwen2_moe", "mlp.shared_expert.down_proj"),  # the experts are 3-D parameters; the shared expert is linear
])
def test_the_ffn_second_layer_is_found(kind, ffn):
    model = tiny(kind)
    found = discover_ffn_outputs(model)
    stacks = {"bart": 2, "albert": 0}.get(kind, 1)
    assert len(found) == max(1, 2 * stacks) and all(name.endswith(ffn) for name in found), found


def test_experts_stored_as_parameters_get_keys_and_values_only():
    model = deltatune.attach(tiny("mixtral"), deltatune.IA3(), task="t")
    sites = {n.rsplit(".", 1)[-1]: set(m.ia3_l) | set(m.ia3_ff) for n, m in model.named_modules()
             if isinstance(m, IA3Scales)}
    assert set(sites) == {"ia3"} and discover_ffn_outputs(model.base_model) == []
    hooked = sorted({n.split(".")[-2] for n, m in model.named_modules() if isinstance(m, IA3Scales)})
    assert hooked == ["k_proj", "v_proj"]


@pytest.mark.parametrize("kind", [k for k in TINY_ZOO if k in IA3_TARGETS])
def test_discovery_agrees_with_the_table_where_both_exist(kind):
    model = tiny(kind)
    keys_values, ffn = IA3_TARGETS[kind]
    tabled = {n: None if g is None else sorted(r for group in g for r in group)
              for n, g in resolve_lora_targets(model, keys_values).items()}
    assert discover_key_value(model) == tabled
    assert discover_ffn_outputs(model) == list(resolve_lora_targets(model, ffn))


def test_a_model_without_key_value_projections_is_refused_by_name():
    with pytest.raises(TargetError, match=r"no key/value projections found.*pass targets="):
        deltatune.attach(tiny("xlnet"), deltatune.IA3())  # XLNet's attention weights are parameters, not layers
