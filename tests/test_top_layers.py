"""Top-k layer fine-tuning, Lin et al.'s adapters and AdapterDrop: what the method matrix does not show.

Hand-computed sizes, the parameter counts of the LoRA paper's tables, errors for bad settings, and the
point of top-k and AdapterDrop in a mixed batch: the lower blocks run once (counted with hooks), with
the same outputs as running each example alone.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_model
from test_mixed import alone, build, padded_batch

import deltatune
from deltatune.cli import main as cli_main
from deltatune.core.component import DeltaComponent
from deltatune.core.shared_lower import untouched_blocks
from deltatune.errors import DeltaTuneError, MergeError

# tiny GPT-2: hidden 32, inner 64, 2 blocks, 2-label score head without bias
GPT2_BLOCK = (2 * 32) + (32 * 96 + 96) + (32 * 32 + 32) + (2 * 32) + (32 * 64 + 64) + (64 * 32 + 32)  # 8,544
GPT2_LN_F, GPT2_HEAD = 2 * 32, 32 * 2


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def randomise(model, task: str, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.task_parameters(task).values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.05)


def test_top_layers_delta_is_the_top_block_final_norm_and_head(tmp_path):
    model = deltatune.attach(make_model("gpt2"), deltatune.TopLayers(k=1), task="t")
    keys = model.task_parameters("t")
    assert {k.split(".")[0] for k in keys} == {"transformer", "score"}
    assert not any(k.startswith("transformer.h.0.") for k in keys)  # the lower block is not in the delta
    assert "transformer.ln_f.weight" in keys and "transformer.h.1.mlp.c_fc.weight" in keys
    assert sum(t.numel() for t in keys.values()) == GPT2_BLOCK + GPT2_LN_F + GPT2_HEAD == 8_672
    model.save_delta(tmp_path / "d")
    size = (tmp_path / "d" / "delta.safetensors").stat().st_size
    assert 4 * 8_672 <= size <= 4 * 8_672 + 8 * 1024


def test_top_layers_trains_only_its_copies_and_leaves_the_base_alone():
    base = make_model("gpt2")
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = deltatune.attach(base, deltatune.TopLayers(k=1), task="t")
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    inputs = make_inputs("gpt2")
    torch.nn.functional.cross_entropy(model(**inputs).logits, torch.tensor([0, 1, 1])).backward()
    optimizer.step()
    model.eval().use("base")
    for name, param in base.named_parameters():
        if name in before:
            assert torch.equal(param, before[name]), name
    assert torch.equal(logits(model, inputs), logits(make_model("gpt2"), inputs))


def test_top_layers_merge_replaces_weights_and_unmerge_is_exact():
    model = deltatune.attach(make_model("bert"), deltatune.TopLayers(k=1), task="t")
    randomise(model, "t")
    inputs = make_inputs("bert")
    block = model.base_model.bert.encoder.layer[1].attention.self.query.weight
    original, unmerged = block.detach().clone(), logits(model, inputs)
    model.merge()
    assert torch.equal(block, model.task_parameters("t")["bert.encoder.layer.1.attention.self.query.weight"])
    assert torch.equal(logits(model, inputs), unmerged)
    model.use("base")  # switching unmerges
    assert torch.equal(block, original)
    plain = deltatune.attach(make_model("bert"), deltatune.TopLayers(k=1), task="t")
    randomise(plain, "t")
    plain = plain.merge_and_unload()
    assert not any(isinstance(m, DeltaComponent) for m in plain.modules())
    assert "forward" not in vars(plain.bert.encoder.layer[1])  # the block's own forward again
    assert torch.equal(logits(plain, inputs), unmerged)


def test_adapters_still_refuse_to_merge():
    model = deltatune.attach(make_model("gpt2"), deltatune.Adapter(placement="lin", skip_layers=1), task="t")
    with pytest.raises(MergeError, match="cannot be merged"):
        model.merge()


def test_lin_adapter_is_one_per_block_with_its_own_layer_norm():
    """Lin et al. 2020: h + W_up f(W_down LN(h)) on each block's output; 2md + m + d + 2d parameters."""
    config = deltatune.Adapter(placement="lin", bottleneck=4, activation="relu", train_norms=False)
    model = deltatune.attach(make_model("gpt2"), config, task="t")
    method = model.task_parameters("t", roles=("method",))
    assert sorted({k.rsplit(".adapter.", 1)[0] for k in method}) == ["transformer.h.0", "transformer.h.1"]
    assert sum(t.numel() for t in method.values()) == 2 * (2 * 4 * 32 + 4 + 32 + 2 * 32)
    randomise(model, "t")
    block = model.base_model.transformer.h[1]
    p = {k.split(".adapter.")[1]: v for k, v in method.items() if ".h.1." in k}
    h = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(0))
    normed = torch.nn.functional.layer_norm(h, (32,), p["adapter_norm.weight"], p["adapter_norm.bias"], eps=1e-5)
    update = torch.relu(normed @ p["adapter_down.weight"].T + p["adapter_down.bias"]) @ p["adapter_up.weight"].T
    with torch.no_grad():
        torch.testing.assert_close(block.adapter._add_adapter(block, (), h), h + update + p["adapter_up.bias"])
        model.use("base")
        assert torch.equal(block.adapter._add_adapter(block, (), h), h)


