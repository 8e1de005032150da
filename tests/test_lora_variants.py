"""LoRA's variants: PiSSA initialisation (Meng et al. 2024) and LoRA+ learning rates (Hayou et al. 2024).

PiSSA is checked against an independent path: the paper's own form, the base weight replaced by the
residual W - s B0 A0 with a plain LoRA on top, built by hand on a fresh copy of the base. LoRA+ is checked
by its first Adam step, which moves every parameter by lr x sign(gradient): B moves ratio times as far.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_inputs, make_model
from safetensors.torch import load_file

import deltatune
from deltatune.errors import ConfigError, TrainingError
from deltatune.methods.lora import LoRALinear
from deltatune.methods.registry import build_config
from deltatune.training.loop import TrainConfig, setup, train


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def lora_layers(model: deltatune.DeltaModel) -> dict[str, LoRALinear]:
    """{module name in the base model: its LoRA wrapper}."""
    return {name: m for name, m in model.base_model.named_modules() if isinstance(m, LoRALinear)}


def train_steps(model, inputs, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps on a fixed batch: the task moves away from its initialisation."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    labels = torch.arange(inputs["input_ids"].shape[0]) % 2
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(**inputs).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


# ---- PiSSA -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "gpt2"])  # gpt2: the q and v slices of the fused c_attn, one SVD each
def test_pissa_starts_from_the_principal_part_of_each_weight(arch):
    config = deltatune.LoRA(r=3, alpha=12, init="pissa")
    model = deltatune.attach(make_model(arch), config, task="p")
    fresh = dict(make_model(arch).named_parameters())
    for name, layer in lora_layers(model).items():
        weight = fresh[name + ".weight"].detach()
        weight = weight.T if layer.transposed else weight  # (d_out, d_in)
        r, (width,) = 3, set(layer.widths)  # one range per row group on these architectures
        A, B = layer.lora_A["p"].detach(), layer.lora_B["p"].detach()
        for s, (start, end) in enumerate(layer.slices):
            U, S, Vh = torch.linalg.svd(weight[start:end].double())
            principal = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
            product = config.scaling * B[s * width:(s + 1) * width].double() @ A[s * r:(s + 1) * r].double()
            torch.testing.assert_close(product, principal, atol=1e-5, rtol=0)
            # A's rows are orthogonal with squared norms S_r / s (the singular values split evenly)
            gram = A[s * r:(s + 1) * r].double() @ A[s * r:(s + 1) * r].double().T
            torch.testing.assert_close(gram, torch.diag(S[:r] / config.scaling), atol=1e-5, rtol=0)


def paper_form(arch: str, trained: deltatune.DeltaModel, config: deltatune.LoRA) -> deltatune.DeltaModel:
    """Meng et al. 2024 §3 as written: a fresh base whose adapted weights are the residual W - s B0 A0, with a
    plain LoRA holding the trained A, B (and the trained head) on top."""
    base = make_model(arch)
    layers = lora_layers(trained)
    with torch.no_grad():
        for name, layer in layers.items():
            initial = layer.pissa_initial["p"]
            residual_update = torch.zeros(layer.out_features, layer.in_features)
            r, (width,) = config.r, set(layer.widths)  # one range per row group on these architectures
            for s, (start, end) in enumerate(layer.slices):
                residual_update[start:end] = initial.B[s * width:(s + 1) * width] @ initial.A[s * r:(s + 1) * r]
            weight = base.get_submodule(name).weight
            weight -= config.scaling * (residual_update.T if layer.transposed else residual_update)
    plain = deltatune.attach(base, deltatune.LoRA(r=config.r, alpha=config.alpha, use_rslora=config.use_rslora),
                             task="p")
    with torch.no_grad():
        trained_values = trained.task_parameters("p")
        for key, tensor in plain.task_parameters("p").items():
            tensor.copy_(trained_values[key])
    return plain


@pytest.mark.parametrize("arch,rslora", [("bert", False), ("gpt2", False), ("llama", True)])
def test_a_trained_pissa_delta_is_the_paper_form_and_loads_onto_the_unmodified_base(arch, rslora, tmp_path):
    config = deltatune.LoRA(r=4, alpha=8, init="pissa", use_rslora=rslora)
    inputs = make_inputs(arch)
    base_logits = logits(make_model(arch), inputs)
    model = deltatune.attach(make_model(arch), config, task="p")
    torch.testing.assert_close(logits(model, inputs), base_logits, atol=1e-5, rtol=0)  # starts as the base
    train_steps(model, inputs)
    trained = logits(model, inputs)
    assert (trained - base_logits).abs().max() > 1e-2  # it did move
    torch.testing.assert_close(trained, logits(paper_form(arch, model, config), inputs), atol=1e-5, rtol=1e-5)

    model.save_delta(tmp_path / "delta")
    meta = json.loads((tmp_path / "delta" / "delta.json").read_text())
    assert meta["method"] == "lora" and meta["config"]["r"] == 8 and meta["config"]["init"] == "default"
    saved = load_file(tmp_path / "delta" / "delta.safetensors")
    for name, layer in lora_layers(model).items():  # rank 2r = 8 per output slice
        assert saved[f"{name}.lora_A"].shape[0] == 8 * len(layer.slices) and saved[f"{name}.lora_B"].shape[1] == 8
    reloaded = deltatune.load_delta(make_model(arch), tmp_path / "delta")  # a plain LoRA, rank 8, on the base
    assert "p" not in next(iter(lora_layers(reloaded).values())).pissa_initial
    torch.testing.assert_close(logits(reloaded, inputs), trained, atol=1e-6, rtol=0)
    if not rslora:  # the same products with the same scaling: bit for bit
        assert torch.equal(logits(reloaded, inputs), trained)
    reloaded.use("base")  # the base weights were never touched
    assert torch.equal(logits(reloaded, inputs), base_logits)


def test_pissa_and_plain_lora_tasks_share_a_base_and_a_mixed_batch():
    inputs = make_inputs("bert", batch=4)
    model = deltatune.attach(make_model("bert"), deltatune.LoRA(r=4, init="pissa"), task="p")
    deltatune.attach(model, deltatune.LoRA(r=2), task="l")
    for task in ("p", "l"):
        model.use(task)
        train_steps(model, inputs, steps=2)
    alone = {}
    for task in ("p", "l", "base"):
        model.use(task)
        alone[task] = logits(model, inputs)
    tasks = ["p", "l", "base", "p"]
    with torch.no_grad():
        mixed = model(**inputs, tasks=tasks).logits
    for row, task in enumerate(tasks):
        torch.testing.assert_close(mixed[row], alone[task][row], atol=1e-5, rtol=0)
    model.use("p")
    model.merge()
    torch.testing.assert_close(logits(model, inputs), alone["p"], atol=1e-5, rtol=0)


def test_pissa_fast_svd_finds_a_planted_principal_part():
    """torch.svd_lowrank (pissa_niter > 0) on a weight with a clear top-2 subspace finds it as the exact SVD does."""
    base = make_model("bert")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in base.named_modules():
            if name.endswith("attention.self.query"):
                d_out, d_in = module.weight.shape
                u, v = torch.randn(d_out, 2, generator=generator), torch.randn(2, d_in, generator=generator)
                module.weight.copy_(u @ v + 1e-3 * torch.randn(d_out, d_in, generator=generator))
    exact = deltatune.attach(base, deltatune.LoRA(r=2, init="pissa", targets=["query"]), task="exact")
    deltatune.attach(exact, deltatune.LoRA(r=2, init="pissa", pissa_niter=4, targets=["query"]), task="fast")
    for layer in lora_layers(exact).values():
        products = {t: layer.lora_B[t].detach() @ layer.lora_A[t].detach() for t in ("exact", "fast")}
        torch.testing.assert_close(products["fast"], products["exact"], atol=1e-4, rtol=1e-4)
    inputs = make_inputs("bert")
    exact.use("base")
    base_logits = logits(exact, inputs)
    exact.use("fast")
    torch.testing.assert_close(logits(exact, inputs), base_logits, atol=1e-5, rtol=0)


def test_pissa_settings_are_checked():
    with pytest.raises(ConfigError, match="init must be one of"):
        build_config("lora", {"init": "pisa"})
    with pytest.raises(ConfigError, match="pissa_niter"):
        build_config("lora", {"init": "pissa", "pissa_niter": -1})


# ---- LoRA+ -------------------------------------------------------------------------------------------
def train_config(model_dir, data_file, out, **overrides) -> TrainConfig:
    values = dict(model=str(model_dir), task="csv", method="lora", out=str(out),
                  task_options={"path": str(data_file), "text_columns": ["review"], "label_column": "sentiment"},
                  max_steps=1, batch_size=8, lr=1e-3, seed=3, progress=False, warmup_ratio=0.0)
    values.update(overrides)
    return TrainConfig(**values)


def test_loraplus_puts_the_b_matrices_in_a_group_at_ratio_times_the_rate(tiny_model_dir, sentiment_csv, tmp_path):
    run = setup(train_config(tiny_model_dir, sentiment_csv, tmp_path / "run", lr_ratio=16.0))
    B = {id(p) for k, p in run.model.trained_parameters().items() if k.endswith(".lora_B")}
    rates = {}
    for group in run.optimizer.param_groups:
        for p in group["params"]:
            rates[id(p)] = group["lr"]
    assert B and {rates[i] for i in B} == {16e-3}
    others = {id(p) for p in run.trainable} - B
    assert others and {rates[i] for i in others} == {1e-3}  # A, the head


def test_loraplus_moves_b_ratio_times_as_far_in_the_first_step(tiny_model_dir, sentiment_csv, tmp_path):
    """Adam's first step moves each parameter by lr * g / (|g| + eps): the same direction at both ratios, B
    16 times as far (B starts at zero, so weight decay does not touch it); A has no gradient yet (B = 0) and
    only decays, identically; the head is at the base rate in both runs."""
    deltas = {}
    for ratio in (1.0, 16.0):
        summary = train(train_config(tiny_model_dir, sentiment_csv, tmp_path / f"ratio{ratio}", lr_ratio=ratio))
        assert summary["lr_ratio"] == ratio
        deltas[ratio] = load_file(tmp_path / f"ratio{ratio}" / "delta" / "delta.safetensors")
    plain, plus = deltas[1.0], deltas[16.0]
    for key in plain:
        if key.endswith("lora_B"):
            assert plain[key].abs().max() > 0
            torch.testing.assert_close(plus[key], 16 * plain[key], atol=0, rtol=1e-6)
        else:
            assert torch.equal(plus[key], plain[key]), key


def test_loraplus_is_refused_for_a_method_without_b_matrices(tiny_model_dir, sentiment_csv, tmp_path):
    with pytest.raises(TrainingError, match="method 'bitfit' has none"):
        setup(train_config(tiny_model_dir, sentiment_csv, tmp_path / "run", method="bitfit", lr_ratio=16.0))
    with pytest.raises(TrainingError, match="positive number"):
        setup(train_config(tiny_model_dir, sentiment_csv, tmp_path / "run", lr_ratio=-1.0))
