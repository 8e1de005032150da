"""The decode step's fused C kernels (`deltatune.serving.cpu_kernels`): each against the PyTorch operators it replaces
(what is rounded exactly as they round is compared exactly, the rest to a few ulp or against a float64 reference);
the written step with them against the model's forward, rows under every kind of delta and prompts joining; the decode
loop with them generating every mixable method's tokens as `generate` does alone; the library built once, and None
(with the reason) where it cannot be. Skipped where the kernels cannot run (no AVX-512 or no C compiler)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_serve_decode_step import CONFIGS, GENERATE_MIXABLE, REQUESTS, alone, prompts, served_tokens

import deltatune
from deltatune.methods.registry import METHODS
from deltatune.serving import cpu_kernels
from deltatune.serving.llama_step import LlamaDecodeStep
from deltatune.serving.slot_cache import SlotCache
from deltatune.testing import TINY_MAX_POSITIONS, TINY_VOCAB, with_random_deltas

KERNELS = cpu_kernels.load()
pytestmark = pytest.mark.skipif(KERNELS is None, reason=cpu_kernels.unavailable_reason() or "")
BF16_ULP = 2.0**-7  # bfloat16's spacing relative to a value (8 significant bits)


def wide_llama() -> torch.nn.Module:
    """A 2-layer Llama whose heads are 64 wide (the fused kernels take 64 and 128), 4 query heads sharing 2 key/value
    heads, random weights (deterministic under `torch.manual_seed`)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         max_position_embeddings=TINY_MAX_POSITIONS, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_adds_exactly_and_normalises_as_llama_rmsnorm(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(576, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576))
    residual, block_output = torch.randn(16, 1, 576, dtype=dtype) * 3, torch.randn(16, 1, 576, dtype=dtype)
    with torch.inference_mode():
        total, normed = KERNELS.add_rms_norm(residual, block_output, norm.weight, norm.variance_epsilon)
        expected = norm(residual + block_output)
        assert torch.equal(total, residual + block_output)  # one rounding of the exact sum, as PyTorch's add
        if dtype == torch.float32:  # the mean of squares summed in another order: a few ulp
            torch.testing.assert_close(normed, expected, rtol=1e-6, atol=1e-6)
        else:  # rounded to bf16 as LlamaRMSNorm rounds: equal but where the fp32 value sits on a rounding boundary
            assert (normed != expected).float().mean() < 0.01
            torch.testing.assert_close(normed, expected, rtol=BF16_ULP, atol=0)
        same, alone_normed = KERNELS.add_rms_norm(residual, None, norm.weight, norm.variance_epsilon)
        assert same is residual
        torch.testing.assert_close(alone_normed, norm(residual), rtol=BF16_ULP if dtype != torch.float32 else 1e-6,
                                   atol=1e-6)
        assert KERNELS.add_rms_norm(residual[..., :40], None, norm.weight[:40], 1e-5) is None  # 40: not 16 wide


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_on_the_columns_of_one_fused_product(dtype):
    torch.manual_seed(0)
    product = torch.randn(12, 1, 2 * 1536, dtype=dtype) * 4  # gate and up: views with rows 3,072 apart
    gate, up = product.split_with_sizes([1536, 1536], -1)
    with torch.inference_mode():
        fused, expected = KERNELS.silu_mul(gate, up), F.silu(gate) * up
    assert fused.shape == expected.shape and fused.is_contiguous()
    if dtype == torch.float32:
        torch.testing.assert_close(fused, expected, rtol=1e-6, atol=1e-7)
    else:
        assert (fused != expected).float().mean() < 0.01
        torch.testing.assert_close(fused, expected, rtol=2 * BF16_ULP, atol=1e-30)


