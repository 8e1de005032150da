"""Prefix tuning (Li & Liang 2021): what the delta holds, how the prefix reaches attention on each
architecture, mixed batches, generation, and the errors.

References come from independent paths: a hand count of the prefix's numbers, a hand-written attention
over [prefix ; input] for BERT, the same example run alone, a greedy loop that recomputes everything
without a cache, and (tests/test_peft_format.py) the real peft.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_inputs, make_model
from test_mixed import alone, padded_batch

import deltatune
from deltatune.core.architectures import ROBERTA_LIKE
from deltatune.errors import MergeError, PrefixError
from deltatune.testing import TINY_MAX_POSITIONS, TINY_ZOO, tiny_model, tiny_model_of_type

ARCHS = ["bert", "roberta", "gpt2", "llama", "t5"]
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def randomise(model: deltatune.DeltaModel, task: str, seed: int) -> None:
    """Trained-looking prefixes: the MLP's parameters (what trains) moved, then the output folded."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.trained_parameters(task).values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.1)


def build(arch: str, configs: dict, kind: str = "classification") -> deltatune.DeltaModel:
    torch.manual_seed(0)
    model = tiny_model(arch, kind)
    for index, (task, config) in enumerate(configs.items()):
        model = deltatune.attach(model, config, task=task)
        randomise(model, task, seed=index)
    return model


# ---- what trains, what is saved ------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_delta_file_holds_only_the_folded_prefixes(arch, tmp_path):
    model = build(arch, {"t": deltatune.PrefixTuning(length=5, hidden=64)})
    config = model.config
    if arch == "t5":  # encoder and decoder self-attention: layers x heads x d_kv
        layers, kv_width = config.num_layers + config.num_decoder_layers, config.num_heads * config.d_kv
    elif arch == "llama":  # grouped-query attention: 2 key/value heads of 8
        layers, kv_width = config.num_hidden_layers, 2 * 8
    else:
        layers, kv_width = config.num_hidden_layers, config.hidden_size
    prefix_numbers = 5 * 2 * kv_width * layers  # length x (K, V) x d_kv x layers (Li & Liang's count)
    head_numbers = sum(t.numel() for t in model.task_parameters("t", roles=("head",)).values())
    model.save_delta(tmp_path / "d")
    saved = deltatune.formats.native.read_delta(tmp_path / "d")[0]
    assert sorted(saved) == sorted(["prefix_key_values", *model.head_keys("t")])
    assert saved["prefix_key_values"].numel() == prefix_numbers
    size = (tmp_path / "d" / "delta.safetensors").stat().st_size
    assert 4 * (prefix_numbers + head_numbers) <= size <= 4 * (prefix_numbers + head_numbers) + 4096
    # what trained is the MLP (section 4.3), many more numbers than the delta keeps
    trained = sum(p.numel() for p in model.trained_parameters("t").values())
    assert trained > prefix_numbers + head_numbers


