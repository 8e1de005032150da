"""DoRA (Liu et al. 2024) and (IA)³ (Liu et al. 2022): what the registry matrix cannot see.

References come from elsewhere: the equations computed by hand from the base layer's own weights, a fresh
copy of the base model, and the real peft package (logits and gradients)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_inputs, make_model
from safetensors.torch import load_file

import deltatune
from deltatune.core.architectures import unwrap
from deltatune.errors import DeltaError, TargetError
from deltatune.formats.peft import export_peft

peft = pytest.importorskip("peft")
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")  # peft warns about Conv1D fan_in_fan_out, ...
ATOL = 1e-5
QUERY = "bert.encoder.layer.0.attention.self.query"
KEY, VALUE = "bert.encoder.layer.0.attention.self.key", "bert.encoder.layer.0.attention.self.value"
FFN_OUT = "bert.encoder.layer.0.output.dense"


def randomise(tensors, seed: int = 3, scale: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in tensors:
            tensor.add_(torch.randn(tensor.shape, generator=generator) * scale)


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs).logits


def layer_output(model, name: str, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.base_model.get_submodule(name)(x)


# ---- DoRA -------------------------------------------------------------------------------------------
def test_dora_magnitude_starts_at_the_weight_norms_and_the_model_at_the_base():
    base = make_model("bert")
    model = deltatune.attach(make_model("bert"), deltatune.DoRA(r=4), task="t")
    weight = base.get_submodule(QUERY).weight  # (d_out, d_in): one norm per output unit (§4.1)
    assert torch.equal(model.task_parameters("t")[QUERY + ".dora.magnitude"], torch.linalg.norm(weight, dim=1))
    inputs = make_inputs("bert")
    assert torch.equal(logits(model, inputs), logits(base, inputs))
    assert model.report(print_table=False).method_parameters == 2 * 2 * (4 * 32 + 32 * 4 + 32)  # 2 layers x q, v


def test_dora_trains_under_bf16_autocast_as_compare_runs_it():
    """`deltatune compare` trains in bf16 autocast by default: B A is then bf16 while the layer's weights are fp32;
    a step runs, gradients reach A, B and m, and they stay fp32."""
    model = deltatune.attach(make_model("bert"), deltatune.DoRA(r=4), task="t")
    randomise([p for name, p in model.named_parameters() if "lora_B" in name])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.train()(**make_inputs("bert"), labels=torch.tensor([0, 1, 1])).loss
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad and "classifier" not in name}
    assert grads and all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("arch,name", [("bert", QUERY), ("gpt2", "transformer.h.0.attn.c_attn")])
def test_dora_layer_computes_magnitude_times_direction(arch, name):
    """y = m ⊙ (W + s B A) x / ||W + s B A||_c + b (eq. 5), from the layer's tensors, by hand."""
    model = deltatune.attach(make_model(arch), deltatune.DoRA(r=2, alpha=6), task="t")
    randomise(model.task_parameters("t").values())
    layer = model.base_model.get_submodule(name)
    plain = unwrap(layer)
    weight = plain.weight.T if layer.transposed else plain.weight  # (d_out, d_in)
    x = torch.randn(2, 5, layer.in_features)
    combined = weight + layer.delta_weight("t")  # (alpha / r) B A on the adapted slices, zeros elsewhere
    m = layer.dora.magnitude["t"]
    expected = (x @ combined.T) * (m / torch.linalg.norm(combined, dim=1)) + plain.bias
    torch.testing.assert_close(layer_output(model, name, x), expected, atol=ATOL, rtol=0)


def test_dora_merge_writes_the_decomposed_weight():
    model = deltatune.attach(make_model("bert"), deltatune.DoRA(r=2), task="t")
    randomise(model.task_parameters("t").values())
    layer = model.base_model.get_submodule(QUERY)
    before = unwrap(layer).weight.detach().clone()
    combined = before + layer.delta_weight("t").detach()
    expected = combined * (layer.dora.magnitude["t"].detach() / torch.linalg.norm(combined, dim=1))[:, None]
    inputs = make_inputs("bert")
    unmerged = logits(model, inputs)
    model.merge()
    torch.testing.assert_close(unwrap(layer).weight, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, inputs), unmerged, atol=ATOL, rtol=0)
    model.unmerge()
    assert torch.equal(unwrap(layer).weight, before)


