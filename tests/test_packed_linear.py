"""The prepacked (oneDNN) linear layers `deltatune serve` runs on a CPU (fp32; bf16 with native bf16 math): the same
function as the eager one to rounding, the same Parameters, a new pack when the weight changes, and the eager path
wherever a gradient is recorded or the inputs are of another dtype."""

import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune
from deltatune.serving.packed_linear import (
    PackedLinear,
    pack_linear_layers,
    pack_output_layer,
    packed_dtypes,
    packing_bytes,
    prepacking_available,
)
from deltatune.testing import tiny_model, with_random_deltas

pytestmark = pytest.mark.skipif(not prepacking_available(), reason="this torch build has no oneDNN")


def test_packed_head_gives_the_eager_logits_and_shares_the_weight():
    torch.manual_seed(0)
    model = tiny_model("llama", "causal-lm").eval()
    head = model.get_output_embeddings()
    ids = torch.randint(0, model.config.vocab_size, (5, 9))
    with torch.inference_mode():
        eager = model(input_ids=ids).logits
        assert pack_output_layer(model, batch_size=4)
        packed = model(input_ids=ids).logits
    swapped = model.get_output_embeddings()
    assert type(swapped) is PackedLinear and swapped.weight is head.weight  # the same Parameter: ties kept
    assert (packed - eager).abs().max() < 1e-5
    assert torch.equal(packed.argmax(-1), eager.argmax(-1))


def test_every_linear_packed_under_loaded_deltas_gives_the_eager_logits_of_mixed_rows():
    """`serve --packed-linears`: every plain linear layer (the blocks' and the head) swapped, those a LoRA wraps
    included; each row under its own task gives the logits it had before the swap."""
    torch.manual_seed(0)
    model = with_random_deltas(tiny_model("llama", "causal-lm"), {"a": deltatune.LoRA(r=4), "b": deltatune.LoRA(r=4)})
    linears = [name for name, module in model.base_model.named_modules() if type(module) is nn.Linear]
    ids = torch.randint(0, model.config.vocab_size, (3, 7))
    tasks = ["a", None, "b"]
    with torch.inference_mode():
        eager = model(input_ids=ids, tasks=tasks).logits
        assert pack_linear_layers(model.base_model, batch_size=4) == len(linears)
        layer = model.base_model.model.layers[0]  # each weight packed once, before any request: alone or in a group
        assert layer.self_attn.o_proj._packed is not None and layer.mlp.gate_proj._packed is None
        packed = model(input_ids=ids, tasks=tasks).logits
    assert not [name for name, module in model.base_model.named_modules() if type(module) is nn.Linear]
    attention, mlp = model.base_model.model.layers[0].self_attn, model.base_model.model.layers[0].mlp
    assert type(attention.q_proj.base_layer) is PackedLinear  # inside the LoRA
    group = attention.q_proj.base_layer.siblings[0]  # q, k, v packed as one product; so are gate and up
    assert group.layers == [attention.q_proj.base_layer, attention.k_proj, attention.v_proj.base_layer]  # k: no LoRA
    assert mlp.gate_proj.siblings[0].layers == [mlp.gate_proj, mlp.up_proj] and attention.o_proj.siblings is None
    assert (packed - eager).abs().max() < 1e-5 and torch.equal(packed.argmax(-1), eager.argmax(-1))


def test_a_weight_changed_in_place_is_packed_again():
    torch.manual_seed(0)
    layer = PackedLinear(nn.Linear(16, 32, bias=True), batch_size=3)
    inputs = torch.randn(3, 16)
    with torch.no_grad():
        before = layer(inputs)
        layer.weight.mul_(2.0)  # e.g. a merge writing into the weight
        after = layer(inputs)
        expected = inputs @ layer.weight.T + layer.bias
    assert not torch.allclose(before, after)
    assert torch.allclose(after, expected, atol=1e-5)


