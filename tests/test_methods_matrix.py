"""One parametrized matrix: every method of the registry on every tiny architecture.

A method added to `registry.METHODS` is covered here with no edit: configs are its defaults, and what a
test expects follows the entry's flags (`mergeable`, `identity_at_init`).

Each test could fail: outputs are compared with the base model's, parameters before and after a step,
logits before and after merge and after a save/load round trip onto a fresh copy of the base.
"""

from __future__ import annotations

import copy
from dataclasses import fields

import pytest
import torch
from conftest import ARCHS, make_inputs, make_model

import deltatune
from deltatune.core.component import DeltaComponent
from deltatune.methods.registry import METHODS

BIASLESS = {"llama", "t5"}  # no bias terms: a method with an `add_missing` setting (BitFit) must add them


def method_configs(arch: str) -> dict[str, object]:
    """Every registered method's default config (adding missing biases on the biasless architectures)."""
    configs = {}
    for name, entry in METHODS.items():
        settings = {f.name for f in fields(entry.config)}
        configs[name] = entry.config(**({"add_missing": True} if arch in BIASLESS and "add_missing" in settings
                                        else {}))
    # variants of a method worth their own rows
    configs["adapter_lin"] = deltatune.Adapter(placement="lin", bottleneck=4, activation="relu")  # Lin et al.
    configs["adapter_drop"] = deltatune.Adapter(skip_layers=1)  # AdapterDrop: none in the lowest block
    configs["top_layers_1"] = deltatune.TopLayers(k=1)  # the tiny models have 2 blocks
    configs["lora_pissa"] = deltatune.LoRA(r=4, init="pissa")  # Meng et al. 2024: saved as a rank-8 LoRA
    return configs