def test_dora_gradients_equal_peft_s():
    """The same DoRA in both libraries gives the same gradients for A, B and m: both treat the norm as a
    constant in backward (§4.3)."""
    config = deltatune.DoRA(r=2, alpha=4)
    ours = deltatune.attach(make_model("bert"), config, task="t")
    randomise(ours.task_parameters("t").values())
    theirs = get_peft_model(make_model("bert"), LoraConfig(r=2, lora_alpha=4, use_dora=True, modules_to_save=["pooler"],
                                                           target_modules=["query", "value"], task_type="SEQ_CLS"))
    state = theirs.state_dict()
    with torch.no_grad():
        for key, tensor in ours.task_parameters("t").items():
            module, _, name = key.rpartition(".")
            peft_key = {"lora_A": f"{module}.lora_A.default.weight", "lora_B": f"{module}.lora_B.default.weight",
                        "magnitude": f"{module.removesuffix('.dora')}.lora_magnitude_vector.default.weight"}.get(name)
            if peft_key is None:  # the head: the classifier and the pooler
                head = next(h for h in ("classifier", "bert.pooler") if key.startswith(h + "."))
                peft_key = f"{head}.modules_to_save.default.{key[len(head) + 1:]}"
            state[f"base_model.model.{peft_key}"].copy_(tensor)
    inputs, labels = make_inputs("bert"), torch.tensor([0, 1, 1])
    for model in (ours.eval(), theirs.eval()):  # no dropout: the same function in both
        torch.nn.functional.cross_entropy(model(**inputs).logits, labels).backward()
    peft_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for key, tensor in ours.task_parameters("t").items():
        if ".dora." in key:
            match = f"{key.removesuffix('.dora.magnitude')}.lora_magnitude_vector.default.weight"
        elif key.endswith(("lora_A", "lora_B")):
            match = f"{key}.default.weight"
        else:
            continue
        torch.testing.assert_close(tensor.grad, peft_grads[f"base_model.model.{match}"], atol=1e-5, rtol=1e-4)


# ---- (IA)³ -------------------------------------------------------------------------------------------
def test_ia3_targets_keys_values_and_the_ffn_input():
    model = deltatune.attach(make_model("bert"), deltatune.IA3(), task="t")
    keys = sorted(model.task_parameters("t", roles=("method",)))
    assert keys == sorted(f"bert.encoder.layer.{i}.{site}" for i in range(2) for site in
                          ["attention.self.key.ia3.l", "attention.self.value.ia3.l", "output.dense.ia3.l_ff"])
    assert all(torch.equal(t, torch.ones_like(t)) for t in model.task_parameters("t", roles=("method",)).values())
    assert model.report(print_table=False).method_parameters == 2 * (32 + 32 + 64)


def test_ia3_rescales_outputs_and_inputs_and_merges_into_rows_and_columns():
    base = make_model("bert")
    randomise([module.bias for name, module in base.named_modules() if name.endswith(("key", "value"))])  # BERT's are 0
    model = deltatune.attach(base, deltatune.IA3(), task="t")
    randomise(model.task_parameters("t").values())
    key, ffn_out = (unwrap(model.base_model.get_submodule(n)) for n in (KEY, FFN_OUT))
    l_k, l_ff = key.ia3.ia3_l["t"].detach(), ffn_out.ia3.ia3_ff["t"].detach()
    W_k, b_k, W_2 = key.weight.detach().clone(), key.bias.detach().clone(), ffn_out.weight.detach().clone()
    x, h = torch.randn(2, 5, 32), torch.randn(2, 5, 64)
    torch.testing.assert_close(layer_output(model, KEY, x), (x @ W_k.T + b_k) * l_k, atol=ATOL, rtol=0)
    # (a clone: in inference the FFN's input, its own intermediate activation, is rescaled in place)
    torch.testing.assert_close(layer_output(model, FFN_OUT, h.clone()), (h * l_ff) @ W_2.T + ffn_out.bias,
                               atol=ATOL, rtol=0)

    inputs = make_inputs("bert")
    unmerged = logits(model, inputs)
    model.merge()
    torch.testing.assert_close(key.weight, W_k * l_k[:, None], atol=1e-7, rtol=0)  # rows (outputs)
    torch.testing.assert_close(key.bias, b_k * l_k, atol=1e-7, rtol=0)
    torch.testing.assert_close(ffn_out.weight, W_2 * l_ff[None, :], atol=1e-7, rtol=0)  # columns (inputs)
    torch.testing.assert_close(logits(model, inputs), unmerged, atol=ATOL, rtol=0)
    model.unmerge()
    assert torch.equal(key.weight, W_k) and torch.equal(key.bias, b_k) and torch.equal(ffn_out.weight, W_2)