def test_a_packed_model_cast_to_bf16_afterwards_gives_the_eager_bf16_product():
    """`model.to(torch.bfloat16)` after packing: each layer (alone, or fused with its siblings) packs again in bf16
    where bf16 is packed here, else takes `F.linear`; never the stale fp32 pack."""
    torch.manual_seed(0)
    parent = nn.Module()
    parent.gate_proj, parent.up_proj, parent.down_proj = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(8, 16)
    assert pack_linear_layers(parent, batch_size=4) == 3
    parent.to(torch.bfloat16)
    inputs = torch.randn(4, 16).to(torch.bfloat16)
    with torch.inference_mode():
        for layer, layer_inputs in ((parent.gate_proj, inputs), (parent.up_proj, inputs),
                                    (parent.down_proj, inputs[:, :8])):
            output = layer(layer_inputs)
            expected = F.linear(layer_inputs, layer.weight, layer.bias)
            assert output.dtype == torch.bfloat16
            torch.testing.assert_close(output, expected)


def test_recorded_gradients_take_the_eager_product():
    torch.manual_seed(0)
    linear = nn.Linear(8, 4)
    layer = PackedLinear(linear, batch_size=2)
    inputs = torch.randn(2, 8, requires_grad=True)
    layer(inputs).sum().backward()  # the oneDNN product records no gradient: F.linear must have run
    assert torch.allclose(inputs.grad, linear.weight.sum(0).expand(2, 8))
    assert linear.weight.grad is not None


def test_a_bf16_head_is_packed_only_with_native_bf16_math(monkeypatch):
    """Without native bf16 math (emulated: slower than `F.linear`) a bf16 head stays a plain `nn.Linear`."""
    torch.manual_seed(0)
    monkeypatch.setattr("deltatune.serving.packed_linear.packed_dtypes", lambda: (torch.float32,))
    model = tiny_model("llama", "causal-lm").to(torch.bfloat16)
    assert not pack_output_layer(model, batch_size=4)
    assert type(model.get_output_embeddings()) is nn.Linear
    assert packing_bytes(model) == 0


@pytest.mark.skipif(torch.bfloat16 not in packed_dtypes(), reason="this CPU has no native bf16 math for oneDNN")
def test_bf16_linears_packed_give_the_eager_logits_of_mixed_rows():
    """`serve --precision bf16` on a CPU with AVX512-BF16 or AMX: every linear layer packed in bf16, q/k/v and gate/up
    fused, under two LoRAs and the base mixed per row: oneDNN's bf16 kernel is what `F.linear` runs there too, so the
    logits are the eager ones."""
    torch.manual_seed(0)
    model = with_random_deltas(tiny_model("llama", "causal-lm"), {"a": deltatune.LoRA(r=4), "b": deltatune.LoRA(r=4)})
    model = model.to(torch.bfloat16)
    linears = [module for module in model.base_model.modules() if type(module) is nn.Linear]
    ids = torch.randint(0, model.config.vocab_size, (3, 7))
    tasks = ["a", None, "b"]
    with torch.inference_mode():
        eager = model(input_ids=ids, tasks=tasks).logits
        assert pack_linear_layers(model.base_model, batch_size=4) == len(linears)
        packed = model(input_ids=ids, tasks=tasks).logits
    attention = model.base_model.model.layers[0].self_attn
    assert type(attention.q_proj.base_layer) is PackedLinear and attention.q_proj.base_layer.siblings is not None
    assert attention.q_proj.base_layer.weight.dtype == torch.bfloat16 and packed.dtype == torch.bfloat16
    assert (packed.float() - eager.float()).abs().max() <= 1e-2 * eager.float().abs().max()
    assert (packed.argmax(-1) == eager.argmax(-1)).float().mean() >= 0.95


def test_served_model_packs_its_linears_only_where_the_copy_fits(monkeypatch):
    """`serve --packed-linears` (the command's default) packs every linear layer of an fp32 model on a CPU, unless
    the packed copy would take more than half the memory available: then a warning, and the plain weights."""
    from deltatune.serving.app import served_model
    from deltatune.serving.config import ServeConfig

    monkeypatch.setattr("deltatune.models.load_model", lambda name, kind, **options: tiny_model("llama", kind))
    model = tiny_model("llama", "causal-lm")
    linears = [module for module in model.modules() if type(module) is nn.Linear]
    weights = {id(module.weight): module.weight for module in linears}  # the head may share the embedding's
    assert packing_bytes(model) == 4 * sum(weight.numel() for weight in weights.values())
    config = ServeConfig(kind="generation", packed_linears=True)
    plain = ServeConfig(kind="generation")
    monkeypatch.setattr("deltatune.core.memory.available_memory", lambda: 2 * packing_bytes(model))
    packed = {type(module) for module in served_model("tiny", "causal-lm", config).modules()}
    assert (PackedLinear in packed) == prepacking_available() and (nn.Linear not in packed) == prepacking_available()
    assert PackedLinear not in {type(module) for module in served_model("tiny", "causal-lm", plain).modules()}
    monkeypatch.setattr("deltatune.core.memory.available_memory", lambda: 2 * packing_bytes(model) - 1)
    with pytest.warns(UserWarning, match=r"--packed-linears left off: its copy of the weights would take"):
        kept = {type(module) for module in served_model("tiny", "causal-lm", config).modules()}
    assert PackedLinear not in kept and nn.Linear in kept