@pytest.mark.parametrize("arch", ARCHS)
def test_a_step_trains_the_mlp_and_changes_only_the_delta(arch):
    model = build(arch, {"t": deltatune.PrefixTuning(length=3, hidden=16)})
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    folded_before = model.task_parameters("t")["prefix_key_values"].detach().clone()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for n, p in model.named_parameters() if n in trainable} == \
        {id(p) for p in model.trained_parameters("t").values()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = make_inputs(arch)
    torch.nn.functional.cross_entropy(model(**inputs).logits, torch.tensor([0, 1, 1])).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable | {"base_model.deltatune_prefix.prefix_key_values.t"}
    assert any("prefix_mlp" in n or "reparameterization" in n for n in changed)
    assert not torch.equal(model.task_parameters("t")["prefix_key_values"], folded_before)  # folds the new MLP


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_onto_fresh_base_gives_identical_logits(arch, tmp_path):
    model = build(arch, {"t": deltatune.PrefixTuning(length=4, hidden=32)})
    inputs = make_inputs(arch)
    expected = logits(model, inputs)
    model.save_delta(tmp_path / "d")
    reloaded = deltatune.load_delta(make_model(arch), tmp_path / "d")
    assert not reloaded.base_model.deltatune_prefix.reparameterization  # a loaded delta has no MLP
    assert list(reloaded.trained_parameters("t")) == list(reloaded.task_parameters("t"))
    torch.testing.assert_close(logits(reloaded, inputs), expected, atol=1e-6, rtol=0)


def test_without_reparameterization_the_prefixes_train_directly():
    model = build("gpt2", {"t": deltatune.PrefixTuning(length=3, reparameterize=False)})
    assert set(model.trained_parameters("t")) == set(model.task_parameters("t"))
    assert not model.base_model.deltatune_prefix.reparameterization


# ---- how the prefix reaches attention ---------------------------------------------------------------------
def test_bert_prefix_is_attended_as_keys_and_values_before_the_input():
    """Layer 0 of BERT by hand: softmax(q [P_k; K]^T / sqrt(d)) [P_v; V], input positions counted from P."""
    model = build("bert", {"t": deltatune.PrefixTuning(length=3, hidden=16)})
    bert = model.base_model.bert
    prefix = model.task_parameters("t")["prefix_key_values"]  # (layers, 2, heads, P, head_dim)
    ids = make_inputs("bert", batch=1)["input_ids"]
    captured = {}
    hook = bert.encoder.layer[0].attention.self.register_forward_hook(lambda m, a, o: captured.update(out=o[0]))
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    with torch.no_grad():
        positions = torch.arange(3, 3 + ids.shape[1])[None]
        hidden = bert.embeddings(input_ids=ids, position_ids=positions)
        attention = bert.encoder.layer[0].attention.self
        heads = lambda x: x.view(1, -1, 2, 16).transpose(1, 2)  # noqa: E731  (1, n, d) -> (1, heads, n, 16)
        q, k, v = heads(attention.query(hidden)), heads(attention.key(hidden)), heads(attention.value(hidden))
        k = torch.cat([prefix[0, 0][None], k], dim=2)  # (1, heads, P + n, 16)
        v = torch.cat([prefix[0, 1][None], v], dim=2)
        weights = (q @ k.transpose(-1, -2) / 4).softmax(-1)
        expected = (weights @ v).transpose(1, 2).reshape(1, -1, 32)
    torch.testing.assert_close(captured["out"], expected, atol=1e-5, rtol=0)


def test_t5_encoder_and_decoder_both_read_their_prefixes():
    model = build("t5", {"t": deltatune.PrefixTuning(length=3, reparameterize=False)})
    inputs = make_inputs("t5")
    expected = logits(model, inputs)
    prefix = model.task_parameters("t")["prefix_key_values"]
    layers = model.config.num_layers
    for part in (slice(0, layers), slice(layers, None)):  # the encoder's, then the decoder's
        saved = prefix[part].clone()
        with torch.no_grad():
            prefix[part].mul_(3)
        assert not torch.allclose(logits(model, inputs), expected, atol=1e-4), part
        with torch.no_grad():
            prefix[part].copy_(saved)
    torch.testing.assert_close(logits(model, inputs), expected, atol=0, rtol=0)


def test_a_deepcopy_of_a_t5_model_runs_its_own_encoder_prefixes():
    import copy

    model = build("t5", {"t": deltatune.PrefixTuning(length=3, reparameterize=False)})
    clone = copy.deepcopy(model)
    inputs = make_inputs("t5")
    expected = logits(model, inputs)
    assert torch.equal(logits(clone, inputs), expected)  # its encoder got its prefixes (hooks call the copy)
    with torch.no_grad():
        clone.task_parameters("t")["prefix_key_values"][0].mul_(3)  # the clone's first encoder layer only
    assert not torch.allclose(logits(clone, inputs), expected, atol=1e-4)
    assert torch.equal(logits(model, inputs), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_in_the_batch_changes_nothing(arch):
    model = build(arch, {"t": deltatune.PrefixTuning(length=4, hidden=16)})
    batch, lengths = padded_batch(4)
    with torch.no_grad():
        together = model(**batch).logits
    for i, expected in enumerate(alone(model, batch, lengths, ["t"] * 4)):
        torch.testing.assert_close(together[i], expected, atol=1e-5, rtol=0)


# ---- several tasks -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_switching_between_prefix_tasks_is_exact(arch):
    model = build(arch, {"a": deltatune.PrefixTuning(length=2, hidden=16),
                         "b": deltatune.PrefixTuning(length=5, hidden=16), "lora": deltatune.LoRA(r=2)})
    inputs = make_inputs(arch)
    outputs = {task: logits(model.use(task), inputs) for task in ["a", "b", "lora", "base"]}
    for task in ["b", "base", "a", "lora", "a", "b"]:
        assert torch.equal(logits(model.use(task), inputs), outputs[task]), task
    assert len({tuple(o.flatten().tolist()) for o in outputs.values()}) == 4


def mixed_matches_alone(model, tasks: list[str]) -> None:
    batch, lengths = padded_batch(len(tasks))
    with torch.no_grad():
        mixed = model(**batch, tasks=tasks).logits
    for i, expected in enumerate(alone(model, batch, lengths, tasks)):
        torch.testing.assert_close(mixed[i], expected, atol=1e-5, rtol=0, msg=f"example {i} ({tasks[i]})")


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_equals_each_example_alone(arch):
    """Prefixes of different lengths, base rows, and LoRA, adapter and (not on T5) prompt-tuning rows."""
    configs = {"short": deltatune.PrefixTuning(length=2, hidden=16), "long": deltatune.PrefixTuning(length=6),
               "lora": deltatune.LoRA(r=2), "adapter": deltatune.Adapter(bottleneck=4)}
    if arch != "t5":
        configs["prompt"] = deltatune.PromptTuning(length=3)
    model = build(arch, configs)
    tasks = ["long", "short", "base", "lora", "short", "adapter", "long", "base"]
    mixed_matches_alone(model, tasks + (["prompt", "long"] if arch != "t5" else []))
    mixed_matches_alone(model, ["short", "long", "short"])  # prefix tasks only


def test_t5_refuses_prompt_and_prefix_rows_in_one_batch():
    model = build("t5", {"p": deltatune.PromptTuning(length=2), "f": deltatune.PrefixTuning(length=2, hidden=8)})
    batch, _ = padded_batch(2)
    with pytest.raises(PrefixError, match="cannot share a mixed batch"):
        model(**batch, tasks=["p", "f"])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_mixed_causal_lm_logits_equal_each_example_alone(arch):
    model = build(arch, {"a": deltatune.PrefixTuning(length=2, hidden=16), "b": deltatune.PrefixTuning(length=5)},
                  kind="causal-lm")
    tasks = ["b", "a", "base", "a"]
    batch, lengths = padded_batch(len(tasks))
    with torch.no_grad():
        mixed = model(**batch, tasks=tasks).logits
    for i, expected in enumerate(alone(model, batch, lengths, tasks)):
        torch.testing.assert_close(mixed[i, : lengths[i]], expected, atol=1e-5, rtol=0)


def test_gradients_reach_each_prefix_task_in_a_mixed_batch():
    model = build("gpt2", {"a": deltatune.PrefixTuning(length=2, hidden=8), "b": deltatune.PrefixTuning(length=3),
                           "c": deltatune.PrefixTuning(length=3, hidden=8)})
    model.train()
    for task in model.tasks:
        for tensor in model.trained_parameters(task).values():
            tensor.requires_grad_(True)
    batch, _ = padded_batch(3)
    model(**batch, tasks=["a", "base", "c"]).logits.sum().backward()
    for task in model.tasks:
        grads = [p.grad for p in model.trained_parameters(task).values() if p.dim() > 1]
        assert any(g is not None and g.abs().sum() > 0 for g in grads) == (task in {"a", "c"}), task


# ---- generation ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_equals_greedy_recomputation_without_a_cache(arch):
    model = build(arch, {"t": deltatune.PrefixTuning(length=4, hidden=16)}, kind="causal-lm")
    ids = make_inputs(arch, batch=2, length=5)["input_ids"]
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                   do_sample=False, pad_token_id=0)
        sequence = ids
        for _ in range(6):  # each step: the whole sequence again, the prefix in front, no cache kept
            next_token = model(input_ids=sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)
    with torch.no_grad():  # and the prefix mattered
        plain = model.use("base").generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert not torch.equal(plain, generated)


def test_t5_generate_uses_both_prefixes():
    model = build("t5", {"t": deltatune.PrefixTuning(length=3, hidden=16)}, kind="seq2seq")
    ids = make_inputs("t5", batch=2, length=6)["input_ids"]
    with torch.no_grad():
        generated = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
        decoder = torch.zeros(2, 1, dtype=torch.long)  # T5 starts from the pad token
        for _ in range(generated.shape[1] - 1):
            step = model(input_ids=ids, decoder_input_ids=decoder, use_cache=False).logits[:, -1]
            decoder = torch.cat([decoder, step.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, decoder)


# ---- errors -----------------------------------------------------------------------------------------------
def test_errors_name_the_problem():
    with pytest.raises(PrefixError, match="prefix length must be >= 1, got 0"):
        deltatune.PrefixTuning(length=0)
    with pytest.raises(PrefixError, match="got -3"):
        deltatune.PrefixTuning(length=-3)
    model = build("gpt2", {"t": deltatune.PrefixTuning(length=8, hidden=8)})
    with pytest.raises(MergeError, match="uses prefix, which cannot be merged"):
        model.merge()
    ids = torch.randint(4, 500, (1, TINY_MAX_POSITIONS - 7))
    with pytest.raises(PrefixError, match=f"model has {TINY_MAX_POSITIONS} positions and the prefix takes 8"):
        model(input_ids=ids)
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    other = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2,
                                                                 hidden_dim=16))
    with pytest.raises(PrefixError, match="does not support DistilBertForSequenceClassification"):
        deltatune.attach(other, deltatune.PrefixTuning())