def test_adapterdrop_leaves_the_lowest_blocks_and_the_embeddings_untrained():
    model = deltatune.attach(make_model("bert"), deltatune.Adapter(skip_layers=1), task="t")
    keys = list(model.task_parameters("t"))
    assert keys and not any(".layer.0." in k or "embeddings" in k for k in keys)
    assert any(".layer.1.attention.output.adapter." in k for k in keys)
    assert untouched_blocks(model, "t") == 1
    houlsby = deltatune.attach(model, deltatune.Adapter(), task="h")
    assert untouched_blocks(houlsby, "h") == 0  # the embeddings' LayerNorm trains


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_one_input_for_several_tasks_runs_the_lower_blocks_once(arch):
    """Each input repeated for 4 tasks: block 0 sees one row per input, and every row equals its example
    run alone with its task."""
    model = build(arch, {"top": deltatune.TopLayers(k=1), "drop": deltatune.Adapter(bottleneck=4, skip_layers=1),
                         "lin": deltatune.Adapter(bottleneck=3, placement="lin", skip_layers=1)})
    batch, lengths = padded_batch(3)
    repeated = {k: v.repeat_interleave(4, 0) for k, v in batch.items()}
    tasks = ["top", "drop", "lin", "base"] * 3
    rows = _rows_through_blocks(model, repeated, tasks)
    assert rows == [3, 12]  # block 0: each input once; block 1: each (input, task)
    with torch.no_grad():
        mixed = model(**repeated, tasks=tasks).logits
    expected = alone(model, repeated, [n for n in lengths for _ in range(4)], tasks)
    for i, row in enumerate(expected):
        torch.testing.assert_close(mixed[i], row, atol=1e-5, rtol=0, msg=f"row {i} ({tasks[i]})")


def test_a_task_that_changes_the_lower_blocks_turns_sharing_off():
    model = build("gpt2", {"top": deltatune.TopLayers(k=1), "lora": deltatune.LoRA(r=2)})
    batch, _ = padded_batch(2)
    repeated = {k: v.repeat_interleave(2, 0) for k, v in batch.items()}
    assert _rows_through_blocks(model, repeated, ["top", "top", "base", "base"]) == [2, 4]
    assert _rows_through_blocks(model, repeated, ["top", "lora", "top", "lora"]) == [4, 4]


def test_top_blocks_split_by_task_in_a_mixed_batch():
    """Different inputs: the lower block runs once on the whole batch; the top block once per group."""
    model = build("gpt2", {"a": deltatune.TopLayers(k=1), "b": deltatune.TopLayers(k=1)})
    calls: list[int] = []
    block = model.base_model.transformer.h
    hooks = [block[0].register_forward_hook(lambda m, a, out: calls.append(("low", out.shape[0]))),
             block[1].attn.register_forward_hook(lambda m, a, out: calls.append(("top", out[0].shape[0])))]
    batch, _ = padded_batch(5)
    with torch.no_grad():
        model(**batch, tasks=["a", "b", "base", "a", "b"])
    for hook in hooks:
        hook.remove()
    assert calls == [("low", 5), ("top", 2), ("top", 2), ("top", 1)]