def test_ia3_on_fused_gpt2_attention_rescales_only_k_and_v():
    model = deltatune.attach(make_model("gpt2"), deltatune.IA3(), task="t")
    randomise(model.task_parameters("t").values())
    c_attn = model.base_model.get_submodule("transformer.h.0.attn.c_attn")
    scale = c_attn.ia3.ia3_l["t"].detach()
    assert scale.shape == (64,)  # k and v of hidden 32
    x = torch.randn(2, 4, 32)
    expected = c_attn(x).detach()  # under the same task: compare with the plain layer by hand
    plain = x @ c_attn.weight + c_attn.bias
    torch.testing.assert_close(expected, plain * torch.cat([torch.ones(32), scale]), atol=ATOL, rtol=0)


def test_ia3_target_errors_name_the_fix():
    with pytest.raises(TargetError, match="rescales nothing"):
        deltatune.attach(make_model("bert"), deltatune.IA3(targets=[], feedforward=[]))
    with pytest.raises(TargetError, match=r"whole input.*\[i/n\]"):
        deltatune.attach(make_model("gpt2"), deltatune.IA3(feedforward=["c_attn[0/3]"]))
    with pytest.raises(TargetError, match=r"\(IA\)³ target 'nope' matches no linear layer"):
        deltatune.attach(make_model("bert"), deltatune.IA3(targets=["nope"]))


def test_lora_dora_and_ia3_share_layers_and_each_example_gets_its_own(tmp_path):
    """A LoRA and a DoRA task on the same q/v layers, (IA)³ on v too: each task alone, then one mixed batch
    whose rows are each task's own logits; removing tasks leaves the others exact."""
    model = deltatune.attach(make_model("bert"), deltatune.LoRA(r=2), task="lora")
    deltatune.attach(model, deltatune.DoRA(r=4), task="dora")
    deltatune.attach(model, deltatune.IA3(), task="ia3")
    for seed, task in enumerate(model.tasks):
        randomise(model.task_parameters(task).values(), seed=seed)
    inputs = make_inputs("bert", batch=4)
    alone = {task: logits(model.use(task), inputs) for task in [*model.tasks, "base"]}
    assert len({tuple(v.flatten().tolist()) for v in alone.values()}) == 4
    tasks = ["dora", "ia3", "lora", "base"]
    with torch.no_grad():
        mixed = model(**inputs, tasks=tasks).logits
    for i, task in enumerate(tasks):
        torch.testing.assert_close(mixed[i], alone[task][i], atol=ATOL, rtol=0, msg=task)
    model.remove_task("lora")
    assert torch.equal(logits(model.use("dora"), inputs), alone["dora"])
    model.remove_task("dora")
    assert torch.equal(logits(model.use("ia3"), inputs), alone["ia3"])
    model.remove_task("ia3")
    assert not model.components() or set(model.components()) <= {"classifier"}
    assert torch.equal(logits(model.use("base"), inputs), alone["base"])


@pytest.mark.parametrize("config", [deltatune.DoRA(r=2), deltatune.IA3()], ids=["dora", "ia3"])
def test_gradients_reach_only_the_tasks_of_a_mixed_batch(config):
    model = deltatune.attach(make_model("bert"), config, task="a")
    deltatune.attach(model, config, task="b")
    deltatune.attach(model, config, task="c")
    model.train()
    for task in model.tasks:
        randomise(model.task_parameters(task).values())  # LoRA's B = 0 would leave A without a gradient
        for tensor in model.task_parameters(task, roles=("method",)).values():
            tensor.requires_grad_(True)
    model(**make_inputs("bert"), tasks=["a", "base", "c"]).logits.sum().backward()
    for task in model.tasks:
        grads = [t.grad for t in model.task_parameters(task, roles=("method",)).values()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads) == (task != "b"), task
        assert all(g is None or not g.any() for g in grads) == (task == "b"), task