def rope_attend_case(dtype, head_dim: int, groups: int, rows: int = 5, kv_heads: int = 2, width: int = 23):
    """New tokens' query/key/value as views of one fused product, cos and sin of their positions, a cache window
    of `width` columns (the last one new) inside a larger buffer, rows left-padded (an additive fp32 mask)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    torch.manual_seed(0)
    heads = kv_heads * groups
    product = torch.randn(rows, 1, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    query, key, value = (part.view(rows, -1, head_dim) for part in
                         product.split_with_sizes([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1))
    padding = torch.tensor([0, 3, 0, 21, 7][:rows])
    positions = (width - padding)[:, None] - 1
    config = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, head_dim=head_dim)
    cos, sin = LlamaRotaryEmbedding(config)(product, positions)
    buffers = [torch.randn(rows + 2, kv_heads, width + 9, head_dim, dtype=dtype) for _ in range(2)]
    windows = [buffer[:rows, :, 4 : 4 + width] for buffer in buffers]  # columns 4 .. 4 + width - 1
    mask = torch.zeros(rows, width)
    for row, count in enumerate(padding.tolist()):
        mask[row, :count] = float("-inf")
    return query, key, value, cos[:, 0], sin[:, 0], windows, mask


def eager_rope_attend(query, key, value, cos, sin, windows, mask, scale):
    """What `LlamaDecodeStep._attention` computes for one-token rows: apply_rotary_pos_emb, the cache write, SDPA."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    query, key = apply_rotary_pos_emb(query[:, :, None], key[:, :, None], cos[:, None], sin[:, None], unsqueeze_dim=1)
    keys, values = (window.clone() for window in windows)
    keys[:, :, -1], values[:, :, -1] = key[:, :, 0], value
    groups = query.shape[1] // keys.shape[1]
    output = F.scaled_dot_product_attention(query, keys.repeat_interleave(groups, 1),
                                            values.repeat_interleave(groups, 1), attn_mask=mask[:, None, None].to(
                                                query.dtype), scale=scale)
    return output.reshape(query.shape[0], -1), keys, values, (query, keys, values, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("head_dim", "groups"), [(64, 3), (128, 2), (64, 1)])
def test_rope_attend_writes_the_rotated_key_exactly_and_attends_at_least_as_accurately_as_sdpa(dtype, head_dim,
                                                                                                   groups):
    query, key, value, cos, sin, windows, mask = rope_attend_case(dtype, head_dim, groups)
    scale = head_dim**-0.5
    with torch.inference_mode():
        expected, keys, values, inputs = eager_rope_attend(query, key, value, cos, sin, windows, mask, scale)
        before = [window[:, :, :-1].clone() for window in windows]
        fused = KERNELS.rope_attend(query, key, value, cos, sin, *windows, mask, scale)
    assert torch.equal(windows[0], keys) and torch.equal(windows[1], values)  # rotated as PyTorch rounds; the rest kept
    assert all(torch.equal(window[:, :, :-1], old) for window, old in zip(windows, before, strict=True))
    rotated_query, keys, values, mask = (tensor.double() for tensor in inputs)  # the float64 reference
    groups = rotated_query.shape[1] // keys.shape[1]
    reference = F.scaled_dot_product_attention(rotated_query, keys.repeat_interleave(groups, 1),
                                               values.repeat_interleave(groups, 1), attn_mask=mask[:, None, None],
                                               scale=scale).reshape(fused.shape)
    fused_error, sdpa_error = ((out.double() - reference).abs().max() for out in (fused, expected))
    assert fused_error <= max(sdpa_error, 1e-6 if dtype == torch.float32 else BF16_ULP / 2)
    assert KERNELS.rope_attend(query[..., :32], key[..., :32], value[..., :32], cos[:, :32], sin[:, :32],
                               *(window[..., :32] for window in windows), mask, scale) is None  # head size 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("head_dim", "groups"), [(64, 3), (128, 2)])