def test_available_memory_reads_the_system_figure():
    from deltatune.core.memory import available_memory

    available = available_memory()
    if not Path("/proc/meminfo").exists():
        assert available is None
        return
    total = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemTotal:")).split()[1]) * 1024
    assert 0 < available <= total


def fused_pair(bias: bool) -> tuple[nn.Module, list[nn.Linear]]:
    torch.manual_seed(0)
    parent = nn.Module()
    parent.gate_proj, parent.up_proj, parent.down_proj = nn.Linear(8, 6, bias=bias), nn.Linear(8, 5, bias=bias), \
        nn.Linear(5, 8, bias=bias)
    plain = [nn.Linear(8, 6, bias=bias), nn.Linear(8, 5, bias=bias)]
    for copy, layer in zip(plain, (parent.gate_proj, parent.up_proj), strict=True):
        copy.load_state_dict(layer.state_dict())
    assert pack_linear_layers(parent, batch_size=4) == (3 if prepacking_available() else 0)
    return parent, plain


@pytest.mark.skipif(not prepacking_available(), reason="this torch has no oneDNN")
@pytest.mark.parametrize("bias", [False, True])
def test_fused_siblings_hand_each_layer_its_own_product_once(bias):
    """gate and up packed as one weight: each gets its own output from ONE product of the same input; a part is
    handed out once (its caller may add into it in place), so a second call with that input computes again."""
    parent, (gate, up) = fused_pair(bias)
    inputs = torch.randn(3, 8)
    with torch.inference_mode():
        first_gate = parent.gate_proj(inputs)
        first_gate.add_(100.0)  # a caller writing into its part (LoRA's mixed decode adds its update in place)
        got_up = parent.up_proj(inputs)  # the same tensor: its columns of the product already made
        assert torch.allclose(got_up, up(inputs), atol=1e-5)
        again = parent.gate_proj(inputs)  # taken already: a new product, not the part written into
        assert torch.allclose(again, gate(inputs), atol=1e-5)
        other = torch.randn(3, 8)
        assert torch.allclose(parent.up_proj(other), up(other), atol=1e-5)  # another input: computed for it
        with torch.no_grad():
            parent.up_proj.weight.mul_(2.0)  # e.g. a merge: the group is packed again
        assert torch.allclose(parent.up_proj(inputs), 2 * up(inputs) - (up.bias if bias else 0), atol=1e-5)
    assert parent.down_proj.siblings is None  # no sibling of its own


@pytest.mark.skipif(not prepacking_available(), reason="this torch has no oneDNN")
def test_fused_siblings_keep_each_thread_s_products_apart():
    """The decode loops run the same layers on two threads at once: each thread's parts come from its own input."""
    parent, (gate, up) = fused_pair(bias=True)
    inputs = [torch.randn(2, 8), torch.randn(2, 8)]
    got: dict[int, tuple] = {}
    ready = threading.Barrier(2)

    def run(number: int) -> None:
        with torch.inference_mode():
            first = parent.gate_proj(inputs[number])
            ready.wait()  # both threads made their product before either takes its second part
            got[number] = (first, parent.up_proj(inputs[number]))

    threads = [threading.Thread(target=run, args=(number,)) for number in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with torch.inference_mode():
        for number in range(2):
            assert torch.allclose(got[number][0], gate(inputs[number]), atol=1e-5)
            assert torch.allclose(got[number][1], up(inputs[number]), atol=1e-5)