def _rows_through_blocks(model, batch, tasks) -> list[int]:
    stack = model.base_model.transformer.h if hasattr(model.base_model, "transformer") else (
        model.base_model.bert.encoder.layer if hasattr(model.base_model, "bert") else model.base_model.model.layers)
    rows: list[int] = []
    hooks = [block.register_forward_hook(lambda m, a, out: rows.append((out[0] if isinstance(out, tuple) else out)
                                                                        .shape[0])) for block in stack]
    with torch.no_grad():
        model(**batch, tasks=tasks)
    for hook in hooks:
        hook.remove()
    return rows


@pytest.mark.parametrize("config,message", [
    (lambda: deltatune.TopLayers(k=0), "k must be a whole number >= 1"),
    (lambda: deltatune.Adapter(placement="middle"), "unknown adapter placement 'middle'"),
    (lambda: deltatune.Adapter(skip_layers=-1), "skip_layers must be a whole number >= 0"),
    (lambda: deltatune.Adapter(bottleneck=0), "bottleneck must be a whole number >= 1"),
])
def test_bad_settings_are_refused_when_built(config, message):
    with pytest.raises(DeltaTuneError, match=message):
        config()


def test_settings_too_large_for_the_model_are_refused_and_leave_it_as_it_was():
    model = deltatune.attach(make_model("gpt2"), deltatune.LoRA(r=2), task="lora")
    inputs = make_inputs("gpt2")
    expected = logits(model, inputs)
    with pytest.raises(DeltaTuneError, match=r"k=3 is more than the model's 2 blocks.*between 1 and 2"):
        deltatune.attach(model, deltatune.TopLayers(k=3), task="top")
    with pytest.raises(DeltaTuneError, match=r"skip_layers=2 leaves no adapter.*between 0 and 1"):
        deltatune.attach(model, deltatune.Adapter(skip_layers=2), task="drop")
    assert model.tasks == ["lora"] and model.active_task == "lora"
    assert torch.equal(logits(model, inputs), expected)


def test_cli_option_errors_name_the_setting(capsys):
    for method, option, message in [("top_layers", "k=0", "k must be a whole number >= 1"),
                                    ("adapter", "placement=middle", "unknown adapter placement 'middle'")]:
        assert cli_main(["train", "--model", "minilm", "--task", "sst2", "--method", method, "-o", option,
                         "--out", "unused"]) == 2
        assert "-o: " in (err := capsys.readouterr().err) and message in err


def test_params_tables_reproduce_the_lora_papers_rows(capsys):
    """Hu et al. 2021, Tables 2 and 3: FT^Top2 25.19M, Adapter^L 0.37M and 11.09M (GPT-2 medium),
    Adpt^D 0.3M and 0.9M (RoBERTa-base); the counts by hand from the architectures."""
    block = 2 * 1024 + (1024 * 3072 + 3072) + (1024 * 1024 + 1024) + 2 * 1024 + (1024 * 4096 + 4096) \
        + (4096 * 1024 + 1024)
    lin = [24 * (2 * 1024 * m + m + 1024 + 2 * 1024) for m in (6, 224)]
    drop = [12 * (2 * 768 * m + m + 768) for m in (16, 48)]
    assert cli_main(["params", "--arch", "gpt2-medium"]) == 0
    gpt2 = capsys.readouterr().out
    assert f"{2 * block + 2 * 1024:,}" in gpt2 and round((2 * block + 2048) / 1e6, 2) == 25.19
    for count, published in zip(lin, (0.37, 11.09), strict=True):
        assert f"{count:,}" in gpt2 and round(count / 1e6, 2) == published
    assert cli_main(["params", "--arch", "roberta-base"]) == 0
    roberta = capsys.readouterr().out
    for count, published in zip(drop, (0.3, 0.9), strict=True):
        assert f"{count:,}" in roberta and round(count / 1e6, 1) == published
    assert "Adpt^D" not in gpt2 and "FT^Top2" not in roberta


