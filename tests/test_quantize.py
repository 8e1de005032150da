"""A quantized frozen base (deltatune.core.quantize, QLoRA's recipe): the layers against hand-derived error bounds and
a dequantized fp32 copy, every delta method trained over them, refusals, and deltas moving between precisions."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import make_inputs, make_model

import deltatune
from deltatune.cli import main as cli_main
from deltatune.core.architectures import in_transformer_block, linear_layers
from deltatune.core.quantize import SCHEMES, QuantizedLinear, quantization_info, quantize_model, quantized_layers
from deltatune.errors import QuantizationError
from deltatune.models import load_model, load_tokenizer
from deltatune.testing import linear_weight_bytes

# The 16 NormalFloat values (Dettmers et al. 2023, appendix E): the widest gap, -1 .. -0.6962, bounds the rounding.
NF4_HALF_GAP = (1 - 0.6961928) / 2


@pytest.fixture(params=SCHEMES)
def scheme(request) -> str:
    return request.param


def rounding_bound(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    """The largest |W - dequant(W_q)| each scheme allows, per weight, computed from W alone."""
    rows, cols = weight.shape
    if scheme == "int8":  # symmetric per output row: step max|w| / 127, rounding to the nearest step
        return (weight.abs().amax(1, keepdim=True) / 127 / 2).expand(rows, cols)
    if scheme == "int4":  # asymmetric per group of 64 inputs: 16 levels over [min, max]
        groups = weight.view(rows, cols // 64, 64)
        step = (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / 15
        return (step / 2).expand_as(groups).reshape(rows, cols)
    blocks = weight.reshape(-1, 64)  # NF4: per block of 64, values scaled by the block's absmax
    return (blocks.abs().amax(-1, keepdim=True) * NF4_HALF_GAP).expand_as(blocks).reshape(rows, cols)


def test_each_weight_is_within_its_schemes_rounding_error(scheme):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48)
    layer = QuantizedLinear(linear, scheme, group_size=64 if scheme == "int4" else None)
    error = (layer.dequantize() - linear.weight.detach()).abs()
    bound = rounding_bound(linear.weight.detach(), scheme)
    if scheme == "int4":  # quantized from the bf16 weight with bf16 scales (QuantizedLinear.kernel_dtype)
        groups = linear.weight.detach().abs().reshape(-1, 64).amax(-1, keepdim=True)
        bound = bound + (groups * 2**-6).expand(-1, 64).reshape(bound.shape)
    # 2% over the bound: NF4's block scales are themselves 8-bit (double quantization, QLoRA §3)
    assert (error <= bound * 1.02 + 1e-7).all(), (error / bound).max()
    assert error.mean() > bound.mean() / 20  # it is really quantized, not kept in fp32
    assert layer.bias is linear.bias  # the bias stays as it was, full precision


def test_the_quantized_matmul_and_its_input_gradient_are_those_of_the_dequantized_weight(scheme):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48)
    layer = QuantizedLinear(linear, scheme, group_size=64 if scheme == "int4" else None)
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = layer(x)
    reference = F.linear(x, layer.dequantize(), linear.bias)  # an fp32 matmul by the same numbers
    tolerance = 3e-2 if scheme == "int4" else 2e-5  # int4 multiplies bf16 activations (QuantizedLinear.kernel_dtype)
    torch.testing.assert_close(y, reference, atol=tolerance, rtol=tolerance)
    upstream = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, upstream)
    torch.testing.assert_close(grad, upstream @ layer.dequantize(), atol=2e-5, rtol=1e-5)
    assert not layer.weight.requires_grad


def test_only_the_block_linears_are_quantized_and_weight_memory_shrinks(scheme):
    plain, model = make_model("llama", kind="causal-lm"), quantize_model(make_model("llama", kind="causal-lm"), scheme)
    blocks = [name for name in linear_layers(plain) if in_transformer_block(name)]
    assert sorted(quantized_layers(model)) == sorted(blocks) and len(blocks) == 2 * 7  # q k v o gate up down
    assert not isinstance(model.lm_head, QuantizedLinear)
    for name, tensor in model.state_dict().items():  # embeddings, norms, head: untouched
        if not any(name.startswith(block + ".") for block in blocks):
            torch.testing.assert_close(tensor, plain.state_dict()[name], atol=0, rtol=0)
    fp32_bytes = sum(plain.get_submodule(name).weight.nbytes for name in blocks)
    assert linear_weight_bytes(plain) == fp32_bytes
    # int8: 1 byte + a 4-byte scale per row of 32; int4: 4 bits + a scale and zero per group of 32 (fp32)
    ratio = linear_weight_bytes(model) / fp32_bytes
    assert {"int8": 0.25 < ratio < 0.4, "int4": 0.1 < ratio < 0.25, "nf4": 0.1 < ratio < 0.25}[scheme], ratio
    info = quantization_info(model)
    assert info["scheme"] == scheme and info["layers"] == 14 and info["full_precision_layers"] == 0


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "t5"])
def test_a_quantized_model_computes_what_its_dequantized_fp32_copy_does(arch, scheme):
    """The whole model, against an fp32 model holding dequant(W_q) as plain weights (an independent forward:
    nn.Linear / Conv1D, not the quantized kernels)."""
    kind = "seq2seq" if arch == "t5" else "classification"
    quantized = quantize_model(make_model(arch, kind=kind), scheme)
    simulated = make_model(arch, kind=kind)
    with torch.no_grad():
        for name, layer in quantized_layers(quantized).items():
            target = simulated.get_submodule(name)
            target.weight.copy_(layer.dequantize().T if layer.conv1d else layer.dequantize())
    inputs = make_inputs(arch)
    if arch == "t5":
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :4]
    tolerance = 3e-2 if scheme == "int4" else 1e-4  # int4 multiplies bf16 activations (QuantizedLinear.kernel_dtype)
    with torch.no_grad():
        torch.testing.assert_close(quantized(**inputs).logits, simulated(**inputs).logits, atol=tolerance,
                                   rtol=tolerance)


def test_minilm_quantized_stays_close_to_fp32():
    """MiniLM's last hidden states on two real sentences, relative error against fp32. Measured here: int8 2.5% and
    3.1%, int4 26.1% and 28.9%, nf4 21.2% and 25.0% (a 384-wide model: 4-bit rounding is coarse for it). Bounds:
    1.5x the measured worst case."""
    tokenizer = load_tokenizer("minilm")
    reference = load_model("minilm")
    worst = {}
    for scheme in SCHEMES:
        quantized = load_model("minilm", quantize=scheme)
        errors = []
        for text in ["a charming and often affecting journey", "unflinchingly bleak and desperate"]:
            batch = tokenizer(text, return_tensors="pt")
            with torch.no_grad():
                a = reference(**batch, output_hidden_states=True).hidden_states[-1]
                b = quantized(**batch, output_hidden_states=True).hidden_states[-1]
            errors.append(((a - b).norm() / a.norm()).item())
        worst[scheme] = max(errors)
    assert 1e-3 < worst["int8"] < 0.05 and worst["int4"] < 0.45 and worst["nf4"] < 0.4, worst
    assert worst["int8"] < worst["nf4"] / 3 and worst["int8"] < worst["int4"] / 3, worst  # 8 bits beat 4


METHODS = {
    "lora": deltatune.LoRA(r=4, alpha=8),
    "bitfit": deltatune.BitFit(add_missing=True),
    "adapter": deltatune.Adapter(bottleneck=8),
    "prompt": deltatune.PromptTuning(length=3),
    "prefix": deltatune.PrefixTuning(length=3, reparameterize=False),
    "dora": deltatune.DoRA(r=4, alpha=8),
    "ia3": deltatune.IA3(),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_delta_method_trains_over_a_quantized_base(method, scheme):
    """Training lowers the loss, gradients reach the lowest block through the quantized layers, and the
    quantized weights stay bit for bit what they were."""
    torch.manual_seed(0)
    model = deltatune.attach(quantize_model(make_model("llama", kind="causal-lm"), scheme), METHODS[method], task="t")
    before = {name: layer.dequantize().clone() for name, layer in quantized_layers(model.base_model).items()}
    inputs = make_inputs("llama", batch=4, length=12)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable)  # the delta stays in full precision
    optimizer = torch.optim.AdamW(trainable, lr=1e-1 if method == "ia3" else 1e-2)  # (IA)³: scales around 1
    model.train()
    losses = []
    for step in range(12):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        if step == 0:  # the lowest block's delta gets a gradient back through both blocks' quantized layers
            if method == "prefix":  # one tensor (layers, key/value, heads, length, head dim)
                lowest = [model.task_parameters("t", roles=("method",))["prefix_key_values"].grad[0]]
            else:  # prompt tuning's embeddings sit below every block
                lowest = [p.grad for name, p in model.named_parameters()
                          if p.requires_grad and (".layers.0." in name or method == "prompt")]
            assert lowest and any(grad.abs().sum() > 0 for grad in lowest)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.02, losses
    for name, layer in quantized_layers(model.base_model).items():
        torch.testing.assert_close(layer.dequantize(), before[name], atol=0, rtol=0)


def trained_lora(scheme: str | None, seed: int = 0, task: str = "t") -> deltatune.DeltaModel:
    """A tiny Llama (optionally quantized) with a LoRA delta given random nonzero values."""
    base = make_model("llama", kind="causal-lm")
    model = deltatune.attach(quantize_model(base, scheme), deltatune.LoRA(r=4, alpha=8), task=task)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.task_parameters(task).values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.3)
    return model.eval()


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_lora_over_int8_saves_records_the_precision_and_reloads_to_identical_logits(tmp_path):
    model = trained_lora("int8")
    inputs = make_inputs("llama")
    path = model.save_delta(tmp_path / "delta")
    meta = json.loads((path / "delta.json").read_text())
    assert meta["base"]["quantization"]["scheme"] == "int8"
    assert meta["base"]["quantization"]["library"].startswith("torchao ")
    assert meta["base"]["quantization"]["layers"] == 14
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same precision: no note
        reloaded = deltatune.load_delta(quantize_model(make_model("llama", kind="causal-lm"), "int8"), path)
    torch.testing.assert_close(logits(reloaded, inputs), logits(model, inputs), atol=0, rtol=0)
    assert not torch.allclose(logits(reloaded.use(None), inputs), logits(model, inputs))  # the delta acts


def test_a_delta_moves_between_precisions_with_a_note(tmp_path):
    """int8 -> fp32 and fp32 -> nf4: the base is recognised (same shapes and fingerprint), a warning says the
    outputs differ by the base's quantization error, and they do by about that much."""
    inputs = make_inputs("llama")
    quantized = trained_lora("int8")
    path = quantized.save_delta(tmp_path / "int8")
    with pytest.warns(UserWarning, match="trained on an int8-quantized base and is loaded onto a full-precision"):
        on_fp32 = deltatune.load_delta(make_model("llama", kind="causal-lm"), path)
    # the same delta on the fp32 base differs as the two bases differ, no more
    base_gap = (logits(quantized.use(None), inputs) - logits(on_fp32.use(None), inputs)).abs().max()
    delta_gap = (logits(quantized.use("t"), inputs) - logits(on_fp32.use("t"), inputs)).abs().max()
    assert 0 < delta_gap < 3 * base_gap + 1e-3, (delta_gap, base_gap)
    fp32 = trained_lora(None, seed=1)
    with pytest.warns(UserWarning, match="trained on a full-precision base and is loaded onto an nf4-quantized"):
        deltatune.load_delta(quantize_model(make_model("llama", kind="causal-lm"), "nf4"),
                             fp32.save_delta(tmp_path / "fp32"))
    assert on_fp32.base_identity["shape_fingerprint"] == quantized.base_identity["shape_fingerprint"]
    assert on_fp32.base_identity["weights_fingerprint"] == quantized.base_identity["weights_fingerprint"]
    assert on_fp32.base_identity["num_parameters"] == quantized.base_identity["num_parameters"]