def test_calls_that_would_lose_the_prefix_are_refused():
    model = build("gpt2", {"t": deltatune.PrefixTuning(length=2, hidden=8)})
    inputs = make_inputs("gpt2")
    from transformers import DynamicCache

    with pytest.raises(PrefixError, match="do not pass cache/past_key_values"):
        model(**inputs, past_key_values=DynamicCache())
    model.base_model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(PrefixError, match="gradient checkpointing"):
        model(**inputs)


def test_training_with_gradient_checkpointing_is_refused_by_name(tiny_model_dir, sentiment_csv, tmp_path):
    from deltatune.training.loop import TrainConfig, train

    with pytest.raises(PrefixError, match="train without --grad-checkpointing"):
        train(TrainConfig(model=str(tiny_model_dir), task="csv", method="prefix", out=str(tmp_path / "run"),
                          task_options={"path": str(sentiment_csv), "text_columns": ["review"],
                                        "label_column": "sentiment"},
                          max_steps=1, batch_size=8, progress=False, grad_checkpointing=True))


def test_no_deprecation_noise():
    model = build("gpt2", {"t": deltatune.PrefixTuning(length=2, hidden=8)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logits(model, make_inputs("gpt2"))


# ---- counts -------------------------------------------------------------------------------------------------
def test_params_shows_both_counts_the_literature_uses(capsys):
    from deltatune.cli import main as cli_main

    assert cli_main(["params", "--arch", "gpt2-medium"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Prefix tuning"))
    assert f"{10 * 2 * 1024 * 24:,}" in row  # Li & Liang: length x (K, V) x d x layers = 491,520
    assert f"{10 * 1024 * 24:,}" in row  # Hu et al.'s PreLayer count: length x d_model x layers
    mlp = 10 * 1024 + (1024 * 512 + 512) + (512 * 24 * 2 * 1024 + 24 * 2 * 1024)  # E, W_1, b_1, W_2, b_2
    assert f"trained through {mlp:,} parameters" in row


def test_llama_prefix_counts_key_value_heads_only():
    """Grouped-query attention: the prefix has the keys of the kv heads, not of every query head."""
    model = build("llama", {"t": deltatune.PrefixTuning(length=3, hidden=8)})
    assert model.report(print_table=False).method_parameters == 3 * 2 * (2 * 8) * 2  # P x (K, V) x 2 heads x 8 x 2


# ---- serving ------------------------------------------------------------------------------------------------
def test_serve_runs_prefix_and_lora_requests_as_one_mixed_batch(tiny_model_dir, tmp_path):
    import asyncio

    import httpx
    from test_serve import TEXTS, held, wait_for_queue

    from deltatune.models import load_model, load_tokenizer
    from deltatune.serving.app import ServeConfig, build_engine
    from deltatune.testing import BackgroundServer

    paths = {}
    for index, (task, config) in enumerate({"pfx": deltatune.PrefixTuning(length=4, hidden=16),
                                            "lora": deltatune.LoRA(r=4)}.items()):
        model = deltatune.attach(load_model(str(tiny_model_dir)), config, task=task)
        randomise(model, task, seed=index)
        paths[task] = model.save_delta(tmp_path / task)

    async def scenario(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            with held(engine):
                requests = [asyncio.create_task(client.post("/v1/predict", json={"task": task, "inputs": TEXTS}))
                            for task in ("pfx", "lora", "base")]
                await asyncio.to_thread(wait_for_queue, engine, 3)
            return [await r for r in requests], (await client.get("/stats")).json()

    engine = build_engine(str(tiny_model_dir), paths, ServeConfig(max_wait_ms=50))
    with BackgroundServer(engine) as url:
        responses, metrics = asyncio.run(scenario(url))
    assert metrics["mixed_batches"] == 1 and metrics["max_tasks_in_batch"] == 3
    tokenizer = load_tokenizer(str(tiny_model_dir))
    alone_model = deltatune.load_delta(load_model(str(tiny_model_dir)), paths["pfx"])
    with torch.no_grad():
        expected = torch.stack([alone_model(**tokenizer(t, return_tensors="pt")).logits[0].softmax(-1) for t in TEXTS])
    got = torch.tensor([[p["probabilities"][k] for k in ("0", "1")] for p in responses[0].json()["predictions"]])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ---- encoders that number positions from padding_idx + 1 (RoBERTa's scheme) ----------------------------------
def positions_from_padding(model: torch.nn.Module) -> bool:
    """What the model's own embeddings say: a position embedding with a padding_idx (RoBERTa's
    `create_position_ids_from_input_ids` numbers tokens from padding_idx + 1)."""
    return any(name.endswith("position_embeddings") and getattr(module, "padding_idx", None) is not None
               for name, module in model.named_modules())


@pytest.mark.parametrize("kind", list(TINY_ZOO))
def test_the_roberta_like_table_is_every_zoo_type_numbering_from_padding(kind):
    torch.manual_seed(0)
    assert (kind in ROBERTA_LIKE) == positions_from_padding(tiny_model_of_type(kind))


@pytest.mark.parametrize("kind", ["roberta", "xlm-roberta", "camembert", "data2vec-text"])  # MPNet takes no cache
def test_mixed_prefix_batches_number_positions_as_roberta_does(kind):
    """data2vec-text was numbered 0, 1, ... in a mixed batch (ROBERTA_LIKE lacked it) and differed from its rows
    alone: each example with a prefix task, another one, or none, padded, must equal itself run alone."""
    torch.manual_seed(0)
    model = deltatune.attach(tiny_model_of_type(kind), deltatune.PrefixTuning(length=3, hidden=8), task="a")
    deltatune.attach(model, deltatune.PrefixTuning(length=5, hidden=8), task="b")
    with torch.no_grad():
        for i, tensor in enumerate(model.task_parameters("a").values()):
            tensor.add_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
    mixed_matches_alone(model, ["a", "b", "base", "a"])