@pytest.mark.slow
def test_train_compare_and_serve_accept_the_new_methods(tiny_model_dir, sentiment_csv, tmp_path, capsys):
    """`deltatune train` runs top_layers and the adapter variants, `compare` top_layers (each cell is a
    subprocess: one cell); `serve` answers them in one mixed batch, each input as the library gives it alone."""
    import json

    from deltatune.models import load_model, load_tokenizer
    from deltatune.serving.app import ServeConfig, build_engine

    data = ["--task", "csv", "--data-file", str(sentiment_csv), "--text-columns", "review",
            "--label-column", "sentiment"]
    runs = {"top": ("top_layers", ["-o", "k=1"]), "lin": ("adapter", ["-o", "placement=lin", "-o", "skip_layers=1"])}
    for name, (method, options) in runs.items():
        assert cli_main(["train", "--model", str(tiny_model_dir), *data, "--method", method, *options,
                         "--out", str(tmp_path / name), "--max-steps", "3", "--batch-size", "8", "--no-progress"]) == 0
        assert json.loads((tmp_path / name / "delta" / "delta.json").read_text())["method"] == method
    assert cli_main(["compare", "--model", str(tiny_model_dir), *data, "--methods", "top_layers",
                     "-o", "top_layers:k=1", "--seeds", "1", "--budget", "steps=2",
                     "--batch-size", "8", "--no-latency", "--out", str(tmp_path / "cmp")]) == 0
    rows = json.loads((tmp_path / "cmp" / "results.json").read_text())["rows"]
    assert [(row["label"], row["error"]) for row in rows] == [("top_layers", None)]
    capsys.readouterr()

    deltas = {name: tmp_path / name / "delta" for name in runs}
    engine = build_engine(str(tiny_model_dir), {n: str(p) for n, p in deltas.items()}, ServeConfig()).start()
    texts = ["the movie was great .", "a bleak and weak plot"]
    try:
        futures = [engine.submit(task, texts) for task in ("top", "lin", "base")]
        answers = [future.result(timeout=60) for future in futures]
        labels = json.loads((deltas["top"] / "delta.json").read_text())["label_names"]
    finally:
        engine.close()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    for task, answer in zip(("top", "lin"), answers, strict=False):
        alone = deltatune.load_delta(load_model(str(tiny_model_dir)), deltas[task])
        with torch.no_grad():
            expected = [alone(**tokenizer(text, return_tensors="pt")).logits[0].softmax(-1) for text in texts]
        got = torch.tensor([[p["probabilities"][k] for k in labels] for p in answer])
        torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=0)


def test_fsdp_is_refused_for_top_layers():
    """Its component keeps the base parameters that sharding would replace (as full fine-tuning's does)."""
    from deltatune.errors import TrainingError
    from deltatune.training.distributed import shard_model

    model = deltatune.attach(make_model("bert"), deltatune.TopLayers(k=1), task="t")
    with pytest.raises(TrainingError, match="--fsdp does not work with --method top_layers"):
        shard_model(model, "cpu")


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_gradient_checkpointing_gives_the_same_gradients_alone_and_mixed(arch):
    """transformers checkpoints a block's class forward; top_layers swaps the task's weights around it, so it
    checkpoints the swap too, or the recomputation would run the base weights (torch's CheckpointError)."""
    batch, _ = padded_batch(4)
    grads = []
    for checkpointing in (False, True):
        model = build(arch, {"a": deltatune.TopLayers(k=1), "b": deltatune.TopLayers(k=2)})
        if checkpointing:
            model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        for module in model.modules():  # no dropout: the two runs must draw nothing
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model.use("a")
        for task in ("a", "b"):
            for tensor in model.task_parameters(task).values():
                tensor.requires_grad_(True)
        model(**batch).logits.sum().backward()
        model(**batch, tasks=["a", "b", "base", "b"]).logits.sum().backward()
        grads.append({f"{task}:{key}": tensor.grad.clone() for task in ("a", "b")
                      for key, tensor in model.task_parameters(task).items()})
    assert grads[0].keys() == grads[1].keys()
    for key, grad in grads[0].items():
        torch.testing.assert_close(grads[1][key], grad, atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "t5"])
def test_prefix_tuning_rows_keep_their_prefixes_in_split_top_blocks(arch):
    """Prefix tuning hands its prefixes over in the key/value cache: a top block split by task gives each
    group its own rows of that cache (dropping it left the attention mask 3 keys longer than the keys)."""
    model = build(arch, {"pre": deltatune.PrefixTuning(length=3), "top": deltatune.TopLayers(k=1),
                         "lora": deltatune.LoRA(r=2)})
    batch, lengths = padded_batch(5)
    tasks = ["pre", "top", "base", "lora", "pre"]
    with torch.no_grad():
        mixed = model(**batch, tasks=tasks).logits
    for i, row in enumerate(alone(model, batch, lengths, tasks)):
        torch.testing.assert_close(mixed[i], row, atol=1e-5, rtol=0, msg=f"row {i} ({tasks[i]})")