@pytest.mark.parametrize("method", ["full", "top_layers"])
def test_methods_that_train_base_weights_are_refused(method):
    config = {"full": deltatune.FullFineTune(), "top_layers": deltatune.TopLayers(k=1)}[method]
    with pytest.raises(QuantizationError, match=f"{method} trains the base model's own weights.*int8"):
        deltatune.attach(quantize_model(make_model("bert"), "int8"), config, task="t")


def test_lora_merge_on_a_quantized_base_refuses_and_leaves_the_model_working(scheme):
    model = trained_lora(scheme)
    inputs = make_inputs("llama")
    before = logits(model, inputs)
    with pytest.raises(QuantizationError, match=f"cannot merge LoRA task 't' into a {scheme}-quantized weight"):
        model.merge()
    assert model.merged_task is None
    torch.testing.assert_close(logits(model, inputs), before, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_dora_and_ia3_merges_on_a_quantized_base_refuse_too(method, scheme):
    """DoRA's merge goes through LoRA's (refused); (IA)³ rescales W's rows and columns itself (refused by its own
    check): neither may round its update into the quantized weight."""
    torch.manual_seed(0)
    model = deltatune.attach(quantize_model(make_model("llama", kind="causal-lm"), scheme), METHODS[method], task="t")
    with torch.no_grad():
        for tensor in model.task_parameters("t", roles=("method",)).values():
            tensor.mul_(1.2)
    inputs = make_inputs("llama")
    before = logits(model.eval(), inputs)
    name = {"dora": "LoRA", "ia3": "(IA)³"}[method]
    with pytest.raises(QuantizationError, match=rf"cannot merge {re.escape(name)} task 't' into a {scheme}-quantized"):
        model.merge()
    torch.testing.assert_close(logits(model, inputs), before, atol=0, rtol=0)


def test_bitfit_merges_into_the_full_precision_biases_of_a_quantized_base():
    model = deltatune.attach(quantize_model(make_model("bert"), "int8"), deltatune.BitFit(), task="t")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.task_parameters("t", roles=("method",)).values():
            tensor.add_(torch.randn(tensor.shape, generator=generator))
    inputs = make_inputs("bert")
    unmerged = logits(model, inputs)
    model.merge()
    torch.testing.assert_close(logits(model, inputs), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge()
    torch.testing.assert_close(logits(model, inputs), unmerged, atol=0, rtol=0)


@pytest.mark.parametrize(("quantization", "tolerance"), [("int8", 1e-5), ("int4", 1e-2)])  # int4: bf16 products
def test_a_mixed_task_batch_over_a_quantized_base_matches_each_task_alone(quantization, tolerance):
    model = trained_lora(quantization, seed=0, task="a")
    model.add_task(deltatune.Adapter(bottleneck=8), "b")
    with torch.no_grad():
        for tensor in model.task_parameters("b").values():
            tensor.add_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(5)) * 0.3)
    inputs = make_inputs("llama", batch=3)
    tasks = ["a", "b", None]
    mixed = logits(model.eval(), {**inputs, "tasks": tasks})
    for row, task in enumerate(tasks):
        alone = logits(model.use(task), {k: v[row : row + 1] for k, v in inputs.items()})
        torch.testing.assert_close(mixed[row : row + 1], alone, atol=tolerance, rtol=tolerance)


