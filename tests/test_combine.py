"""Combining LoRA deltas (`deltatune combine`, `DeltaModel.combine`), checked against hand computations:
each adapted weight's ΔW of the result is compared with Σ w_i ΔW_i (or its TIES / DARE merge) computed here
from the input factors, and the refusals name what differs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_inputs, make_model
from safetensors.torch import load_file

import deltatune
from deltatune.cli import main as cli_main
from deltatune.errors import ConfigError, DeltaError
from deltatune.formats.combine import CombineConfig, combine_deltas, dare, keep_largest, ties
from deltatune.methods.lora import LoRALinear


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def trained(arch: str, config: deltatune.LoRA, task: str, seed: int, num_labels: int = 2) -> deltatune.DeltaModel:
    """A LoRA task with random (as if trained) A, B and head."""
    base = make_model(arch)
    model = deltatune.attach(base, config, task=task)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.task_parameters(task).values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
    return model


def delta_weights(model: deltatune.DeltaModel, task: str) -> dict[str, torch.Tensor]:
    """{layer: (alpha/r) B A} of a loaded task, in float64, from LoRALinear.delta_weight (the merge's ΔW)."""
    return {name: layer.delta_weight(task).double() for name, layer in model.base_model.named_modules()
            if isinstance(layer, LoRALinear) and task in layer.tasks}


def by_hand(folder) -> dict[str, torch.Tensor]:
    """{layer: ΔW} of a saved plain LoRA delta (no fused slices), computed here: (alpha/r) B A."""
    tensors = load_file(folder / "delta.safetensors")
    config = json.loads((folder / "delta.json").read_text())["config"]
    scaling = config["alpha"] / (config["r"] ** 0.5 if config["use_rslora"] else config["r"])
    return {key[: -len(".lora_A")]: scaling * tensors[key[:-1] + "B"].double() @ tensors[key].double()
            for key in tensors if key.endswith(".lora_A")}


@pytest.fixture
def two_deltas(tmp_path):
    """Two tasks on one tiny BERT: different ranks, alphas and rsLoRA."""
    first = trained("bert", deltatune.LoRA(r=2, alpha=4), "sst2", seed=1)
    second = trained("bert", deltatune.LoRA(r=3, alpha=6, use_rslora=True), "rte", seed=2)
    return first.save_delta(tmp_path / "sst2"), second.save_delta(tmp_path / "rte")


# ---- exactness ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [deltatune.LoRA(r=2, alpha=4), deltatune.LoRA(r=5, alpha=7, use_rslora=True)])
def test_one_delta_at_weight_one_comes_back_bit_for_bit(config, tmp_path):
    source = trained("gpt2", config, "t", seed=3).save_delta(tmp_path / "t")  # gpt2: fused q, v slices
    out = combine_deltas({"t": source}, tmp_path / "out", CombineConfig(weights=[1.0]))
    before, after = load_file(source / "delta.safetensors"), load_file(out / "delta.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    meta_before, meta_after = (json.loads((f / "delta.json").read_text()) for f in (source, out))
    assert meta_after.pop("combined")["how"] == "linear"
    meta_after.pop("num_parameters"), meta_before.pop("num_parameters")
    assert meta_after == meta_before
    inputs = make_inputs("gpt2")
    assert torch.equal(logits(deltatune.load_delta(make_model("gpt2"), out), inputs),
                       logits(deltatune.load_delta(make_model("gpt2"), source), inputs))


def test_linear_is_the_weighted_sum_of_the_updates(two_deltas, tmp_path):
    sst2, rte = two_deltas
    out = combine_deltas({"a": sst2, "b": rte}, tmp_path / "out", CombineConfig(weights=[0.5, -0.25]))
    expected = {k: 0.5 * v - 0.25 * by_hand(rte)[k] for k, v in by_hand(sst2).items()}
    combined = by_hand(out)
    for key in expected:
        torch.testing.assert_close(combined[key], expected[key], atol=1e-6, rtol=1e-6)
    config = json.loads((out / "delta.json").read_text())["config"]
    assert config["r"] == 5 and config["use_rslora"] is False  # rank 2 + 3, the first delta's scaling
    # A is kept as trained: the weight sits on B alone
    first_A = load_file(sst2 / "delta.safetensors")
    out_A = load_file(out / "delta.safetensors")
    key = next(k for k in first_A if k.endswith("lora_A"))
    assert torch.equal(out_A[key][:2], first_A[key])


def test_the_combined_delta_runs_as_its_delta_weights_say(two_deltas, tmp_path):
    """Loaded onto a fresh base, the combined delta's merged weights are W + Σ w_i ΔW_i (an independent path:
    the merge of each input on its own base)."""
    sst2, rte = two_deltas
    out = combine_deltas({"a": sst2, "b": rte}, tmp_path / "out", CombineConfig(weights=[0.5, 0.5], head="b"))
    model = deltatune.load_delta(make_model("bert"), out)
    assert model.active_task == "rte"  # the head's task name, label count and head
    alone = {name: deltatune.load_delta(make_model("bert"), path) for name, path in [("a", sst2), ("b", rte)]}
    got = delta_weights(model, "rte")
    for key, value in got.items():
        expected = 0.5 * delta_weights(alone["a"], "sst2")[key] + 0.5 * delta_weights(alone["b"], "rte")[key]
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-6)
    head = {k: v for k, v in load_file(out / "delta.safetensors").items() if k.startswith("classifier")}
    assert head and all(torch.equal(v, load_file(rte / "delta.safetensors")[k]) for k, v in head.items())


def test_svd_at_full_rank_equals_linear_and_truncates_by_eckart_young(two_deltas, tmp_path):
    sst2, rte = two_deltas
    weights = CombineConfig(weights=[0.7, 0.3])
    linear = by_hand(combine_deltas({"a": sst2, "b": rte}, tmp_path / "linear", weights))
    full = by_hand(combine_deltas({"a": sst2, "b": rte}, tmp_path / "svd", CombineConfig(how="svd",
                                                                                          weights=[0.7, 0.3])))
    for key in linear:
        torch.testing.assert_close(full[key], linear[key], atol=1e-6, rtol=1e-6)
    low = by_hand(combine_deltas({"a": sst2, "b": rte}, tmp_path / "svd2",
                                 CombineConfig(how="svd", weights=[0.7, 0.3], rank=2)))
    for key in linear:
        U, S, Vh = torch.linalg.svd(linear[key])
        torch.testing.assert_close(low[key], U[:, :2] @ torch.diag(S[:2]) @ Vh[:2], atol=1e-5, rtol=1e-5)


# ---- TIES and DARE -------------------------------------------------------------------------------------
def test_ties_on_a_hand_made_example():
    """Yadav et al. 2023 §3 by hand. Task 1 [[3, -1], [0.5, 2]], task 2 [[-1, -4], [2, 0.2]], keep the top half:
    trimmed [[3, 0], [0, 2]] and [[0, -4], [2, 0]]; elected signs of the sums [[3, -4], [2, 2]]: all agree with
    one value each -> [[3, -4], [2, 2]]. With a conflict (task 3 [[-5, 0], [0, 0]] trimmed to itself):
    entry (0, 0) sums to 3 - 5 = -2: only task 3 agrees -> -5."""
    one, two = torch.tensor([[3.0, -1.0], [0.5, 2.0]]), torch.tensor([[-1.0, -4.0], [2.0, 0.2]])
    assert torch.equal(ties([one, two], 0.5), torch.tensor([[3.0, -4.0], [2.0, 2.0]]))
    three = torch.tensor([[-5.0, 0.0], [0.0, 0.0]])
    assert torch.equal(ties([one, two, three], 0.5), torch.tensor([[-5.0, -4.0], [2.0, 2.0]]))
    # agreeing values are averaged: two tasks [[2, 4]] and [[6, -1]] at density 1: [[4, 4]]
    assert torch.equal(ties([torch.tensor([[2.0, 4.0]]), torch.tensor([[6.0, -1.0]])], 1.0),
                       torch.tensor([[4.0, 4.0]]))
    assert torch.equal(keep_largest(torch.tensor([1.0, -3.0, 2.0, 0.5]), 0.5), torch.tensor([0.0, -3.0, 2.0, 0.0]))


def test_dare_drops_and_rescales_with_a_seed():
    delta = torch.arange(1.0, 10001.0).view(100, 100)
    first = dare([delta], 0.25, torch.Generator().manual_seed(0))
    again = dare([delta], 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(first, again)
    kept = first != 0
    assert 0.22 < kept.float().mean() < 0.28  # p = 0.75 dropped
    assert torch.equal(first[kept], delta[kept] * 4)  # survivors scaled by 1 / (1 - p)
    assert not torch.equal(first, dare([delta], 0.25, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("how", ["ties", "dare"])
def test_ties_and_dare_of_the_layers_then_svd(two_deltas, how, tmp_path):
    """End to end, per layer: the combined ΔW is the rank-k SVD of the merge of w_i ΔW_i computed here."""
    sst2, rte = two_deltas
    settings = CombineConfig(how=how, weights=[1.0, 1.0], density=0.3, rank=4, seed=7)
    combined = by_hand(combine_deltas({"a": sst2, "b": rte}, tmp_path / "out", settings))
    generator = torch.Generator().manual_seed(7)
    inputs = [by_hand(sst2), by_hand(rte)]
    for key in sorted(inputs[0]):  # the layers in the order the combine draws its masks
        deltas = [inputs[0][key], inputs[1][key]]
        merged = ties(deltas, 0.3) if how == "ties" else dare(deltas, 0.3, generator)
        U, S, Vh = torch.linalg.svd(merged)
        torch.testing.assert_close(combined[key], U[:, :4] @ torch.diag(S[:4]) @ Vh[:4], atol=1e-5, rtol=1e-5)
    if how == "ties":  # at density 1 and one delta, TIES keeps that delta (at full rank)
        alone = by_hand(combine_deltas({"a": sst2}, tmp_path / "alone", CombineConfig(how="ties", weights=[1.0],
                                                                                      density=1.0)))
        for key, value in by_hand(sst2).items():
            torch.testing.assert_close(alone[key], value, atol=1e-6, rtol=1e-6)


# ---- refusals ---------------------------------------------------------------------------------------------
def test_mismatches_are_refused_by_name(two_deltas, tmp_path):
    sst2, rte = two_deltas
    gpt2 = trained("gpt2", deltatune.LoRA(r=2), "g", seed=4).save_delta(tmp_path / "gpt2")
    with pytest.raises(DeltaError, match="only deltas of one base model combine"):
        combine_deltas({"a": sst2, "g": gpt2}, tmp_path / "out", CombineConfig())
    other_targets = trained("bert", deltatune.LoRA(r=2, targets=["query"]), "q", seed=5).save_delta(tmp_path / "q")
    with pytest.raises(DeltaError, match="adapt different layers"):
        combine_deltas({"a": sst2, "q": other_targets}, tmp_path / "out", CombineConfig())
    bitfit = deltatune.attach(make_model("bert"), deltatune.BitFit(), task="b").save_delta(tmp_path / "bitfit")
    with pytest.raises(DeltaError, match="is a bitfit delta; combine takes plain LoRA deltas"):
        combine_deltas({"a": sst2, "b": bitfit}, tmp_path / "out", CombineConfig())
    with pytest.raises(ConfigError, match="1 weight"):
        combine_deltas({"a": sst2, "b": rte}, tmp_path / "out", CombineConfig(weights=[1.0]))
    with pytest.raises(ConfigError, match="--head 'c' is none of the deltas"):
        combine_deltas({"a": sst2, "b": rte}, tmp_path / "out", CombineConfig(head="c"))
    assert not (tmp_path / "out").exists()


def test_a_peft_adapter_folder_is_refused_with_the_way_round(two_deltas, tmp_path):
    sst2, rte = two_deltas
    from deltatune.formats.peft import export_peft

    export_peft(rte, tmp_path / "peft")
    with pytest.raises(DeltaError, match="peft adapter folder, which does not record its base model; load it"):
        combine_deltas({"a": sst2, "p": tmp_path / "peft"}, tmp_path / "out", CombineConfig())


def test_a_delta_with_extra_tensors_is_refused(two_deltas, tmp_path):
    """A LoRA-family delta with more than A, B and a head (DoRA's magnitude vector) is not plain LoRA."""
    sst2, _ = two_deltas
    from deltatune.formats.combine import Source, combine

    tensors, meta = load_file(sst2 / "delta.safetensors"), json.loads((sst2 / "delta.json").read_text())
    layer = next(k for k in tensors if k.endswith(".lora_A"))[: -len(".lora_A")]
    tensors[f"{layer}.lora_magnitude"] = torch.ones(4)
    with pytest.raises(DeltaError, match="neither LoRA A/B nor its head"):
        combine([Source("dora", tensors, meta, "dora-delta")], CombineConfig())


# ---- DeltaModel.combine and the command line ------------------------------------------------------------------
def test_delta_model_combine_equals_the_folders_combine(two_deltas, tmp_path):
    sst2, rte = two_deltas
    model = deltatune.DeltaModel(make_model("bert"))
    model.add_delta(sst2)
    model.add_delta(rte)
    model.combine(["sst2", "rte"], task="both", how="svd", weights=[0.5, 0.5], head="sst2")
    assert model.active_task == "both" and model.tasks == ["sst2", "rte", "both"]
    out = combine_deltas({"sst2": sst2, "rte": rte}, tmp_path / "out", CombineConfig(how="svd", weights=[0.5, 0.5]))
    inputs = make_inputs("bert")
    assert torch.equal(logits(model, inputs), logits(deltatune.load_delta(make_model("bert"), out), inputs))


def test_cli_combine(two_deltas, tmp_path, capsys):
    sst2, rte = two_deltas
    out = tmp_path / "out"
    assert cli_main(["combine", "--delta", f"a={sst2}", "--delta", f"b={rte}", "--weights", "0.5,0.5",
                     "--how", "ties", "--density", "0.5", "--head", "b", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["out"] == str(out) and printed["rank"] == 5
    meta = json.loads((out / "delta.json").read_text())
    assert meta["task"] == "rte" and meta["combined"]["how"] == "ties" and meta["combined"]["density"] == 0.5
    assert cli_main(["combine", "--delta", f"a={sst2}", "--delta", f"a={rte}", "--out", str(out)]) == 2
    assert "delta names must differ" in capsys.readouterr().err
