"""The prepacked (oneDNN) output projection `deltatune serve` runs in fp32 on a CPU: the same function as the
eager one to rounding, the same Parameters, a new pack when the weight changes, and the eager path wherever a
gradient is recorded or the inputs are not fp32."""

from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune
from deltatune.serving.packed_linear import (
    PackedLinear,
    pack_linear_layers,
    pack_output_layer,
    packing_bytes,
    prepacking_available,
)
from deltatune.testing import tiny_model

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
    model = deltatune.attach(tiny_model("llama", "causal-lm"), deltatune.LoRA(r=4), task="a")
    model = deltatune.attach(model, deltatune.LoRA(r=4), task="b")
    with torch.no_grad():
        for task in ("a", "b"):
            for tensor in model.task_parameters(task).values():
                tensor.add_(torch.randn(tensor.shape) * 0.3)
    model.eval()
    linears = [name for name, module in model.base_model.named_modules() if type(module) is nn.Linear]
    ids = torch.randint(0, model.config.vocab_size, (3, 7))
    tasks = ["a", None, "b"]
    with torch.inference_mode():
        eager = model(input_ids=ids, tasks=tasks).logits
        assert pack_linear_layers(model.base_model, batch_size=4) == len(linears)
        packed = model(input_ids=ids, tasks=tasks).logits
    assert not [name for name, module in model.base_model.named_modules() if type(module) is nn.Linear]
    assert type(model.base_model.model.layers[0].self_attn.q_proj.base_layer) is PackedLinear  # inside the LoRA
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


def test_recorded_gradients_take_the_eager_product():
    torch.manual_seed(0)
    linear = nn.Linear(8, 4)
    layer = PackedLinear(linear, batch_size=2)
    inputs = torch.randn(2, 8, requires_grad=True)
    layer(inputs).sum().backward()  # the oneDNN product records no gradient: F.linear must have run
    assert torch.allclose(inputs.grad, linear.weight.sum(0).expand(2, 8))
    assert linear.weight.grad is not None


def test_only_a_plain_fp32_linear_head_is_packed():
    torch.manual_seed(0)
    model = tiny_model("llama", "causal-lm").to(torch.bfloat16)
    assert not pack_output_layer(model, batch_size=4)
    assert type(model.get_output_embeddings()) is nn.Linear


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