def test_bad_quantization_settings_are_refused_before_loading():
    with pytest.raises(QuantizationError, match="unknown quantization 'int3'; choose one of int8, int4, nf4"):
        load_model("no-such-model-anywhere", quantize="int3")
    with pytest.raises(QuantizationError, match="already carries deltas"):
        quantize_model(trained_lora(None), "int8")
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_model(quantize_model(make_model("bert"), "int8"), "int4")


def test_cli_train_eval_and_serve_over_a_quantized_base(tiny_model_dir, sentiment_csv, tmp_path, capsys):
    data = ["--task", "csv", "--data-file", str(sentiment_csv), "--text-columns", "review",
            "--label-column", "sentiment"]
    out = tmp_path / "run"
    assert cli_main(["train", "--model", str(tiny_model_dir), *data, "--method", "lora", "--out", str(out),
                     "--max-steps", "4", "--batch-size", "8", "--quantize", "int8", "--no-progress"]) == 0
    capsys.readouterr()
    meta = json.loads((out / "delta" / "delta.json").read_text())
    assert meta["base"]["quantization"]["scheme"] == "int8"
    assert cli_main(["eval", "--model", str(tiny_model_dir), "--delta", str(out / "delta"), *data,
                     "--quantize", "int8"]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert cli_main(["train", "--model", str(tiny_model_dir), *data, "--method", "full", "--out", str(tmp_path / "f"),
                     "--max-steps", "1", "--quantize", "nf4", "--no-progress"]) == 2
    assert "full trains the base model's own weights" in capsys.readouterr().err.strip().splitlines()[-1]
    from deltatune.serving.app import ServeConfig, build_engine

    engine = build_engine(str(tiny_model_dir), {"csv": out / "delta"}, ServeConfig(quantize="int8"))
    try:
        assert quantization_info(engine.model.base_model)["scheme"] == "int8"
    finally:
        engine.close()


def test_compare_reuses_cells_finished_before_the_quantize_setting_existed(tmp_path):
    """A cell file written before TrainConfig had `quantize` ran at its default (full precision): reused; a cell
    asked with --quantize is not the same cell."""
    from dataclasses import asdict

    from deltatune.results.compare import _finished
    from deltatune.training.loop import TrainConfig

    config = TrainConfig(model="m", task="sst2", method="lora", out=str(tmp_path / "run"))
    old = {k: v for k, v in json.loads(json.dumps(asdict(config))).items() if k != "quantize"}
    cell = tmp_path / "cell.json"
    cell.write_text(json.dumps({"config": old, "summary": {"final": {}}}))
    assert _finished(cell, config) is not None
    quantized = TrainConfig(model="m", task="sst2", method="lora", out=str(tmp_path / "run"), quantize="int8")
    assert _finished(cell, quantized) is None
    cell.write_text(json.dumps({"config": {**old, "max_steps": 7}, "summary": {}}))
    assert _finished(cell, config) is None


def test_pissa_over_a_quantized_base_starts_from_the_base_and_trains():
    """PiSSA's factors come from the weight the layer multiplies by, dequant(W_q); s(BA - B0A0) is zero at the
    start, so the model starts as the quantized base."""
    base = quantize_model(make_model("llama", kind="causal-lm"), "int8")
    inputs = make_inputs("llama")
    before = logits(base, inputs)
    model = deltatune.attach(base, deltatune.LoRA(r=4, init="pissa"), task="t")
    torch.testing.assert_close(logits(model, inputs), before, atol=1e-5, rtol=1e-5)
    model.train()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