# ---- PEFT interop ------------------------------------------------------------------------------------
DORA_CASES = [("bert", deltatune.DoRA(r=4, alpha=8)), ("llama", deltatune.DoRA(r=2, alpha=8, use_rslora=True)),
              ("gpt2", deltatune.DoRA(r=2, alpha=4)),  # GPT-2: q, v slices of c_attn -> a rank-4 block LoRA
              ("bert", deltatune.DoRA(r=2, init="pissa"))]  # saved as the rank-4 DoRA of the unmodified base
IA3_CASES = [("bert", deltatune.IA3()), ("llama", deltatune.IA3()), ("gpt2", deltatune.IA3()),
             ("t5", deltatune.IA3())]


@pytest.mark.parametrize("arch,config", DORA_CASES + IA3_CASES,
                         ids=[f"dora-{a}-{c.init}" for a, c in DORA_CASES] + [f"ia3-{a}" for a, _ in IA3_CASES])
def test_export_runs_the_same_in_peft_and_comes_back(arch, config, tmp_path):
    model = deltatune.attach(make_model(arch), config, task="t")
    randomise(model.task_parameters("t").values())
    inputs = make_inputs(arch)
    expected = logits(model, inputs)
    export_peft(model, tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved["peft_type"] == ("IA3" if isinstance(config, deltatune.IA3) else "LORA")
    peft_model = PeftModel.from_pretrained(make_model(arch), tmp_path / "peft")
    torch.testing.assert_close(logits(peft_model, inputs), expected, atol=ATOL, rtol=0)
    back = deltatune.load_delta(make_model(arch), tmp_path / "peft")
    assert type(back.task_info["peft"]["config"]) is type(config)
    torch.testing.assert_close(logits(back, inputs), expected, atol=ATOL, rtol=0)


def peft_configs(arch: str) -> dict[str, object]:
    lora_targets = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
    ia3 = {"bert": (["key", "value", "output.dense"], ["output.dense"]),  # peft's: attention.output.dense too
           "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
           "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"])}
    heads = ["pooler"] if arch == "bert" else None  # SEQ_CLS adds the classifier; BERT's pooler feeds it
    return {"dora": LoraConfig(r=2, lora_alpha=6, use_dora=True, target_modules=lora_targets[arch],
                               task_type="SEQ_CLS", modules_to_save=heads),
            "ia3": IA3Config(target_modules=ia3[arch][0], feedforward_modules=ia3[arch][1], task_type="SEQ_CLS",
                             modules_to_save=heads)}


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_an_adapter_trained_in_peft_runs_the_same_in_deltatune(arch, method, tmp_path):
    peft_model = get_peft_model(make_model(arch), peft_configs(arch)[method])
    randomise([p for p in peft_model.parameters() if p.requires_grad], scale=0.3)
    peft_model.save_pretrained(tmp_path / "adapter")
    inputs = make_inputs(arch)
    ours = deltatune.load_delta(make_model(arch), tmp_path / "adapter")
    assert ours.task_info["adapter"]["method"] == method
    torch.testing.assert_close(logits(ours, inputs), logits(peft_model, inputs), atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_export_key_names_and_shapes_are_peft_s(method, tmp_path):
    """Exactly the keys peft's own save_pretrained writes for the same adapter (peft's BERT (IA)³ default
    `output.dense` also rescales the input of the attention's output layer: asked for here too)."""
    config = deltatune.DoRA(r=2, alpha=6) if method == "dora" else deltatune.IA3(feedforward=["output.dense"])
    export_peft(deltatune.attach(make_model("bert"), config, task="t"), tmp_path / "ours")
    get_peft_model(make_model("bert"), peft_configs("bert")[method]).save_pretrained(tmp_path / "theirs")
    ours, theirs = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("ours", "theirs"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_ia3_on_both_sides_of_a_layer_is_not_exported(tmp_path):
    model = deltatune.attach(make_model("bert"), deltatune.IA3(feedforward=["value"]), task="t")
    with pytest.raises(DeltaError, match=r"both the input and the output of .*value"):
        export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