MATRIX = [(arch, method) for arch in ARCHS for method in method_configs(arch)]
MERGEABLE = {name for name, entry in METHODS.items() if entry.mergeable} | {"top_layers_1", "lora_pissa"}
# inserted virtual tokens change the output from the first step (prompt tuning has no identity init);
# what such a method must leave exact is the base model
CHANGES_OUTPUT_AT_INIT = {name for name, entry in METHODS.items() if not entry.identity_at_init}
# PiSSA starts at W + s (B0 A0 - B0 A0) x: zero up to the rounding of one rank-2r product
NEAR_IDENTITY_AT_INIT = {"lora_pissa"}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def randomise(model: deltatune.DeltaModel, task: str, seed: int = 5) -> None:
    """Give a task's parameters non-trivial values (as if trained) so that comparisons mean something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.task_parameters(task).values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("arch,method", MATRIX)
def test_identity_at_init(arch, method):
    model, inputs = make_model(arch), make_inputs(arch)
    expected = logits(model, inputs)
    delta_model = deltatune.attach(model, method_configs(arch)[method], task="t")
    if method in CHANGES_OUTPUT_AT_INIT:
        assert not torch.equal(logits(delta_model, inputs), expected)
        delta_model.use("base")
    if method in NEAR_IDENTITY_AT_INIT:
        torch.testing.assert_close(logits(delta_model, inputs), expected, atol=1e-5, rtol=0)
        B = [t for k, t in delta_model.task_parameters("t").items() if k.endswith("lora_B")]
        assert all(t.abs().min() > 0 for t in B)  # not LoRA's zero B: the identity comes from the residual
        delta_model.use("base")
    assert torch.equal(logits(delta_model, inputs), expected)


@pytest.mark.parametrize("arch,method", MATRIX)
def test_one_step_changes_only_the_delta(arch, method):
    model, inputs = make_model(arch), make_inputs(arch)
    delta_model = deltatune.attach(model, method_configs(arch)[method], task="t")
    delta_model.train()
    task_tensors = delta_model.task_parameters("t")
    saved_before = {k: t.detach().clone() for k, t in task_tensors.items()}
    # what trains is exactly the task's delta (method + head), or what a method folds it from (prefix tuning
    # trains an MLP and saves its output)
    trained_ids = {id(t) for t in delta_model.trained_parameters("t").values()}
    folded = trained_ids != {id(t) for t in task_tensors.values()}
    before = {n: p.detach().clone() for n, p in delta_model.named_parameters()}
    trainable = {n for n, p in delta_model.named_parameters() if p.requires_grad}
    assert {id(p) for n, p in delta_model.named_parameters() if n in trainable} == trained_ids

    optimizer = torch.optim.AdamW([p for p in delta_model.parameters() if p.requires_grad], lr=1e-2,
                                  weight_decay=0.0)
    labels = torch.tensor([0, 1, 1])
    loss = torch.nn.functional.cross_entropy(delta_model(**inputs).logits, labels)
    loss.backward()
    optimizer.step()

    changed = {n for n, p in delta_model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "the optimizer step changed nothing"
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:5]}"
    head_keys = delta_model.head_keys("t")
    assert head_keys and all(not torch.equal(task_tensors[k], before_value(before, delta_model, task_tensors[k]))
                             for k in head_keys)
    if folded:  # the delta, folded again from what trained, moved with it
        after = delta_model.task_parameters("t")
        assert all(not torch.equal(after[k], saved_before[k]) for k in after)


def before_value(before: dict, model: torch.nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    name = next(n for n, p in model.named_parameters() if p is tensor)
    return before[name]


@pytest.mark.parametrize("arch,method", MATRIX)
def test_save_load_roundtrip_onto_fresh_base(arch, method, tmp_path):
    delta_model = deltatune.attach(make_model(arch), method_configs(arch)[method], task="t")
    randomise(delta_model, "t")
    inputs = make_inputs(arch)
    expected = logits(delta_model, inputs)
    delta_model.save_delta(tmp_path / "delta")

    files = sorted(p.name for p in (tmp_path / "delta").iterdir())
    assert files == ["delta.json", "delta.safetensors"]
    n_params = sum(t.numel() for t in delta_model.task_parameters("t").values())
    size = (tmp_path / "delta" / "delta.safetensors").stat().st_size
    assert 4 * n_params <= size <= 4 * n_params + 64 * 1024  # only the delta, plus a header

    reloaded = deltatune.load_delta(make_model(arch), tmp_path / "delta")
    assert reloaded.tasks == ["t"]
    assert torch.equal(logits(reloaded, inputs), expected)


@pytest.mark.parametrize("arch,method", [(a, m) for a, m in MATRIX if m in MERGEABLE])
def test_merge_matches_unmerged_and_unloads(arch, method):
    delta_model = deltatune.attach(make_model(arch), method_configs(arch)[method], task="t")
    randomise(delta_model, "t")
    inputs = make_inputs(arch)
    unmerged = logits(delta_model, inputs)
    delta_model.merge()
    torch.testing.assert_close(logits(delta_model, inputs), unmerged, atol=1e-5, rtol=0)
    delta_model.unmerge()
    assert torch.equal(logits(delta_model, inputs), unmerged)

    plain = delta_model.merge_and_unload()
    assert not any(isinstance(m, DeltaComponent) for m in plain.modules())
    assert not any("base_layer" in n or "lora_" in n or "bias_delta" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(logits(plain, inputs), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_task_switching_is_exact_across_methods(arch):
    """Several deltas of different methods on one base: a, b, a gives bit-identical outputs."""
    configs = method_configs(arch)
    base = make_model(arch)
    inputs = make_inputs(arch)
    base_logits = logits(base, inputs)
    model = None
    outputs = {}
    for index, (name, config) in enumerate(configs.items()):
        model = deltatune.attach(base if model is None else model, config, task=name)
        randomise(model, name, seed=index)
        outputs[name] = logits(model, inputs)
    names = list(configs)
    for name in names + names[::-1]:
        model.use(name)
        assert torch.equal(logits(model, inputs), outputs[name]), name
    model.use("base")
    assert torch.equal(logits(model, inputs), base_logits)
    assert len({tuple(o.flatten().tolist()) for o in outputs.values()}) == len(outputs)


@pytest.mark.parametrize("arch", ARCHS)
def test_deltas_of_several_methods_load_side_by_side(arch, tmp_path):
    configs = method_configs(arch)
    inputs = make_inputs(arch)
    expected = {}
    for index, (name, config) in enumerate(configs.items()):
        trained = deltatune.attach(make_model(arch), config, task=name)
        randomise(trained, name, seed=index)
        expected[name] = logits(trained, inputs)
        trained.save_delta(tmp_path / name)
    served = deltatune.DeltaModel(make_model(arch))
    for name in configs:
        served.add_delta(tmp_path / name)
    for name in list(configs)[::-1] + list(configs):
        served.use(name)
        assert torch.equal(logits(served, inputs), expected[name]), name


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_removing_a_wrapping_method_keeps_bitfit(arch):
    """BitFit on a layer that LoRA (or an adapter) also wraps survives that task's removal."""
    inputs = make_inputs(arch)
    model = deltatune.attach(make_model(arch), deltatune.LoRA(), task="lora")
    deltatune.attach(model, deltatune.BitFit(), task="bitfit")
    randomise(model, "bitfit")
    expected = logits(model, inputs)
    model.remove_task("lora")
    model.use("bitfit")
    assert torch.equal(logits(model, inputs), expected)


def test_switching_does_not_disturb_a_copy():
    """deepcopy of a DeltaModel keeps working on its own (tasks and state are per model)."""
    model = deltatune.attach(make_model("bert"), deltatune.LoRA(), task="a")
    randomise(model, "a")
    clone = copy.deepcopy(model)
    inputs = make_inputs("bert")
    clone.use("base")
    assert model.active_task == "a" and clone.active_task is None
    assert not torch.equal(logits(model, inputs), logits(clone, inputs))