def test_prefill_attend_writes_a_prompts_rotated_keys_exactly_and_attends_causally(dtype, head_dim, groups):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    torch.manual_seed(0)
    tokens, kv_heads = 11, 2
    heads = kv_heads * groups
    product = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    query, key, value = (part.view(tokens, -1, head_dim) for part in
                         product.split_with_sizes([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1))
    config = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, head_dim=head_dim)
    cos, sin = LlamaRotaryEmbedding(config)(product, torch.arange(tokens)[None])
    buffers = [torch.randn(3, kv_heads, 20, head_dim, dtype=dtype) for _ in range(2)]
    slot = [buffer[1, :, 20 - tokens :] for buffer in buffers]  # right-aligned in slot 1, as a joining prompt's
    kept = [buffer[:, :, : 20 - tokens].clone() for buffer in buffers] + [buffers[0][[0, 2]].clone()]
    scale = head_dim**-0.5
    with torch.inference_mode():
        fused = KERNELS.prefill_attend(query, key, value, cos[0], sin[0], *slot, scale)
        rotated_query, rotated_key = apply_rotary_pos_emb(query.transpose(0, 1)[None], key.transpose(0, 1)[None],
                                                          cos, sin)  # (1, heads, tokens, d)
        expected = F.scaled_dot_product_attention(rotated_query, rotated_key, value.transpose(0, 1)[None],
                                                  is_causal=True, scale=scale, enable_gqa=True)
        reference = F.scaled_dot_product_attention(rotated_query.double(), rotated_key.double(),
                                                   value.transpose(0, 1)[None].double(), is_causal=True, scale=scale,
                                                   enable_gqa=True)
    assert torch.equal(slot[0], rotated_key[0]) and torch.equal(slot[1], value.transpose(0, 1))
    assert torch.equal(buffers[0][:, :, : 20 - tokens], kept[0]) and torch.equal(buffers[0][[0, 2]], kept[2])
    expected, reference = (out[0].transpose(0, 1).reshape(tokens, -1) for out in (expected, reference))
    fused_error, sdpa_error = ((out.double() - reference).abs().max() for out in (fused, expected))
    assert fused_error <= max(sdpa_error, 1e-6 if dtype == torch.float32 else BF16_ULP / 2)


def deltas_model(methods: dict) -> deltatune.DeltaModel:
    torch.manual_seed(0)
    return with_random_deltas(wide_llama(), methods)


@pytest.mark.parametrize("refused", [False, True], ids=["fused", "attention kernels refusing"])
def test_fused_step_gives_the_forwards_logits_per_row_delta_and_for_prompts_joining(refused, monkeypatch):
    """Rows (left-padded) under LoRA, DoRA, (IA)³, BitFit, a Houlsby adapter and the base, two prompts joining: the
    fused step's logits and the joining prompts' keys and values are the forward's to fp32 rounding, and the rows' new
    keys and values the step's without the kernels. Where the attention kernels refuse their tensors (a delta's
    projection of another dtype or layout would be), the step attends with PyTorch's operators, writing the same cache
    columns."""
    if refused:
        monkeypatch.setattr(KERNELS, "rope_attend", lambda *args: None)
        monkeypatch.setattr(KERNELS, "prefill_attend", lambda *args: None)
    methods = {"lora": deltatune.LoRA(r=4), "dora": deltatune.DoRA(r=4), "ia3": deltatune.IA3(),
               "bitfit": deltatune.BitFit(add_missing=True), "adapter": deltatune.Adapter(bottleneck=4)}
    tasks, padding = ["lora", "dora", None, "ia3", "bitfit", "adapter"], [3, 0, 5, 0, 1, 0]
    model = deltas_model(methods)
    base, rows = model.base_model, len(tasks)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 500, (rows, 9), generator=generator)
    mask = torch.ones(rows, 9, dtype=torch.long)
    for row, count in enumerate(padding):
        mask[row, :count] = 0
    prompt_ids = [torch.randint(4, 500, (length,), generator=generator) for length in (12, 4)]
    prompt_tasks = ["lora", "dora"]
    logits, caches = {}, {}
    with torch.inference_mode():
        for name, kernels in (("forward", None), ("eager", None), ("fused", KERNELS)):
            with model._rows_routed(tasks):
                prefill = base(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                               use_cache=True).cache
            cache = SlotCache.like(prefill, rows + 2, capacity=16)
            cache.append(prefill)
            step_mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
            cache.reserve(left=12 - (cache.width + 1), right=1)
            if name == "forward":  # the rows' step alone, then each prompt alone
                with model._rows_routed(tasks):
                    logits[name] = base(input_ids=ids[:, -1:], attention_mask=step_mask,
                                        position_ids=mask.sum(1, keepdim=True), cache=cache, use_cache=True).logits
                continue
            step = LlamaDecodeStep.for_model(base, model.task_state, kernels)
            with model._rows_routed(tasks + [task for task, p in zip(prompt_tasks, prompt_ids) for _ in p]):
                logits[name] = step(ids[:, -1:], step_mask, mask.sum(1, keepdim=True), cache, prompt_ids)
            assert step.fused == (kernels is not None)
            cache.joined(len(prompt_ids), 12)
            caches[name] = cache
        torch.testing.assert_close(logits["fused"][:rows], logits["forward"], rtol=0, atol=2e-5)
        assert torch.equal(logits["fused"][:rows].argmax(-1), logits["forward"].argmax(-1))
        for slot, (prompt, task) in enumerate(zip(prompt_ids, prompt_tasks, strict=True), start=rows):
            model.use(task)
            forward_alone = base(input_ids=prompt[None], use_cache=True)
            model.use(None)
            torch.testing.assert_close(logits["fused"][slot, -1], forward_alone.logits[0, -1], rtol=0, atol=2e-5)
            for layer, expected in zip(caches["fused"].layers, forward_alone.cache.layers, strict=True):
                torch.testing.assert_close(layer.keys[slot, :, 12 - len(prompt):], expected.keys[0], rtol=0,
                                           atol=2e-5)
        for layer, other in zip(caches["fused"].layers, caches["eager"].layers, strict=True):  # the rows' new column
            torch.testing.assert_close(layer.keys[:rows, :, -1], other.keys[:rows, :, -1], rtol=0, atol=2e-5)
            torch.testing.assert_close(layer.values[:rows, :, -1], other.values[:rows, :, -1], rtol=0, atol=2e-5)
    assert (logits["fused"][0] - logits["fused"][2]).abs().max() > 1e-3  # the rows were routed to their deltas


@pytest.mark.parametrize("method", GENERATE_MIXABLE)
def test_decode_loop_with_fused_kernels_generates_each_rows_tokens_as_generate_alone(method):
    """Every mixable method's rows, two tasks and the base mixed, prompts joining steps and prefilled in passes
    (prompt / prefix tuning): the fused step's greedy tokens are `generate`'s for each prompt alone, in fp32."""
    torch.manual_seed(0)
    configs = CONFIGS.get(method) or [METHODS[method].config()] * 2
    model = with_random_deltas(wide_llama(), {f"{method}{index}": config for index, config in enumerate(configs)})
    model.base_model.generation_config.eos_token_id = None
    tasks = [None if index is None else f"{method}{index}" for index, _, _ in REQUESTS]
    expected = [alone(model, task, ids, new) for task, ids, (_, _, new) in zip(tasks, prompts(), REQUESTS, strict=True)]
    got, metrics = served_tokens(model, tasks, {"max_batch_size": 4, "fused_kernels": True})
    assert got == expected
    assert metrics["fused_steps"] == metrics["written_steps"] == metrics["steps"] > 0


def test_the_library_is_built_once_and_load_says_why_it_cannot(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_KERNEL_CACHE", str(tmp_path))
    assert cpu_kernels.load.__wrapped__() is not None
    built = list(tmp_path.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no scratch folder or partial file left beside it
    stamp = built[0].stat().st_mtime_ns
    assert cpu_kernels.load.__wrapped__() is not None and built[0].stat().st_mtime_ns == stamp  # reused
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert cpu_kernels.load.__wrapped__() is None
    assert "no C compiler" in cpu_kernels.unavailable_reason()
